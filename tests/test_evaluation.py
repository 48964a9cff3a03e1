"""Known answers for the metrics and the uncertainty-quality figures."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from diffnnunet.cli import evaluate
from diffnnunet.evaluation.metrics import surface_metrics
from diffnnunet.evaluation.uncertainty import (
    auroc_from_histograms,
    calibration_bins,
    ece_from_bins,
    uncertainty_counts,
)


def test_hd95_slab_grown_by_one_thick_slice():
    ref = np.zeros((10, 20, 20), bool)
    ref[3:6, 5:15, 5:15] = True
    pred = ref.copy()
    pred[6] = ref[5]
    hd95, nsd = surface_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert hd95 == pytest.approx(3.0)
    assert 0 < nsd < 1
    assert surface_metrics(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=3.0)[1] == pytest.approx(1.0)


def test_hd95_slab_grown_by_one_thin_column():
    ref = np.zeros((10, 20, 20), bool)
    ref[3:6, 5:15, 5:15] = True
    pred = ref.copy()
    pred[3:6, 5:15, 15] = True
    assert surface_metrics(pred, ref, (3.0, 1.0, 0.7), 1.0)[0] == pytest.approx(0.7)


def test_2d_spacing_aware():
    ref = np.zeros((20, 20), bool)
    ref[5:15, 5:15] = True
    pred = ref.copy()
    pred[15, 5:15] = True
    assert surface_metrics(pred, ref, (1.5, 0.5), 1.0)[0] == pytest.approx(1.5)


def test_empty_mask_rules():
    empty = np.zeros((4, 5, 6), bool)
    full = empty.copy()
    full[1, 1, 1] = True
    assert surface_metrics(empty, empty, (2.0, 1.0, 1.0), 1.0) == (0.0, 1.0)
    diag = np.sqrt((4 * 2.0) ** 2 + 5 ** 2 + 6 ** 2)
    assert surface_metrics(empty, full, (2.0, 1.0, 1.0), 1.0) == (pytest.approx(diag), 0.0)
    assert surface_metrics(full, empty, (2.0, 1.0, 1.0), 1.0) == (pytest.approx(diag), 0.0)


def test_ece_known_answers():
    conf = np.array([0.95] * 10 + [0.55] * 10)
    correct = np.array([1] * 10 + [1] * 5 + [0] * 5)
    # bin of 0.95: acc 1.0 vs conf 0.95; bin of 0.55: acc 0.5 vs conf 0.55 -> (10*0.05 + 10*0.05) / 20
    assert ece_from_bins(calibration_bins(conf, correct)) == pytest.approx(0.05)
    assert ece_from_bins(calibration_bins(np.ones(5), np.ones(5))) == pytest.approx(0.0)


def test_auroc_known_answers():
    u = np.array([0.9, 0.8, 0.1, 0.2, 0.3])
    wrong = np.array([1, 1, 0, 0, 0], bool)
    assert auroc_from_histograms(uncertainty_counts(u, wrong)["counts"]) == pytest.approx(1.0)
    assert auroc_from_histograms(uncertainty_counts(u, ~wrong)["counts"]) == pytest.approx(0.0)
    assert auroc_from_histograms(uncertainty_counts(np.full(4, 0.5), np.array([1, 0, 1, 0], bool))["counts"]) == 0.5
    assert np.isnan(auroc_from_histograms(uncertainty_counts(u, np.zeros(5, bool))["counts"]))


def _write(arr, path, spacing, dtype=np.uint8):
    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, path)


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        r = np.zeros((6, 16, 16), np.uint8)
        r[2:4, 4:10, 4:10] = 1
        r[1:3, 11:14, 11:14] = 2
        p = r.copy()
        p[4, 4:10, 4:10] = 1  # one extra slice of label 1
        if i == 2:
            p[p == 2] = 0  # label 2 missed entirely in one case
        _write(r, str(ref / f"c{i}.nii.gz"), (1.0, 1.0, 3.0))
        _write(p, str(pred / f"c{i}.nii.gz"), (1.0, 1.0, 3.0))
        probs = np.stack([(p == k).astype(np.float32) * 0.8 + 0.1 for k in range(3)])
        probs /= probs.sum(0, keepdims=True)
        np.savez(str(pred / f"c{i}.npz"), probabilities=probs)
        unc = (p != r).astype(np.float32) * 0.9 + rng.uniform(0, 0.05, r.shape).astype(np.float32)
        _write(unc, str(pred / f"c{i}_uncertainty.nii.gz"), (1.0, 1.0, 3.0), np.float32)
    dj = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
          "numTraining": 3}
    json.dump(dj, open(tmp_path / "dataset.json", "w"))
    return str(ref), str(pred), str(tmp_path / "dataset.json")


def test_evaluate_cli_matches_nnunet_and_adds_surface_metrics(folders, capsys):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    ref, pred, dj = folders
    out = os.path.join(pred, "ours.json")
    evaluate.main(["-ref", ref, "-pred", pred, "-djfile", dj, "-o", out, "-np", "1"])
    ours = json.load(open(out))
    # nnU-Net's own evaluation on the same folder (minus our extra files)
    clean = os.path.join(os.path.dirname(pred), "clean")
    os.makedirs(clean)
    for f in os.listdir(pred):
        if f.endswith(".nii.gz") and "uncertainty" not in f:
            os.link(os.path.join(pred, f), os.path.join(clean, f))
    theirs = compute_metrics_on_folder(ref, clean, None, SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1)
    for label in (1, 2):
        for m in ("Dice", "IoU", "TP", "FP", "FN"):
            assert ours["mean"][str(label)][m] == pytest.approx(theirs["mean"][label][m])
    assert ours["foreground_mean"]["Dice"] == pytest.approx(theirs["foreground_mean"]["Dice"])
    case0 = ours["metric_per_case"][0]["metrics"]
    assert case0["1"]["HD95"] == pytest.approx(3.0) and case0["2"]["HD95"] == 0.0
    missed = ours["metric_per_case"][2]["metrics"]["2"]
    assert missed["Dice"] == 0 and missed["NSD"] == 0
    assert missed["HD95"] == pytest.approx(np.sqrt(18 ** 2 + 16 ** 2 + 16 ** 2))
    unc = ours["uncertainty"]
    assert unc["AUROC_uncertainty_vs_error"] > 0.99 and 0 <= unc["ECE"] <= 1
    printed = capsys.readouterr().out
    assert "HD95" in printed and "AUROC" in printed


def test_evaluate_cli_uncertainty_keys_and_plots(folders, capsys):
    from sklearn.metrics import roc_auc_score
    ref, pred, dj = folders
    out = os.path.join(pred, "eval", "summary.json")
    os.makedirs(os.path.dirname(out))
    evaluate.main(["-ref", ref, "-pred", pred, "-djfile", dj, "-o", out, "-np", "1", "--plots"])
    unc = json.load(open(out))["uncertainty"]
    read = {f: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(d, f"c{i}{s}.nii.gz"))).ravel()
            for i in range(3) for d, s, f in ((ref, "", f"r{i}"), (pred, "", f"p{i}"), (pred, "_uncertainty", f"u{i}"))}
    wrong = np.concatenate([read[f"p{i}"] != read[f"r{i}"] for i in range(3)])
    u = np.concatenate([read[f"u{i}"] for i in range(3)])
    assert unc["AUROC_uncertainty_vs_error"] == pytest.approx(roc_auc_score(wrong, u), abs=1e-12)
    assert unc["AUROC_max_error"] == 0 and 0 <= unc["AUROC_binned_1000"] <= 1
    # within each predicted label, against scikit-learn on that label's voxels (None: no error or no correct one)
    pred_labels = np.concatenate([read[f"p{i}"] for i in range(3)])
    expected = {}
    for c in np.unique(pred_labels):
        m = pred_labels == c
        expected[str(c)] = (pytest.approx(roc_auc_score(wrong[m], u[m]), abs=1e-12)
                            if 0 < wrong[m].sum() < m.sum() else None)
    assert unc["AUROC_within_predicted_label"] == expected and any(v is not None for v in expected.values())
    scored = [roc_auc_score(wrong[pred_labels == c], u[pred_labels == c]) for c in np.unique(pred_labels)
              if 0 < wrong[pred_labels == c].sum() < (pred_labels == c).sum()]
    assert unc["AUROC_within_label_mean"] == pytest.approx(np.mean(scored), abs=1e-12)
    assert unc["error_rate"] == pytest.approx(126 / 4608)  # 3 x 36 extra label-1 voxels + 18 missed label-2
    assert unc["AURC"] == pytest.approx(unc["AURC_optimal"], abs=1e-9)  # every error above every correct voxel
    # probabilities 0.9/1.1 for the predicted class, 0.1/1.1 for the others: correct voxels 6/121, wrong 182/121
    assert unc["Brier"] == pytest.approx((126 * 182 + (4608 - 126) * 6) / (121 * 4608))
    # uncertainty > 0.5 exactly on the 126 errors; label 1 has 108 of them, label 2 18
    assert unc["uncertainty_error_dice"] == {"1": pytest.approx(216 / 234), "2": pytest.approx(36 / 144)}
    assert sum(unc["reliability"]["bin_counts"]) == 4608
    assert unc["plots"] == ["reliability.png", "risk_coverage.png"]
    for name in unc["plots"]:
        path = os.path.join(pred, "eval", name)
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image
        assert matplotlib.image.imread(path).ndim == 3
    assert sorted(os.listdir(os.path.dirname(out))) == ["reliability.png", "risk_coverage.png", "summary.json"]
    assert "risk_coverage.png" in capsys.readouterr().out


def test_evaluate_cli_errors(folders, tmp_path, capsys):
    ref, pred, dj = folders
    os.remove(os.path.join(ref, "c1.nii.gz"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["-ref", ref, "-pred", pred, "-djfile", dj, "-np", "1"])
    assert e.value.code == 2 and "c1.nii.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["-ref", str(tmp_path / "nope"), "-pred", pred, "-djfile", dj])
    assert "nope: folder not found" in capsys.readouterr().err


def test_evaluate_cli_region_dataset_uncertainty(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for i in range(2):
        r = np.zeros((4, 8, 8), np.uint8)
        r[1:3, 2:6, 2:6] = 1
        r[1:3, 3:5, 3:5] = 2
        p = r.copy()
        p[3, 2:6, 2:6] = 1  # 16 extra voxels of region (1, 2), none of region (2,)
        _write(r, str(ref / f"c{i}.nii.gz"), (1.0, 1.0, 1.0))
        _write(p, str(pred / f"c{i}.nii.gz"), (1.0, 1.0, 1.0))
        probs = np.stack([np.where(p >= 1, 0.9, 0.1), np.where(p == 2, 0.8, 0.2)]).astype(np.float32)
        np.savez(str(pred / f"c{i}.npz"), probabilities=probs)
    dj = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2],
          "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 2}
    json.dump(dj, open(tmp_path / "dataset.json", "w"))
    evaluate.main(["-ref", str(ref), "-pred", str(pred), "-djfile", str(tmp_path / "dataset.json"), "-np", "1"])
    unc = json.load(open(pred / "summary.json"))["uncertainty"]
    # per case: region (1, 2) 240 right at 0.1^2 and 16 wrong at 0.9^2, region (2,) 256 right at 0.2^2; 512 terms
    assert unc["Brier"] == pytest.approx((240 * 0.01 + 16 * 0.81 + 256 * 0.04) / 512)
    # the entropy map (about 0.595 everywhere) exceeds 0.5 on all 2 x 256 voxels; region (1, 2) has 32 errors
    assert unc["uncertainty_error_dice"] == {"(1, 2)": pytest.approx(64 / 544), "2": 0.0}


def test_within_label_auroc_by_hand():
    """Predicted label 0: u 0.1 wrong, 0.2 correct -> AUROC 0. Label 1, split over two cases: 0.3 wrong, 0.8
    correct (case 0), 0.9 wrong (case 1) -> pairs (0.3 < 0.8, 0.9 > 0.8) = 1/2. Label 2: no error -> None. The
    unweighted mean over labels is (0 + 1/2) / 2 = 1/4, not the pooled AUROC (errors 0.1, 0.3, 0.9 against 0.2,
    0.8, 0.2 ...) nor a voxel-weighted mean (2/5 x 0 + 3/5 x 1/2 = 0.3)."""
    from diffnnunet.evaluation.uncertainty import uncertainty_counts, within_label_auroc
    case0 = {0: uncertainty_counts(np.array([0.1, 0.2]), np.array([True, False])),
             1: uncertainty_counts(np.array([0.3, 0.8]), np.array([True, False])),
             2: uncertainty_counts(np.array([0.4, 0.7]), np.array([False, False]))}
    case1 = {1: uncertainty_counts(np.array([0.9]), np.array([True]))}
    got = within_label_auroc([case0, case1])
    assert got["AUROC_within_predicted_label"] == {"0": 0.0, "1": 0.5, "2": None}
    assert got["AUROC_within_label_mean"] == pytest.approx(0.25)
    assert within_label_auroc([{2: case0[2]}]) == {"AUROC_within_predicted_label": {"2": None},
                                                   "AUROC_within_label_mean": None}
