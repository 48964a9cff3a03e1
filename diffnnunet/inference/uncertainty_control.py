"""The control of an exported uncertainty map: the exported probabilities' own margin, recalibrated per predicted
label by the same error-map curves fitted on the validation cases (issue: "a diffusion map counts as better only
where its exported map beats nnU-Net's exported map and its own control"). Used by the demo and the benchmark
suite next to the raw map (``--raw_uncertainty``) and the exported map.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from diffnnunet.evaluation.uncertainty import (
    auroc_from_histograms,
    counts_by_label,
    merge_counts,
    uncertainty_counts,
    within_label_auroc,
)
from diffnnunet.inference.calibration import apply_error_map, load_tuned_sampling
from diffnnunet.inference.find_best_uncertainty import margin


def control_curves(model_folder: str) -> dict | None:
    """The margin's per-label error curves of a calibrated model folder (sampling.json): the error map itself
    when the tuning chose the margin (``inputs`` ``confidence``; always for nnUNetTrainer), its ``control``
    curves when it chose the chains' map; None when the folder has no error map or (an earlier version's fit)
    no control."""
    error_map = (load_tuned_sampling(model_folder) or {}).get("error_map")
    if not error_map:
        return None
    return error_map if error_map.get("inputs") == "confidence" else error_map.get("control")


def control_auroc(prediction_folder: str, reference_folder: str, curves: dict | None) -> dict:
    """``AUROC_control`` and ``AUROC_control_within`` of a prediction folder (CASE.nii.gz + CASE.npz, the exported
    probabilities ``(C, *spatial)``) against the references: the margin complement h of the probabilities
    (:func:`~diffnnunet.inference.find_best_uncertainty.margin`, as find_best scores a row's margin) through the
    per-label error-map ``curves`` (``apply_error_map``); both None without curves."""
    if not curves:
        return {"AUROC_control": None, "AUROC_control_within": None}
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    dj = json.load(open(os.path.join(prediction_folder, "dataset.json")))
    lm = LabelManager(dj["labels"], dj.get("regions_class_order"))
    ending, rw = dj["file_ending"], SimpleITKIO()
    pooled, by_label = [], []
    for f in sorted(os.listdir(prediction_folder)):
        if not f.endswith(".npz"):
            continue
        case = f[:-len(".npz")]
        seg = rw.read_seg(os.path.join(prediction_folder, case + ending))[0][0]
        ref = rw.read_seg(os.path.join(reference_folder, case + ending))[0][0]
        h = margin(np.load(os.path.join(prediction_folder, f))["probabilities"], lm.has_regions)
        h = apply_error_map(torch.from_numpy(h), torch.from_numpy(seg), curves).numpy()
        valid = np.ones(ref.shape, bool) if lm.ignore_label is None else ref != lm.ignore_label
        wrong = seg != ref
        pooled.append(uncertainty_counts(h[valid], wrong[valid]))
        by_label.append(counts_by_label(h, wrong, seg, valid))
    auroc = auroc_from_histograms(merge_counts(pooled)["counts"]) if pooled else float("nan")
    return {"AUROC_control": None if np.isnan(auroc) else auroc,
            "AUROC_control_within": within_label_auroc(by_label)["AUROC_within_label_mean"] if by_label else None}
