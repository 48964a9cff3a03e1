"""benchmarks/quality.py and suite.py bookkeeping: the --set overrides, the worst-gap lines, the uncertainty
verdicts and the control AUROC."""
import pytest

from tests.helpers import load_benchmark


def test_overrides_reach_into_sections():
    q = load_benchmark("quality")
    over = q.parse_overrides(["ema.enabled=false", "optimizer.initial_lr=1e-4", "uncertainty=entropy"])
    assert over == {"ema": {"enabled": False}, "optimizer": {"initial_lr": 1e-4}, "uncertainty": "entropy"}
    section = {"ema": {"enabled": True, "horizon_fraction": 0.1}, "optimizer": {"name": "AdamW", "initial_lr": 1e-3}}
    merged = q.merge(section, over)
    assert merged["ema"] == {"enabled": False, "horizon_fraction": 0.1}
    assert merged["optimizer"] == {"name": "AdamW", "initial_lr": 1e-4} and merged["uncertainty"] == "entropy"
    assert section["ema"]["enabled"] is True  # the plans' own dict is not modified


def test_worst_gap_and_ece_ratio_over_trainers_and_budgets():
    q = load_benchmark("quality")

    def run(trainer, budget, seed, dice, ece):
        return {"trainer": trainer, "budget": budget, "seed": seed, "Dice": dice, "HD95": 1.0, "NSD": 0.9,
                "ECE": ece, "AUROC": 0.9, "train_s": 1.0, "predict_s": 1.0}

    runs = [run("nnUNetTrainer", 1, 0, 0.80, 0.02), run("nnUNetTrainer", 1, 1, 0.84, 0.02),
            run("A", 1, 0, 0.79, 0.03), run("A", 1, 1, 0.81, 0.05),      # mean 0.80: gap -0.02, ECE ratio 2.0
            run("nnUNetTrainer", 4, 0, 0.90, 0.01), run("A", 4, 0, 0.91, 0.012)]  # gap +0.01, ratio 1.2
    table, gap, ratio = q.summarise(runs)
    assert gap == pytest.approx(-0.02) and ratio == pytest.approx(2.0)
    assert "0.8200±0.0200" in table  # the baseline's mean ± half-range at budget 1


def test_uncertainty_verdict_needs_both_nnunet_and_the_control_beaten_beyond_the_spread():
    """Exported AUROC means: nnU-Net 0.90 (sd 0.01), A 0.93 (sd 0.01) with control 0.925 (sd 0.01): +0.03 over
    nnU-Net is beyond the larger sd (better), +0.005 over the control is inside it (tie) -> not better. B: 0.95
    against a control of 0.92 and nnU-Net's 0.90 -> better. C: 0.895 -> tie with nnU-Net, not better."""
    def runs(trainer, exported, control):
        return [{"trainer": trainer, "AUROC": e, "AUROC_control": c} for e, c in zip(exported, control)]
    rows = (runs("nnUNetTrainer", [0.89, 0.91], [0.89, 0.91]) + runs("A", [0.92, 0.94], [0.915, 0.935])
            + runs("B", [0.94, 0.96], [0.91, 0.93]) + runs("C", [0.885, 0.905], [0.88, 0.90]))
    lines = load_benchmark("suite").uncertainty_verdicts(rows)
    assert lines == [
        "uncertainty A: exported AUROC vs nnU-Net's exported +0.0300 (better), vs its own control +0.0050 (tie): "
        "not better",
        "uncertainty B: exported AUROC vs nnU-Net's exported +0.0500 (better), vs its own control +0.0300 (better): "
        "better",
        "uncertainty C: exported AUROC vs nnU-Net's exported -0.0050 (tie), vs its own control +0.0050 (tie): "
        "not better"]


def test_control_auroc_by_hand(tmp_path):
    """One 2D case of four voxels (1 x 1 x 4), two labels. Probabilities of class 1: 0.9, 0.6, 0.3, 0.45 -> the
    predicted labels 1, 1, 0, 0 and margin complements h = 1 - |2p - 1| = 0.2, 0.8, 0.6, 0.9. Reference 1, 0, 0,
    1: voxels 2 and 4 are wrong. The curves map label 0 to a constant 0.5 and label 1 to h itself (identity knots),
    each with the tie-break (e + 1e-4 h) / (1 + 1e-4): voxel values 0.2, 0.8 (label 1) and 0.5 + tiny x 0.6, 0.5 +
    tiny x 0.9 (label 0). Errors (0.8, 0.5+0.9 tiny) against correct (0.2, 0.5+0.6 tiny): 4 of 4 pairs ordered ->
    AUROC 1. Within labels: label 1 (0.8 wrong > 0.2) 1; label 0 (0.5+0.9t wrong > 0.5+0.6t) 1."""
    import json

    import numpy as np
    import SimpleITK as sitk
    suite = load_benchmark("suite")
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    p1 = np.array([0.9, 0.6, 0.3, 0.45]).reshape(1, 1, 4)
    seg = (p1 > 0.5).astype(np.uint8)
    for folder, array in ((pred, seg), (ref, np.array([1, 0, 0, 1], np.uint8).reshape(1, 1, 4))):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / "c.nii.gz"))
    np.savez(pred / "c.npz", probabilities=np.stack([1 - p1, p1]).astype(np.float32))
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz",
                                                   "channel_names": {"0": "T1"}}))
    curves = {"pooled": {"u": [0.0, 1.0], "error": [0.5, 0.5]},
              "labels": {"0": {"u": [0.0, 1.0], "error": [0.5, 0.5]}, "1": {"u": [0.0, 1.0], "error": [0.0, 1.0]}}}
    got = suite.control_auroc(str(pred), str(ref), curves)
    assert got == {"AUROC_control": pytest.approx(1.0), "AUROC_control_within": pytest.approx(1.0)}
    # label 1's curve reversed: its wrong voxel (h 0.8 -> 0.2) now ranks below its correct one (0.2 -> 0.8), and
    # both below label 0's 0.5: pooled pairs (wrong 0.2, 0.5+0.9t vs correct 0.8, 0.5+0.6t) ordered 1 of 4
    curves["labels"]["1"]["error"] = [1.0, 0.0]
    got = suite.control_auroc(str(pred), str(ref), curves)
    assert got["AUROC_control"] == pytest.approx(0.25) and got["AUROC_control_within"] == pytest.approx(0.5)
    assert suite.control_auroc(str(pred), str(ref), None) == {"AUROC_control": None, "AUROC_control_within": None}
