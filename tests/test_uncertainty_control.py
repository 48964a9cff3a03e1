"""The control of an exported uncertainty map (diffnnunet.inference.uncertainty_control): the margin of the
exported probabilities through the validation-fitted error curves, scored against the errors by hand."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from diffnnunet.inference.uncertainty_control import control_auroc, control_curves


def test_control_auroc_by_hand(tmp_path):
    """One 2D case of four voxels (1 x 1 x 4), two labels. Probabilities of class 1: 0.9, 0.6, 0.3, 0.45 -> the
    predicted labels 1, 1, 0, 0 and margin complements h = 1 - |2p - 1| = 0.2, 0.8, 0.6, 0.9. Reference 1, 0, 0,
    1: voxels 2 and 4 are wrong. The curves map label 0 to a constant 0.5 and label 1 to h itself (identity knots),
    each with the tie-break (e + 1e-4 h) / (1 + 1e-4): voxel values 0.2, 0.8 (label 1) and 0.5 + tiny x 0.6, 0.5 +
    tiny x 0.9 (label 0). Errors (0.8, 0.5+0.9 tiny) against correct (0.2, 0.5+0.6 tiny): 4 of 4 pairs ordered ->
    AUROC 1. Within labels: label 1 (0.8 wrong > 0.2) 1; label 0 (0.5+0.9t wrong > 0.5+0.6t) 1."""
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
    got = control_auroc(str(pred), str(ref), curves)
    assert got == {"AUROC_control": pytest.approx(1.0), "AUROC_control_within": pytest.approx(1.0)}
    # label 1's curve reversed: its wrong voxel (h 0.8 -> 0.2) now ranks below its correct one (0.2 -> 0.8), and
    # both below label 0's 0.5: pooled pairs (wrong 0.2, 0.5+0.9t vs correct 0.8, 0.5+0.6t) ordered 1 of 4
    curves["labels"]["1"]["error"] = [1.0, 0.0]
    got = control_auroc(str(pred), str(ref), curves)
    assert got["AUROC_control"] == pytest.approx(0.25) and got["AUROC_control_within"] == pytest.approx(0.5)
    assert control_auroc(str(pred), str(ref), None) == {"AUROC_control": None, "AUROC_control_within": None}


def test_control_curves_come_from_sampling_json(tmp_path):
    """The margin's curves: the error map itself when it reads the margin, its ``control`` when it reads the map,
    None without calibration."""
    curves = {"pooled": {"u": [0.0, 1.0], "error": [0.1, 0.2]}, "labels": {}}
    error_map = {"measure": "entropy", "inputs": "map", "pooled": {"u": [0.0], "error": [0.3]}, "labels": {},
                 "control": curves}
    (tmp_path / "sampling.json").write_text(json.dumps({"calibration": {"temperature": 1.0, "error_map": error_map}}))
    assert control_curves(str(tmp_path)) == curves
    error_map.update(inputs="confidence", measure="margin")
    del error_map["control"]
    (tmp_path / "sampling.json").write_text(json.dumps({"calibration": {"temperature": 1.0, "error_map": error_map}}))
    assert control_curves(str(tmp_path))["pooled"] == {"u": [0.0], "error": [0.3]}
    (tmp_path / "sampling.json").unlink()
    assert control_curves(str(tmp_path)) is None
