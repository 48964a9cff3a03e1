"""The three CLIs end to end on tiny generated 2D and 3D datasets (anisotropic spacing, two channels, rotated
direction), on CPU, plus the one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from diffnnunet.cli import predict, train
from tests.helpers import CONFIG, STANDARD_IDS, dataset_names, image_geometry, module_cli_env
from tests.helpers import fail_one_line as _fail

IDS = STANDARD_IDS
NAMES = dataset_names(IDS)


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(
        planned, tmp_path_factory.mktemp("nnunet"), "DiffnnUNetPlans", sampling_steps=2, samples_per_step=2,
        # an EMA horizon of 5 runs (decay 0.9 for 2 updates) so that the EMA and raw weights differ in 2 updates
        ema={"enabled": True, "horizon_fraction": 5.0, "max_decay": 0.9999})




#: the models several tests predict with or start from: name -> (dim, trainer, fold, end-of-training tuning)
MODELS = {"diff2d": (2, "DiffUNetTrainer", "0", False), "diff3d": (3, "DiffUNetTrainer", "0", False),
          "base2d": (2, "nnUNetTrainer", "0", True)}


@pytest.fixture(scope="module")
def trained(env):
    """``trained(name)`` -> the fold folder of :data:`MODELS` ``name``, trained on first use and shared: every test
    that needs a model asks for it here, so none depends on another test having trained it. The tuning, where on,
    runs on one validation case."""
    done = {}

    def get(name):
        if name not in done:
            dim, trainer, fold, tune = MODELS[name]
            _train(dim, trainer, fold, extra=("--tune-max-cases", "1") if tune else ("--no-tune",))
            plans = "nnUNetPlans" if trainer == "nnUNetTrainer" else "DiffnnUNetPlans"
            done[name] = os.path.join(env["nnUNet_results"], NAMES[dim], f"{trainer}__{plans}__{CONFIG[dim]}",
                                      f"fold_{fold}")
        return done[name]
    return get


def _train(dim, trainer="DiffUNetTrainer", fold="0", extra=("--no-tune",)):
    """One epoch of two iterations; without the sampling tuning unless ``extra`` leaves ``--no-tune`` out."""
    train.main([str(IDS[dim]), trainer, fold, "-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", *extra])


def test_plans_have_diffusion_section_and_baseline(env):
    for d in (2, 3):
        pre = os.path.join(env["nnUNet_preprocessed"], NAMES[d])
        ours = json.load(open(os.path.join(pre, "DiffnnUNetPlans.json")))
        base = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
        assert set(ours["configurations"]) == set(base["configurations"])
        for c, cfg in ours["configurations"].items():
            diff = cfg["diffusion"]
            assert diff["method"] == "diff_unet" and diff["timesteps"] == 1000 and diff["schedule"] == "linear"
            assert cfg["architecture"]["network_class_name"].endswith("TimeUNet")
            assert cfg["data_identifier"] == base["configurations"][c]["data_identifier"]  # shared preprocessing
        assert CONFIG[d] in ours["configurations"]


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_train_predict_keeps_inputimage_geometry(env, trained, dim, tmp_path):
    fold = trained(f"diff{dim}d")
    for f in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "validation/summary.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    summary = json.load(open(os.path.join(fold, "validation", "summary.json")))
    assert set(summary["mean"]) == {"1", "2"}
    out = str(tmp_path / "pred")
    images = os.path.join(env["nnUNet_raw"], NAMES[dim], "imagesTs")
    predict.main(["-i", images, "-o", out, "-d", str(IDS[dim]), "-tr", "DiffUNetTrainer", "-f", "0",
                  "-device", "cpu", "--save_uncertainty", "--save_probabilities", "--steps", "2", "--samples", "1"])
    cases = sorted({f[:-12] for f in os.listdir(images)})
    for case in cases:
        src = image_geometry(os.path.join(images, case + "_0000.nii.gz"))
        seg = os.path.join(out, case + ".nii.gz")
        unc = os.path.join(out, case + "_uncertainty.nii.gz")
        assert image_geometry(seg)[0] == src[0]
        for a, b in zip(image_geometry(seg)[1:], src[1:]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(image_geometry(unc), src):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        labels = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(seg)))
        assert set(labels.tolist()) <= {0, 1, 2}
        u = sitk.ReadImage(unc)
        assert u.GetPixelID() == sitk.sitkFloat32
        arr = sitk.GetArrayFromImage(u)
        assert arr.min() >= 0 and arr.max() <= 1
        probs = np.load(os.path.join(out, case + ".npz"))["probabilities"]
        assert probs.shape[0] == 3
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-3)
    assert not [f for f in os.listdir(out) if f.startswith(".partial_")]
    # -npp 0: the same prediction without worker processes (nnU-Net's sequential path, our export)
    seq = str(tmp_path / "sequential")
    predict.main(["-i", images, "-o", seq, "-d", str(IDS[dim]), "-tr", "DiffUNetTrainer", "-f", "0",
                  "-device", "cpu", "--save_uncertainty", "--steps", "2", "--samples", "1", "-npp", "0"])
    for case in cases:
        for suffix in (".nii.gz", "_uncertainty.nii.gz"):
            a, b = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(d, case + suffix))) for d in (out, seq))
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_resenc_preset_plans_train_and_predict_the_baseline(env, tmp_path):
    """-pl nnUNetPlannerResEncM writes nnU-Net's nnUNetResEncUNetMPlans (2d data shared with nnUNetPlans); the
    baseline trains on them with -p and predicts with the residual-encoder U-Net they describe."""
    from diffnnunet.cli.plan_and_preprocess import plan_and_preprocess_dataset
    from diffnnunet.utils import load_checkpoint_safely
    plans = plan_and_preprocess_dataset(NAMES[2], ["2d"], 1, methods=[], baseline_planner="nnUNetPlannerResEncM",
                                        preprocess=False)
    arch = plans["nnUNetResEncUNetMPlans"]["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    assert plans["nnUNetResEncUNetMPlans"]["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d"
    _train(2, "nnUNetTrainer", extra=("--no-tune", "-p", "nnUNetResEncUNetMPlans"))
    fold = os.path.join(env["nnUNet_results"], NAMES[2], "nnUNetTrainer__nnUNetResEncUNetMPlans__2d", "fold_0")
    weights = load_checkpoint_safely(os.path.join(fold, "checkpoint_final.pth"))["network_weights"]
    assert any(".stem." in k for k in weights)  # the residual encoder's stem: not the plain U-Net's weights
    out = str(tmp_path / "resenc")
    predict.main(["-i", os.path.join(env["nnUNet_raw"], NAMES[2], "imagesTs"), "-o", out, "-d", str(IDS[2]),
                  "-tr", "nnUNetTrainer", "-p", "nnUNetResEncUNetMPlans", "-f", "0", "-device", "cpu",
                  "--disable_tta", "-npp", "0"])
    images = os.listdir(os.path.join(env["nnUNet_raw"], NAMES[2], "imagesTs"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".nii.gz")) == sorted({f[:-12] + ".nii.gz" for f in images})


def test_baseline_trainer_and_continue(env, trained, tmp_path):
    folder = os.path.dirname(trained("base2d"))  # trained with the default tuning: nnU-Net's calibration only
    assert os.path.isfile(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    stock = json.load(open(os.path.join(folder, "sampling.json")))
    assert "sampling_steps" not in stock and "grid" not in stock and stock["calibration"]["temperature"] > 0
    assert stock["cases"] == 1 and stock["folds"] == [0]
    out = str(tmp_path / "base")
    images = os.path.join(env["nnUNet_raw"], NAMES[2], "imagesTs")
    predict.main(["-npp", "0", "-i", images, "-o", out, "-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-device", "cpu",
                  "--disable_tta"])
    assert len([f for f in os.listdir(out) if f.endswith(".nii.gz")]) == 2
    # --continue_prediction only redoes what is missing
    first = os.path.join(out, "case_006.nii.gz")
    os.remove(os.path.join(out, "case_007.nii.gz"))
    before = os.path.getmtime(first)
    predict.main(["-npp", "0", "-i", images, "-o", out, "-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-device", "cpu",
                  "--disable_tta", "--continue_prediction"])
    assert os.path.isfile(os.path.join(out, "case_007.nii.gz")) and os.path.getmtime(first) == before


def test_resume_training_with_continue(env):
    """--continue resumes the optimisation from the raw weights and the EMA from the stored (EMA) weights."""
    import torch

    from diffnnunet.cli.train import load_trainer
    from diffnnunet.utils import load_checkpoint_safely
    ckpt = os.path.join(env["nnUNet_results"], NAMES[2], "DiffUNetTrainer__DiffnnUNetPlans__2d", "fold_1",
                        "checkpoint_final.pth")
    stale = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "sampling.json")
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    with open(stale, "w") as f:
        f.write("{}")  # tuned for other weights: a new training removes it
    _train(2, fold="1")
    assert not os.path.exists(stale)
    first = load_checkpoint_safely(ckpt)
    assert first["ema_updates"] == 2  # one EMA update per optimizer step (1 epoch x 2 iterations)
    raw, ema = first["raw_network_weights"], first["network_weights"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # predictors load the EMA, not the raw weights
    trainer = load_trainer(str(IDS[2]), "DiffUNetTrainer", "1", "2d", device=torch.device("cpu"),
                           continue_training=True)
    trainer.load_checkpoint(ckpt)
    for k, v in trainer.method.state_dict().items():
        torch.testing.assert_close(v, raw[k])
        torch.testing.assert_close(trainer.ema.shadow[k], ema[k])
    with open(stale, "w") as f:
        f.write("{}")
    _train(2, fold="1", extra=("--epochs", "2", "--continue", "--no-tune"))
    assert os.path.exists(stale)  # --continue trains the same weights on: the tuning is not thrown away
    os.remove(stale)
    second = load_checkpoint_safely(ckpt)
    assert second["current_epoch"] == 2 and second["ema_updates"] == 4


def test_ema_never_leaves_its_weights_in_the_trained_module(env, monkeypatch):
    """Validation samples with the EMA copy (the trained module is never swapped), and the final validation's swap
    is undone also when it raises: after either failure the trained module holds the raw weights."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as Stock

    from diffnnunet.cli.train import load_trainer
    trainer = load_trainer(str(IDS[2]), "DiffUNetTrainer", "3", "2d", device=torch.device("cpu"))
    trainer.initialize()
    with torch.no_grad():
        for p in trainer.method.parameters():
            p.add_(1.0)  # the raw weights move away from the EMA's
    raw = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    assert any(not torch.equal(raw[k], v) for k, v in trainer.ema.shadow.items())
    assert trainer.sampling_module is trainer.ema.module
    monkeypatch.setattr(trainer.ema.module, "training_loss", lambda *a, **k: 1 / 0)
    batch = {"data": torch.zeros(1, 2, *trainer.configuration_manager.patch_size),
             "target": torch.zeros(1, 1, *trainer.configuration_manager.patch_size)}
    with pytest.raises(ZeroDivisionError):
        trainer.validation_step(batch)
    monkeypatch.setattr(Stock, "perform_actual_validation", lambda self, save_probabilities=False: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.perform_actual_validation()
    for k, v in trainer.method.state_dict().items():
        torch.testing.assert_close(v, raw[k])


def test_training_errors(env, capsys):
    assert "999" in _fail(train.main, ["999", "DiffUNetTrainer", "0"], capsys)
    assert "NoSuchTrainer" in _fail(train.main, [str(IDS[2]), "NoSuchTrainer", "0"], capsys)
    assert "3d_fullres" in _fail(train.main, [str(IDS[2]), "DiffUNetTrainer", "0", "-c", "3d_fullres"], capsys)
    assert "fold 7" in _fail(train.main, [str(IDS[2]), "DiffUNetTrainer", "7"], capsys)
    assert "--tune-max-cases must be >= 1" in _fail(train.main, [str(IDS[2]), "DiffUNetTrainer", "0",
                                                                 "--tune-max-cases", "0"], capsys)


def test_prediction_errors(env, trained, tmp_path, capsys):
    trained("diff3d")  # a model to predict with (its folder has fold_0 only)
    images = os.path.join(env["nnUNet_raw"], NAMES[3], "imagesTs")
    err = _fail(predict.main, ["-i", images, "-o", str(tmp_path / "o"), "-d", str(IDS[3]), "-tr",
                               "DiffUNetTrainer", "-f", "4", "-device", "cpu"], capsys)
    assert "fold_4" in err and "checkpoint" in err
    err = _fail(predict.main, ["-i", images, "-o", str(tmp_path / "o"), "-d", str(IDS[3]), "-tr",
                               "DiffusionTrainer"], capsys)
    assert "no trained" in err

    def run(folder):
        return _fail(predict.main, ["-i", str(folder), "-o", str(tmp_path / "o"), "-d", str(IDS[3]), "-tr",
                                    "DiffUNetTrainer", "-f", "0", "-device", "cpu"], capsys)

    one_channel = tmp_path / "one_channel"
    one_channel.mkdir()
    shutil.copy(os.path.join(images, "case_006_0000.nii.gz"), one_channel)
    assert "case_006" in run(one_channel) and "expects 2" in run(one_channel)
    assert not os.path.exists(tmp_path / "o" / "case_006.nii.gz")


def _truncate(path, drop=12):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-drop])


def test_batch_prediction_skips_bad_cases_and_continues(env, trained, tmp_path, capsys):
    """Good cases are predicted, each bad one (corrupt, truncated, NaN, stray name) is listed with its reason and
    gets no output, the exit status is non-zero; --continue_prediction then predicts only what is missing."""
    images = os.path.join(env["nnUNet_raw"], NAMES[3], "imagesTs")
    trained("diff3d")
    mixed = tmp_path / "mixed"
    shutil.copytree(images, mixed)
    for case in ("case_100", "case_101", "case_102"):
        for c in (0, 1):
            shutil.copy(mixed / f"case_006_{c:04d}.nii.gz", mixed / f"{case}_{c:04d}.nii.gz")
    (mixed / "case_100_0001.nii.gz").write_bytes(b"not a nifti")
    _truncate(mixed / "case_101_0000.nii.gz")
    img = sitk.ReadImage(str(mixed / "case_102_0001.nii.gz"))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[1, 2, 3] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    sitk.WriteImage(nan_img, str(mixed / "case_102_0001.nii.gz"))
    shutil.copy(mixed / "case_006_0000.nii.gz", mixed / "stray.nii.gz")
    out = tmp_path / "out"
    argv = ["-i", str(mixed), "-o", str(out), "-d", str(IDS[3]), "-tr", "DiffUNetTrainer", "-f", "0", "-device",
            "cpu", "--steps", "1", "--samples", "1"]
    with pytest.raises(SystemExit) as e:
        predict.main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "4 input(s) not predicted" in err[-1] and "2 case(s) predicted" in err[-1]
    reasons = [line for line in err if line.startswith("  not predicted: ")]
    assert len(reasons) == 4
    assert any("case_100_0001.nii.gz: cannot read image" in r for r in reasons)
    assert any("case_101_0000.nii.gz: truncated file" in r for r in reasons)
    assert any("case_102_0001.nii.gz: 1 non-finite voxel" in r for r in reasons)
    assert any("stray.nii.gz: file name must be CASE_XXXX" in r for r in reasons)
    written = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert written == ["case_006.nii.gz", "case_007.nii.gz"]  # the good cases, nothing for the bad ones
    assert not [f for f in os.listdir(out) if f.startswith(".partial_")]
    for case in ("case_100", "case_101", "case_102"):
        shutil.copy(mixed / "case_007_0000.nii.gz", mixed / f"{case}_0000.nii.gz")
        shutil.copy(mixed / "case_007_0001.nii.gz", mixed / f"{case}_0001.nii.gz")
    os.remove(mixed / "stray.nii.gz")
    before = os.path.getmtime(out / "case_006.nii.gz")
    predict.main(argv + ["--continue_prediction"])
    assert {f"case_10{i}.nii.gz" for i in range(3)} <= set(os.listdir(out))
    assert os.path.getmtime(out / "case_006.nii.gz") == before


def test_console_script_exit_code(env):
    exe = os.path.join(os.path.dirname(sys.executable), "diffnnunet_train")
    r = subprocess.run([exe, "999", "DiffUNetTrainer", "0"], capture_output=True, text=True, env=os.environ)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("diffnnunet_train: error:") and len(r.stderr.strip().splitlines()) == 1


def test_training_tunes_sampling_by_default_and_predict_uses_it(env, trained, tmp_path, capsys):
    """The one end-to-end run of the default tuning (``--tune-max-cases 1`` keeps it to one validation case):
    diffnnunet_train ends by writing sampling.json (budget + temperature) and diffnnunet_predict uses it."""
    from diffnnunet.cli import tune_sampling
    from diffnnunet.inference import DiffusionPredictor
    from diffnnunet.inference.tuning import DEFAULT_SAMPLES, DEFAULT_STEPS
    folder = os.path.join(env["nnUNet_results"], NAMES[2], "DiffUNetTrainer__DiffnnUNetPlans__2d")
    _train(2, fold="2", extra=("--tune-max-cases", "1"))
    out = capsys.readouterr().out
    assert "sampling tuning on 1 validation case(s) of fold 2" in out and "<- chosen" in out
    tuned = json.load(open(os.path.join(folder, "sampling.json")))
    assert tuned["folds"] == [2] and tuned["cases"] == 1
    rows = {(r["steps"], r["samples"]): r for r in tuned["grid"]}
    assert set(rows) == {(s, n) for s in DEFAULT_STEPS for n in DEFAULT_SAMPLES}
    assert all(0 <= r["ece"] <= 1 and (np.isnan(r["auroc"]) or 0 <= r["auroc"] <= 1) for r in rows.values())
    chosen = (tuned["sampling_steps"], tuned["samples_per_step"])
    assert rows[chosen]["dice"] >= max(r["dice"] for r in rows.values()) - 0.005  # within half a Dice point
    cal = tuned["calibration"]  # fitted at the chosen budget on the same validation case
    assert cal["temperature"] > 0 and cal["ece_after"] <= cal["ece_before"] + 1e-12 and cal["voxels"] > 0
    assert cal["error_map"]["measure"] == "mutual_information"  # Diff-UNet's plans measure
    assert cal["error_map"]["inputs"] in ("map", "confidence")  # chosen on held-out halves of the voxels
    assert set(cal["error_map"]["validation_auroc"]) == {"map", "confidence"}
    images = os.path.join(env["nnUNet_raw"], NAMES[2], "imagesTs")
    predict.main(["-i", images, "-o", str(tmp_path / "pred"), "-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f", "2",
                  "-npp", "0", "-device", "cpu", "--save_uncertainty"])
    assert f"diffusion sampling: {chosen[0]} steps x {chosen[1]} samples (tuned, sampling.json)" in \
        capsys.readouterr().out
    predict.main(["-i", images, "-o", str(tmp_path / "raw"), "-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f", "2",
                  "-npp", "0", "-device", "cpu", "--save_uncertainty", "--raw_uncertainty"])
    case = sorted(f for f in os.listdir(tmp_path / "pred") if f.endswith("_uncertainty.nii.gz"))[0]
    mapped, raw = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / case))) for d in ("pred", "raw"))
    assert mapped.shape == raw.shape and 0 <= mapped.min() and mapped.max() <= 1 and not np.allclose(mapped, raw)
    # one chain of one fold: the mutual-information map (Diff-UNet's) is 0 everywhere, and the user is told
    predict.main(["-i", images, "-o", str(tmp_path / "one"), "-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f", "2",
                  "-npp", "0", "-device", "cpu", "--save_uncertainty", "--raw_uncertainty", "--steps", "1",
                  "--samples", "1"])
    assert "warning: with 1 sample the 'mutual_information' map measures nothing" in capsys.readouterr().err
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / case))).any()
    predict.main(["-i", images, "-o", str(tmp_path / "one_h"), "-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f",
                  "2", "-npp", "0", "-device", "cpu", "--save_uncertainty", "--steps", "1", "--samples", "1",
                  "--uncertainty", "entropy"])
    assert "warning" not in capsys.readouterr().err
    predictor = DiffusionPredictor(device=torch_cpu(), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, [2])
    assert (predictor.sampling_steps, predictor.samples_per_step) == chosen
    assert predictor.tuned_sampling["temperature"] == pytest.approx(cal["temperature"])
    predictor = DiffusionPredictor(device=torch_cpu(), steps=5, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, [2])
    assert predictor.sampling_steps == 5  # the command line wins
    # the tuning command's own grid, without the calibration
    tune_sampling.main(["-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f", "2", "--steps", "1", "3",
                        "--samples", "1", "2", "--max_cases", "1", "--no_calibration", "-device", "cpu"])
    tuned = json.load(open(os.path.join(folder, "sampling.json")))
    assert {(r["steps"], r["samples"]) for r in tuned["grid"]} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    assert "calibration" not in tuned
    trained("base2d")
    # the stock model: the same calibration (temperature, margin error map), no budget
    tune_sampling.main(["-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu", "--max_cases", "1"])
    stock_folder = os.path.join(env["nnUNet_results"], NAMES[2], "nnUNetTrainer__nnUNetPlans__2d")
    stock = json.load(open(os.path.join(stock_folder, "sampling.json")))
    assert "sampling_steps" not in stock and stock["mirroring"] and stock["calibration"]["temperature"] > 0
    assert stock["calibration"].get("error_map", {"inputs": "confidence"})["inputs"] == "confidence"
    predict.main(["-i", images, "-o", str(tmp_path / "stock"), "-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-f", "0",
                  "-npp", "0", "-device", "cpu", "--save_uncertainty"])
    assert "calibration (sampling.json): temperature" in capsys.readouterr().out
    err = _fail(tune_sampling.main, ["-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu",
                                     "--no_calibration"], capsys)
    assert "not a diffusion model" in err


def test_tuning_after_training_skips_fold_all(env, capsys):
    from argparse import Namespace

    from diffnnunet.cli.train import load_trainer, tune_after_training
    trainer = load_trainer(str(IDS[2]), "DiffUNetTrainer", "all", "2d", None, torch_cpu())
    tune_after_training(Namespace(fold="all", tune_max_cases=None), trainer)
    assert "sampling tuning skipped: fold 'all' has no validation cases" in capsys.readouterr().out


def torch_cpu():
    import torch
    return torch.device("cpu")


def _subprocess_env():
    return dict(os.environ, nnUNet_n_proc_DA="0", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("trainer,plans", [("DiffUNetTrainer", "DiffnnUNetPlans"), ("nnUNetTrainer", "nnUNetPlans")])
def test_sigkill_mid_epoch_then_continue(env, trainer, plans):
    """SIGKILL in the middle of an epoch leaves a loadable checkpoint_latest; --continue finishes the run with the
    full epoch count and the whole training history."""
    import signal
    import time

    from diffnnunet.utils import load_checkpoint_safely
    fold = os.path.join(env["nnUNet_results"], NAMES[2], f"{trainer}__{plans}__2d", "fold_3")
    argv = [sys.executable, "-m", "diffnnunet.cli.train", str(IDS[2]), trainer, "3", "-device", "cpu", "--epochs",
            "3", "--iterations-per-epoch", "10", "--val-iterations", "1", "--no-tune"]
    proc = subprocess.Popen(argv, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = os.path.join(fold, "checkpoint_latest.pth")
    deadline = time.time() + 300
    while not os.path.isfile(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
    assert not os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    killed_at = load_checkpoint_safely(latest)["current_epoch"]
    assert killed_at in (1, 2)
    r = subprocess.run(argv + ["--continue"], env=_subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    final = load_checkpoint_safely(os.path.join(fold, "checkpoint_final.pth"))
    assert final["current_epoch"] == 3
    assert len(final["logging"]["train_losses"]) == 3  # epochs before the kill kept, none repeated
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))


_KILL_WHILE_SAVING = """
import io, os, signal, sys
import torch
from diffnnunet.cli.train import load_trainer
trainer = load_trainer(sys.argv[1], sys.argv[2], "4", "2d", None, torch.device("cpu"))
trainer.initialize()
path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
trainer.save_checkpoint(path)  # a whole checkpoint of epoch 0
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    with open(f, "wb") as out:
        out.write(buffer.getvalue()[: buffer.tell() // 2])
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed half-way through writing the file
torch.save = dying_save
trainer.current_epoch = 7
trainer.save_checkpoint(path)
"""


@pytest.mark.parametrize("trainer,plans", [("DiffUNetTrainer", "DiffnnUNetPlans"), ("nnUNetTrainer", "nnUNetPlans")])
def test_sigkill_while_writing_checkpoint_keeps_the_previous_one(env, trainer, plans):
    import signal

    from diffnnunet.utils import load_checkpoint_safely
    r = subprocess.run([sys.executable, "-c", _KILL_WHILE_SAVING, str(IDS[2]), trainer], env=_subprocess_env(),
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    fold = os.path.join(env["nnUNet_results"], NAMES[2], f"{trainer}__{plans}__2d", "fold_4")
    assert os.path.getsize(os.path.join(fold, ".partial_checkpoint_latest.pth")) > 0  # the half-written file
    assert load_checkpoint_safely(os.path.join(fold, "checkpoint_latest.pth"))["current_epoch"] == 1


def test_command_lines_refuse_abbreviations_and_read_nnunet_spellings(monkeypatch):
    """No prefix matching: nnU-Net's -pretrained_weights is its own option (not -p retrained_weights), --c is
    nnU-Net's continue, an abbreviation is an error; -npp / -nps default to nnUNet_npp / nnUNet_nps."""
    from diffnnunet.cli import evaluate as evaluate_cli
    from diffnnunet.cli import plan_and_preprocess as plan_cli
    from diffnnunet.cli import tune_sampling as tune_cli
    args = train.build_parser().parse_args(["1", "DiffUNetTrainer", "0", "-pretrained_weights", "w.pth", "--c"])
    assert args.pretrained_weights == "w.pth" and args.plans is None and args.continue_training
    for parser, argv in ((train.build_parser(), ["1", "DiffUNetTrainer", "0", "--conf", "2d"]),
                         (train.build_parser(), ["1", "DiffUNetTrainer", "0", "--iterations", "3"]),
                         (predict.build_parser(), ["-i", "a", "-o", "b", "-d", "1", "--save_unc"]),
                         (tune_cli.build_parser(), ["-d", "1", "--no_cal"]),
                         (plan_cli.build_parser(), ["-d", "1", "--verify"]),
                         (evaluate_cli.build_parser(), ["-ref", "a", "-pred", "b", "-djfile", "c", "--plot"])):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    monkeypatch.setenv("nnUNet_npp", "5")
    monkeypatch.setenv("nnUNet_nps", "3")
    args = predict.build_parser().parse_args(["-i", "a", "-o", "b", "-d", "1"])
    assert (args.npp, args.nps) == (5, 3)


@pytest.mark.parametrize("trainer", ["DiffUNetTrainer", "nnUNetTrainer"])
def test_pretrained_weights_start_the_new_run(env, trained, trainer, capsys):
    """-pretrained_weights: fold 1 starts from fold 0's network weights (a weight checked), the EMA from them too;
    nnU-Net's segmentation layers are not transferred; another method's checkpoint is refused naming the file."""
    import torch

    from diffnnunet.cli.train import load_trainer
    from diffnnunet.trainers.pretrained import load_pretrained_weights
    from diffnnunet.utils import load_checkpoint_safely
    mine, theirs = ("diff2d", "base2d") if trainer == "DiffUNetTrainer" else ("base2d", "diff2d")
    ckpt = os.path.join(trained(mine), "checkpoint_final.pth")
    stored = load_checkpoint_safely(ckpt)["network_weights"]
    new = load_trainer(str(IDS[2]), trainer, "1", "2d", None, torch_cpu())
    assert load_pretrained_weights(new, ckpt) > 0
    net = getattr(new.network, "_orig_mod", new.network)
    for key, value in net.state_dict().items():
        if ".seg_layers." in key:
            continue
        torch.testing.assert_close(value, stored[key])
        if getattr(new, "ema", None) is not None:
            torch.testing.assert_close(new.ema.shadow[key], stored[key])
    other = os.path.join(trained(theirs), "checkpoint_final.pth")
    with pytest.raises(ValueError, match="checkpoint_final.pth: pretrained"):
        load_pretrained_weights(load_trainer(str(IDS[2]), trainer, "1", "2d", None, torch_cpu()), other)
    err = _fail(train.main, [str(IDS[2]), trainer, "1", "-device", "cpu", "-pretrained_weights", other, "--epochs",
                             "1", "--iterations-per-epoch", "1", "--no-tune"], capsys)
    assert "pretrained" in err and other in err
    err = _fail(train.main, [str(IDS[2]), trainer, "1", "-pretrained_weights", ckpt, "--c"], capsys)
    assert "exclude each other" in err
    err = _fail(train.main, [str(IDS[2]), trainer, "1", "--val_best", "--disable_checkpointing"], capsys)
    assert "--val_best needs checkpoint_best" in err
