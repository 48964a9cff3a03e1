"""Per-label Dice and IoU exactly as nnU-Net counts them, HD95 and NSD from MONAI, spacing-aware in 2D and 3D.

Empty-mask conventions (documentation/evaluation.md): both empty -> Dice NaN (left out of means, as nnU-Net),
HD95 0, NSD 1; exactly one empty -> Dice 0, HD95 = the image diagonal in mm, NSD 0.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings

import numpy as np

DEFAULT_NSD_TOLERANCE_MM = 2.0


def _spatial(seg: np.ndarray, spacing) -> tuple[np.ndarray, list[float]]:
    """nnU-Net's ``(1, *spatial)`` arrays -> spatial array and spacing; 2D images (a first axis of size 1) -> 2D."""
    seg = seg[0]
    spacing = [float(s) for s in spacing]
    if seg.ndim == 3 and seg.shape[0] == 1:
        return seg[0], spacing[1:]
    return seg, spacing


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> tuple[float, float]:
    """(HD95 in mm, NSD at ``tolerance_mm``) of two boolean masks of the same shape (MONAI's surface distances)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return 0.0, 1.0
    if not pred.any() or not ref.any():
        return float(np.sqrt(np.sum((np.array(pred.shape) * np.array(spacing)) ** 2))), 0.0
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI's deprecation notices about its own internals
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(torch.cat([~p, p], 1), torch.cat([~r, r], 1),
                                   class_thresholds=[float(tolerance_mm)], include_background=False, spacing=spacing)
    return float(hd95.item()), float(nsd.item())


def compute_case_metrics(reference_file: str, prediction_file: str, image_reader_writer, labels_or_regions,
                         ignore_label: int | None = None, nsd_tolerance: dict | float = DEFAULT_NSD_TOLERANCE_MM,
                         uncertainty: bool = False, has_regions: bool = False) -> dict:
    """nnU-Net's ``compute_metrics`` (same keys and counts) plus ``HD95`` and ``NSD`` per label or region, and, with
    ``uncertainty``, the case's pooling statistics (private keys, see ``_uncertainty_stats``)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

    seg_ref, props = image_reader_writer.read_seg(reference_file)
    seg_pred, _ = image_reader_writer.read_seg(prediction_file)
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(f"{prediction_file}: shape {seg_pred.shape[1:]} differs from the reference "
                         f"{seg_ref.shape[1:]} ({reference_file})")
    ignore = seg_ref == ignore_label if ignore_label is not None else None
    spacing = _spatial(seg_ref, props["spacing"])[1]
    results = {"reference_file": reference_file, "prediction_file": prediction_file, "metrics": {}}
    for r in labels_or_regions:
        mask_ref = region_or_label_to_mask(seg_ref, r)
        mask_pred = region_or_label_to_mask(seg_pred, r)
        tp, fp, fn, tn = compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore)
        m = {"Dice": np.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
             "IoU": np.nan if tp + fp + fn == 0 else tp / (tp + fp + fn),
             "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}
        if ignore is not None:
            mask_pred = mask_pred & ~ignore
            mask_ref = mask_ref & ~ignore
        tol = nsd_tolerance.get(str(r), nsd_tolerance.get("default", DEFAULT_NSD_TOLERANCE_MM)) \
            if isinstance(nsd_tolerance, dict) else nsd_tolerance
        m["HD95"], m["NSD"] = surface_metrics(_spatial(mask_pred, props["spacing"])[0],
                                              _spatial(mask_ref, props["spacing"])[0], spacing, tol)
        results["metrics"][r] = m
    if uncertainty:
        results.update(_uncertainty_stats(prediction_file, seg_ref, seg_pred, ignore, labels_or_regions,
                                          has_regions))
    return results


def _uncertainty_stats(prediction_file, seg_ref, seg_pred, ignore, labels_or_regions, has_regions) -> dict:
    """Per-case statistics that pool exactly over cases (ignore label excluded): from CASE.npz ``_ece_bins``
    ``(3, 15)`` and ``_brier`` ``(2,)``; from CASE_uncertainty (or the npz's entropy) ``_unc_counts`` (wrong and
    correct voxels per distinct uncertainty value), the same per predicted label ``_unc_counts_by_label`` and
    ``_overlap`` ``(L, 3)``, per label or region the counts of
    uncertainty > ``OVERLAP_THRESHOLD`` vs that label's errors (prediction != reference for the label)."""
    import SimpleITK as sitk
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    from diffnnunet.config import UNCERTAINTY_SUFFIX
    from diffnnunet.evaluation.uncertainty import (
        OVERLAP_THRESHOLD,
        brier_sums,
        calibration_bins,
        confidence_and_correctness,
        counts_by_label,
        normalized_entropy,
        overlap_counts,
        uncertainty_counts,
    )

    base, ending = _split_ending(prediction_file)
    out = {}
    valid = np.ones(seg_ref.shape[1:], bool) if ignore is None else ~ignore[0]
    probs = None
    if os.path.isfile(base + ".npz"):
        probs = np.load(base + ".npz")["probabilities"]
        conf, correct = confidence_and_correctness(probs, seg_ref[0], labels_or_regions, has_regions)
        keep = np.broadcast_to(valid, conf.shape)
        out["_ece_bins"] = calibration_bins(conf[keep], correct[keep])
        out["_brier"] = brier_sums(probs, seg_ref[0], labels_or_regions, has_regions, valid)
    unc_file = base + UNCERTAINTY_SUFFIX + ending
    if os.path.isfile(unc_file):
        unc = sitk.GetArrayFromImage(sitk.ReadImage(unc_file)).reshape(seg_ref.shape[1:])
    elif probs is not None:
        unc = normalized_entropy(probs, has_regions)
    else:
        return out
    wrong = seg_pred[0] != seg_ref[0]
    out["_unc_counts"] = uncertainty_counts(unc[valid], wrong[valid])
    out["_unc_counts_by_label"] = counts_by_label(unc, wrong, seg_pred[0], valid)
    uncertain = (unc > OVERLAP_THRESHOLD) & valid
    out["_overlap"] = np.stack([overlap_counts(uncertain, (region_or_label_to_mask(seg_pred[0], r)
                                                           != region_or_label_to_mask(seg_ref[0], r)) & valid)
                                for r in labels_or_regions])
    return out


def pool_uncertainty(results: list[dict], labels_or_regions) -> tuple[dict | None, dict]:
    """Pop the private per-case statistics from ``results`` and pool them: (the summary's ``uncertainty`` section
    or None when no case had any, the pooled statistics for the plots: ``ece_bins``, ``counts``)."""
    from diffnnunet.evaluation.uncertainty import (
        OVERLAP_THRESHOLD,
        aurc_from_counts,
        auroc_from_histograms,
        auroc_tie_bound,
        binned_auroc,
        dice_from_overlap,
        ece_from_bins,
        merge_counts,
        optimal_aurc,
        within_label_auroc,
    )

    got = {k: [c.pop(k) for c in results if k in c]
           for k in ("_ece_bins", "_brier", "_unc_counts", "_overlap", "_unc_counts_by_label")}
    if not any(got.values()):
        return None, {}
    section, pooled = {}, {}
    if got["_ece_bins"]:
        bins = pooled["ece_bins"] = sum(got["_ece_bins"])
        brier = sum(got["_brier"])
        section["ECE"] = ece_from_bins(bins)
        section["Brier"] = float(brier[0] / brier[1]) if brier[1] else float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            section["reliability"] = {"bin_counts": bins[0].astype(np.int64).tolist(),
                                      "mean_confidence": (bins[1] / bins[0]).tolist(),
                                      "accuracy": (bins[2] / bins[0]).tolist()}
    else:
        section["ECE"] = section["Brier"] = None
    if got["_unc_counts"]:
        counts = pooled["counts"] = merge_counts(got["_unc_counts"])
        n_err, n_all = float(counts["counts"][0].sum()), float(counts["counts"].sum())
        overlap = sum(got["_overlap"])
        section.update({
            "AUROC_uncertainty_vs_error": auroc_from_histograms(counts["counts"]),
            "AUROC_max_error": auroc_tie_bound(counts),
            "AUROC_binned_1000": binned_auroc(counts),
            "AURC": aurc_from_counts(counts),
            "AURC_optimal": optimal_aurc(n_err, n_all),
            "error_rate": n_err / n_all if n_all else float("nan"),
            "uncertainty_error_dice": {str(r): dice_from_overlap(o) for r, o in zip(labels_or_regions, overlap)},
            "uncertainty_threshold": OVERLAP_THRESHOLD,
            **within_label_auroc(got["_unc_counts_by_label"]),
        })
    else:
        section["AUROC_uncertainty_vs_error"] = None
    section["n_cases"] = max(len(v) for v in got.values())
    return section, pooled


def _split_ending(path: str) -> tuple[str, str]:
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff"):
        if path.endswith(ending):
            return path[: -len(ending)], ending
    base, ext = os.path.splitext(path)
    return base, ext


def evaluate_folder(folder_ref: str, folder_pred: str, output_file: str | None, image_reader_writer,
                    file_ending: str, labels_or_regions, ignore_label: int | None = None, num_processes: int = 2,
                    nsd_tolerance: dict | float = DEFAULT_NSD_TOLERANCE_MM, has_regions: bool = False,
                    chill: bool = True, plots: bool = False) -> dict:
    """nnU-Net's summary.json (metric_per_case, mean, foreground_mean) with HD95 and NSD, plus an
    ``uncertainty`` section (pooled over all voxels: ECE, Brier, exact AUROC, AURC, per-label uncertainty-error
    Dice) when probabilities or uncertainty maps are present. ``plots``: also write reliability.png and
    risk_coverage.png beside ``output_file`` (their names listed under ``uncertainty.plots``)."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    from diffnnunet.config import UNCERTAINTY_SUFFIX

    preds = sorted(f for f in os.listdir(folder_pred) if f.endswith(file_ending) and not f.startswith(".")
                   and not f.endswith(UNCERTAINTY_SUFFIX + file_ending))
    missing = [f for f in preds if not os.path.isfile(os.path.join(folder_ref, f))]
    if missing:
        raise FileNotFoundError(f"{os.path.join(folder_ref, missing[0])}: no reference for prediction {missing[0]}")
    if not chill:
        refs = [f for f in os.listdir(folder_ref) if f.endswith(file_ending)]
        absent = sorted(set(refs) - set(preds))
        if absent:
            raise FileNotFoundError(f"{os.path.join(folder_pred, absent[0])}: prediction missing")
    if not preds:
        raise FileNotFoundError(f"{folder_pred}: no predictions ending with {file_ending}")
    args = [(os.path.join(folder_ref, f), os.path.join(folder_pred, f), image_reader_writer, labels_or_regions,
             ignore_label, nsd_tolerance, True, has_regions) for f in preds]
    if num_processes > 1 and len(args) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(args))) as pool:
            results = pool.starmap(compute_case_metrics, args)
    else:
        results = [compute_case_metrics(*a) for a in args]
    names = list(results[0]["metrics"][labels_or_regions[0]].keys())
    means = {r: {m: float(np.nanmean([c["metrics"][r][m] for c in results])) if not all(
        np.isnan(c["metrics"][r][m]) for c in results) else float("nan") for m in names} for r in labels_or_regions}
    foreground = {m: float(np.mean([means[r][m] for r in means if r not in (0, "0")])) for m in names}
    summary = {"metric_per_case": results, "mean": means, "foreground_mean": foreground}
    section, pooled = pool_uncertainty(results, labels_or_regions)
    if section is not None:
        summary["uncertainty"] = section
        if plots and output_file is not None:
            from diffnnunet.evaluation.plots import write_plots
            section["plots"] = write_plots(os.path.dirname(os.path.abspath(output_file)), pooled, section)
    [recursive_fix_for_json_export(c) for c in results]
    recursive_fix_for_json_export(summary)
    if output_file is not None:
        from diffnnunet.utils import atomic_outputs, partial_path
        with atomic_outputs() as written:
            written.append(os.path.abspath(output_file))
            save_summary_json(summary, partial_path(written[-1]))
    return summary


def compute_metrics_on_folder_with_surfaces(folder_ref, folder_pred, output_file, image_reader_writer, file_ending,
                                            regions_or_labels, ignore_label=None, num_processes=2, chill=True):
    """Drop-in for nnU-Net's ``compute_metrics_on_folder`` used by the fold's final validation."""
    has_regions = any(isinstance(r, (tuple, list)) for r in regions_or_labels)
    return evaluate_folder(folder_ref, folder_pred, output_file, image_reader_writer, file_ending,
                           list(regions_or_labels), ignore_label, num_processes, has_regions=has_regions,
                           chill=chill)
