"""Datasets with a zero background outside the body: nnU-Net crops to the nonzero region and writes -1 into the
preprocessed segmentation outside it. Everything that reads preprocessed segmentations must read -1 as background
(as nnU-Net's training transforms do): plan -> train (with the default tuning) -> predict -> evaluate, and the
tuner's Dice and ECE against values computed here by hand from the same logits. A tuning that fails keeps the
trained model and names the command that retries it."""
import json
import os

import numpy as np
import pytest
import torch

from diffnnunet.cli import evaluate, predict, train, tune_sampling
from tests.helpers import CONFIG, ZERO_BACKGROUND_IDS, dataset_names, module_cli_env

IDS = ZERO_BACKGROUND_IDS
NAMES = dataset_names(IDS)
TRAINER, PLANS = "DiffUNetTrainer", "DiffnnUNetPlans"


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("zero_bg"), ids=IDS)


def _model_folder(env, dim):
    return os.path.join(env["nnUNet_results"], NAMES[dim], f"{TRAINER}__{PLANS}__{CONFIG[dim]}")


def _hand_dice_and_ece(logits: torch.Tensor, seg_with_minus_one: np.ndarray) -> tuple[float, float]:
    """Mean Dice of labels 1 and 2 and the 15-bin ECE of the softmax's top probability, with -1 read as 0."""
    ref = np.where(seg_with_minus_one < 0, 0, seg_with_minus_one)
    prob = torch.softmax(logits.double(), 0).numpy()
    pred = prob.argmax(0)
    dices = []
    for c in (1, 2):
        tp = np.sum((pred == c) & (ref == c))
        denom = np.sum(pred == c) + np.sum(ref == c)
        if denom:
            dices.append(2 * tp / denom)
    conf, correct = prob.max(0).ravel(), (pred == ref).ravel()
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
        if in_bin.any():
            ece += in_bin.sum() / conf.size * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(np.mean(dices)), float(ece)


@pytest.fixture(scope="module")
def trained(env):
    """``trained(dim)`` -> the model folder of DiffUNetTrainer fold 0, trained once (1 epoch x 2 iterations) with
    the default end-of-training tuning on one validation case; train exits 0."""
    done = {}

    def get(dim):
        if dim not in done:
            train.main([str(IDS[dim]), TRAINER, "0", "-device", "cpu", "--epochs", "1", "--iterations-per-epoch",
                        "2", "--val-iterations", "1", "--tune-max-cases", "1"])
            done[dim] = _model_folder(env, dim)
        return done[dim]
    return get


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_zero_background_plan_train_tune_predict_evaluate(env, trained, dim, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from diffnnunet.inference import DiffusionPredictor
    from diffnnunet.inference.tuning import _predict, validation_keys
    pre = os.path.join(env["nnUNet_preprocessed"], NAMES[dim])
    plans = json.load(open(os.path.join(pre, PLANS + ".json")))
    data_folder = os.path.join(pre, plans["configurations"][CONFIG[dim]]["data_identifier"])
    dataset = infer_dataset_class(data_folder)(data_folder)
    assert all((np.asarray(dataset.load_case(k)[1][:]) < 0).any() for k in dataset.identifiers), \
        "precondition: preprocessing wrote -1 outside the body"
    folder = trained(dim)  # default tuning; exit 0
    data, seg = (np.asarray(a[:]) for a in dataset.load_case(validation_keys(pre, 0)[0])[:2])
    tuned = json.load(open(os.path.join(folder, "sampling.json")))
    assert tuned["cases"] == 1 and tuned["calibration"]["temperature"] > 0
    rows = {(r["steps"], r["samples"]): r for r in tuned["grid"]}
    predictor = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   device=torch.device("cpu"), allow_tqdm=False, use_tuned_sampling=False,
                                   save_uncertainty=True)
    predictor.initialize_from_trained_model_folder(folder, [0], "checkpoint_final.pth")
    for budget in {(1, 1), (tuned["sampling_steps"], tuned["samples_per_step"])}:
        out = _predict(predictor, torch.from_numpy(data.astype(np.float32)), *budget).float()
        dice, ece = _hand_dice_and_ece(out[:3], seg[0])
        assert rows[budget]["dice"] == pytest.approx(dice, abs=1e-6)
        assert rows[budget]["ece"] == pytest.approx(ece, abs=1e-6)
    raw = os.path.join(env["nnUNet_raw"], NAMES[dim])
    pred = str(tmp_path / "pred")
    predict.main(["-i", os.path.join(raw, "imagesTs"), "-o", pred, "-d", str(IDS[dim]), "-tr", TRAINER, "-f", "0",
                  "-npp", "0", "-device", "cpu", "--save_uncertainty", "--save_probabilities"])
    evaluate.main(["-ref", os.path.join(raw, "labelsTs"), "-pred", pred, "-djfile", os.path.join(pred,
                   "dataset.json"), "-o", str(tmp_path / "summary.json")])
    summary = json.load(open(tmp_path / "summary.json"))
    assert 0 <= summary["foreground_mean"]["Dice"] <= 1
    # the evaluation's ECE recomputed here from the exported CASE.npz and the reference files, pooled over the
    # cases: 15 equal-width bins of the top probability, sum_b (n_b / N) |acc_b - conf_b|
    import SimpleITK as sitk
    cases = sorted(f[:-4] for f in os.listdir(pred) if f.endswith(".npz"))
    assert cases, "--save_probabilities wrote no CASE.npz"
    conf, correct = [], []
    for case in cases:
        prob = np.load(os.path.join(pred, case + ".npz"))["probabilities"].astype(np.float64)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTs", case + ".nii.gz"))).ravel()
        prob = prob.reshape(prob.shape[0], -1)
        assert prob.shape[1] == ref.size
        conf.append(prob.max(0))
        correct.append(prob.argmax(0) == ref)
    conf, correct = np.concatenate(conf), np.concatenate(correct)
    bin_of = np.minimum(np.floor(conf * 15).astype(int), 14)
    ece = sum(np.sum(bin_of == b) / conf.size * abs(correct[bin_of == b].mean() - conf[bin_of == b].mean())
              for b in range(15) if np.any(bin_of == b))
    assert summary["uncertainty"]["ECE"] == pytest.approx(ece, abs=1e-6)


def test_failed_tuning_keeps_the_model_and_names_the_retry(env, trained, capsys, monkeypatch):
    """The shared model's sampling.json is put back afterwards: the test leaves nothing changed."""
    folder = trained(2)
    kept = open(os.path.join(folder, "sampling.json"), "rb").read()
    try:
        _failed_tuning(env, folder, capsys, monkeypatch)
    finally:
        with open(os.path.join(folder, "sampling.json"), "wb") as f:
            f.write(kept)


def _failed_tuning(env, folder, capsys, monkeypatch):
    from argparse import Namespace

    from diffnnunet.cli import tune_sampling as tune_module
    from diffnnunet.cli.common import UserError
    from diffnnunet.cli.train import load_trainer, tune_after_training
    before = os.path.getmtime(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    if os.path.isfile(os.path.join(folder, "sampling.json")):
        os.remove(os.path.join(folder, "sampling.json"))

    def broken(*args, **kwargs):
        raise IndexError("Target -1 is out of bounds.")

    monkeypatch.setattr(tune_module, "run_tuning", broken)
    trainer = load_trainer(str(IDS[2]), TRAINER, "0", "2d", None, torch.device("cpu"))
    with pytest.raises(UserError) as e:
        tune_after_training(Namespace(dataset=str(IDS[2]), trainer=TRAINER, fold="0", tune_max_cases=1), trainer)
    msg = str(e.value)
    assert "\n" not in msg and "sampling tuning failed" in msg and "IndexError: Target -1 is out of bounds." in msg
    assert os.path.getmtime(os.path.join(folder, "fold_0", "checkpoint_final.pth")) == before
    assert not os.path.exists(os.path.join(folder, "sampling.json"))
    retry = msg.split("retry the tuning with: ")[1].split()
    assert retry[0] == "diffnnunet_tune_sampling"
    monkeypatch.undo()
    tune_sampling.main(retry[1:] + ["--steps", "1", "--samples", "1", "-device", "cpu"])  # the command runs
    assert json.load(open(os.path.join(folder, "sampling.json")))["folds"] == [0]
    # through the CLI: a non-zero exit and the one line
    monkeypatch.setattr(tune_module, "run_tuning", broken)
    with pytest.raises(SystemExit) as e:
        train.main([str(IDS[2]), TRAINER, "0", "-device", "cpu", "--val"])
    assert e.value.code == 2
    assert "the sampling tuning failed after training" in capsys.readouterr().err.strip().splitlines()[-1]
