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
from tests.helpers import CONFIG, dataset_names, image_geometry, synthetic_cli_env

IDS = {2: 812, 3: 813}
NAMES = dataset_names(IDS)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from synthetic_cli_env(
        tmp_path_factory.mktemp("nnunet"), IDS,
        [["-d", str(IDS[2]), str(IDS[3]), "-c", "2d", "3d_fullres", "-np", "2", "-methods", "diff_unet"]],
        "DiffnnUNetPlans", sampling_steps=2, samples_per_step=2)


def _fail(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # the one error line (progress bars may precede it on stderr)
    assert ": error: " in last, err
    return last


def _train(dim, trainer="DiffUNetTrainer", fold="0", extra=()):
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
def test_train_predict_keeps_inputimage_geometry(env, dim, tmp_path):
    _train(dim)
    fold = os.path.join(env["nnUNet_results"], NAMES[dim], f"DiffUNetTrainer__DiffnnUNetPlans__{CONFIG[dim]}",
                        "fold_0")
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


def test_baseline_trainer_and_continue(env, tmp_path, capsys):
    _train(2, "nnUNetTrainer")
    folder = os.path.join(env["nnUNet_results"], NAMES[2], "nnUNetTrainer__nnUNetPlans__2d")
    assert os.path.isfile(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    out = str(tmp_path / "base")
    images = os.path.join(env["nnUNet_raw"], NAMES[2], "imagesTs")
    predict.main(["-i", images, "-o", out, "-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-device", "cpu",
                  "--disable_tta"])
    assert len([f for f in os.listdir(out) if f.endswith(".nii.gz")]) == 2
    # --continue_prediction only redoes what is missing
    first = os.path.join(out, "case_006.nii.gz")
    os.remove(os.path.join(out, "case_007.nii.gz"))
    before = os.path.getmtime(first)
    predict.main(["-i", images, "-o", out, "-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-device", "cpu",
                  "--disable_tta", "--continue_prediction"])
    assert os.path.isfile(os.path.join(out, "case_007.nii.gz")) and os.path.getmtime(first) == before


def test_resume_training_with_continue(env):
    import torch
    _train(2, fold="1")
    _train(2, fold="1", extra=("--epochs", "2", "--continue"))
    ckpt = os.path.join(env["nnUNet_results"], NAMES[2], "DiffUNetTrainer__DiffnnUNetPlans__2d", "fold_1",
                        "checkpoint_final.pth")
    assert torch.load(ckpt, weights_only=False)["current_epoch"] == 2


def test_training_errors(env, capsys):
    assert "999" in _fail(train.main, ["999", "DiffUNetTrainer", "0"], capsys)
    assert "NoSuchTrainer" in _fail(train.main, [str(IDS[2]), "NoSuchTrainer", "0"], capsys)
    assert "3d_fullres" in _fail(train.main, [str(IDS[2]), "DiffUNetTrainer", "0", "-c", "3d_fullres"], capsys)
    assert "fold 7" in _fail(train.main, [str(IDS[2]), "DiffUNetTrainer", "7"], capsys)


def test_prediction_errors(env, tmp_path, capsys):
    images = os.path.join(env["nnUNet_raw"], NAMES[3], "imagesTs")
    err = _fail(predict.main, ["-i", images, "-o", str(tmp_path / "o"), "-d", str(IDS[3]), "-tr",
                               "DiffUNetTrainer", "-f", "4", "-device", "cpu"], capsys)
    assert "fold_4" in err and "checkpoint" in err
    err = _fail(predict.main, ["-i", images, "-o", str(tmp_path / "o"), "-d", str(IDS[3]), "-tr",
                               "DiffusionTrainer"], capsys)
    assert "no trained" in err
    _train(3, fold="2")  # a model to predict with

    def run(folder):
        return _fail(predict.main, ["-i", str(folder), "-o", str(tmp_path / "o"), "-d", str(IDS[3]), "-tr",
                                    "DiffUNetTrainer", "-f", "2", "-device", "cpu"], capsys)

    one_channel = tmp_path / "one_channel"
    one_channel.mkdir()
    shutil.copy(os.path.join(images, "case_006_0000.nii.gz"), one_channel)
    assert "case_006" in run(one_channel) and "expects 2" in run(one_channel)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(images, corrupt)
    (corrupt / "case_007_0001.nii.gz").write_bytes(b"not a nifti")
    assert "case_007_0001.nii.gz" in run(corrupt)
    assert not os.path.exists(tmp_path / "o" / "case_006.nii.gz")  # nothing half-written before the check


def test_console_script_exit_code(env):
    exe = os.path.join(os.path.dirname(sys.executable), "diffnnunet_train")
    r = subprocess.run([exe, "999", "DiffUNetTrainer", "0"], capture_output=True, text=True, env=os.environ)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("diffnnunet_train: error:") and len(r.stderr.strip().splitlines()) == 1


def test_tuned_sampling_budget_is_stored_and_used(env, capsys):
    from diffnnunet.cli import tune_sampling
    from diffnnunet.inference import DiffusionPredictor
    folder = os.path.join(env["nnUNet_results"], NAMES[2], "DiffUNetTrainer__DiffnnUNetPlans__2d")
    if not os.path.isfile(os.path.join(folder, "fold_0", "checkpoint_final.pth")):
        _train(2)
    tune_sampling.main(["-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f", "0", "--steps", "1", "3",
                        "--samples", "1", "2", "--max_cases", "1", "--tolerance", "0.5", "-device", "cpu"])
    assert "<- chosen" in capsys.readouterr().out
    tuned = json.load(open(os.path.join(folder, "sampling.json")))
    grid = {(r["steps"], r["samples"]): r["dice"] for r in tuned["grid"]}
    assert set(grid) == {(1, 1), (1, 2), (3, 1), (3, 2)}
    best = max(grid.values())
    chosen = (tuned["sampling_steps"], tuned["samples_per_step"])
    assert grid[chosen] >= best - 0.005  # within half a Dice point of the best ...
    cheaper = [g for g, d in grid.items() if g[0] * g[1] < chosen[0] * chosen[1]]
    assert all(grid[g] < best - 0.005 for g in cheaper)  # ... and nothing cheaper is
    predictor = DiffusionPredictor(device=torch_cpu(), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, [0])
    assert (predictor.sampling_steps, predictor.samples_per_step) == chosen
    predictor = DiffusionPredictor(device=torch_cpu(), steps=5, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, [0])
    assert predictor.sampling_steps == 5  # the command line wins
    if not os.path.isdir(os.path.join(env["nnUNet_results"], NAMES[2], "nnUNetTrainer__nnUNetPlans__2d", "fold_0")):
        _train(2, "nnUNetTrainer")
    err = _fail(tune_sampling.main, ["-d", str(IDS[2]), "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu"], capsys)
    assert "not a diffusion model" in err


def torch_cpu():
    import torch
    return torch.device("cpu")
