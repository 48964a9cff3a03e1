"""The pipeline picks its own sampling budget: validation Dice, ECE and uncertainty AUROC over a grid of steps x
samples, and the cheapest setting within a tolerance of the best on all three in turn (:func:`choose_budget`); at that
budget it also fits a temperature to the validation voxels (:mod:`~diffnnunet.inference.calibration`). Both are
stored as ``sampling.json`` in the model folder, where :class:`~diffnnunet.inference.predictor.DiffusionPredictor`
finds them (``--steps``/``--samples`` still win).

Dice is computed as nnU-Net's fold validation counts it (tp/fp/fn per foreground label or region, pooled over
the fold's validation cases, ignore label excluded), but in the preprocessed geometry: the cases are the fold's
preprocessed validation arrays, so no resampling or file I/O enters the comparison.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from tqdm import tqdm

from diffnnunet.config import DEFAULT_SAMPLES, DEFAULT_STEPS, SAMPLING_FILE
from diffnnunet.inference.calibration import load_tuned_sampling
from diffnnunet.utils import write_json

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_STEPS", "SAMPLING_FILE", "load_tuned_sampling", "tune_sampling", "choose_budget"]



def choose_budget(results: list, tolerance: float, auroc_tolerance: float = 0.005,
                  ece_tolerance: float = 0.01) -> dict:
    """``results``: dicts with ``steps``, ``samples``, ``dice`` and optionally ``auroc`` (uncertainty vs error) and
    ``ece``. The conditions apply in turn, each against the best of the settings that passed the previous ones:
    Dice within ``tolerance`` (a fraction: 0.005 = 0.5 Dice points) of the best Dice; among those, AUROC within
    ``auroc_tolerance`` of their best AUROC; among those, ECE within ``ece_tolerance`` of their lowest ECE. The
    cheapest (steps x samples network evaluations) survivor wins, ties on cost to the higher Dice. NaN metrics (no
    errors, no uncertainty map) constrain nothing.

    Each reference is taken among the survivors so that a setting outside the Dice tolerance cannot void a later
    condition: on MedSegDiff-V2's demo grid the best AUROC overall (10 x 4) was 0.006 too low in Dice, and measured
    against it no Dice-acceptable setting qualified, so a one-sample setting with no map (AUROC 0.5) won. The AUROC
    tolerance is tight because a small validation gap can hide a large test gap: Diff-UNet on the demo, 1 x 4 at
    0.934 against 2 x 4 at 0.9425 on 4 validation slices, was 0.806 against 0.912 on the 6 test slices
    (documentation/inference.md)."""
    def usable(r, key):
        v = r.get(key)
        return v is not None and not np.isnan(v)

    def keep(candidates, key, tol, higher_is_better):
        values = [r[key] for r in candidates if usable(r, key)]
        if not values:
            return candidates
        ref = max(values) if higher_is_better else min(values)
        return [r for r in candidates if not usable(r, key)
                or (r[key] >= ref - tol if higher_is_better else r[key] <= ref + tol)]

    top_dice = max(r["dice"] for r in results if usable(r, "dice"))
    ok = [r for r in results if r["dice"] >= top_dice - tolerance]  # a NaN Dice never passes
    ok = keep(ok, "auroc", auroc_tolerance, True)
    ok = keep(ok, "ece", ece_tolerance, False)
    return min(ok, key=lambda r: (r["steps"] * r["samples"], -r["dice"]))


def _counts(pred: np.ndarray, ref: np.ndarray, label_manager) -> np.ndarray:
    """(n_classes, 3) tp/fp/fn of label maps ``pred`` and ``ref`` (preprocessed geometry) per foreground class,
    counted by nnU-Net's own evaluation functions."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
    classes = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    ignore = None if label_manager.ignore_label is None else ref == label_manager.ignore_label
    return np.array([compute_tp_fp_fn_tn(region_or_label_to_mask(ref, c), region_or_label_to_mask(pred, c),
                                         ignore)[:3] for c in classes], dtype=np.int64).reshape(len(classes), 3)


def _dice(counts: np.ndarray) -> float:
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return float(np.nanmean(dice)) if np.any(denom > 0) else float("nan")


def load_preprocessed_case(dataset, key) -> tuple[torch.Tensor, np.ndarray]:
    """One preprocessed case of an nnU-Net dataset: the image ``(C, *spatial)`` float32 and the reference label map
    ``(*spatial)`` int16 with nnU-Net's -1 (outside the nonzero mask that cropping found) read as background 0, as
    nnU-Net's training transforms do (``RemoveLabelTansform(-1, 0)``). Every reader of preprocessed segmentations
    (the budget grid, the calibration, the error map) goes through here."""
    data, seg = dataset.load_case(key)[:2]
    ref = np.asarray(seg[:])[0].astype(np.int16)
    ref[ref < 0] = 0
    return torch.from_numpy(np.asarray(data[:], dtype=np.float32)), ref


def _predict(predictor, data: torch.Tensor, steps: int | None = None, samples: int | None = None) -> torch.Tensor:
    """Blended logits ``(C, *spatial)`` (+ the native map) of one preprocessed case; a diffusion model at a budget
    with the generator reset to the seed, the stock model as it predicts."""
    if predictor.diffusion is not None:
        predictor.steps_override, predictor.samples_override = steps, samples
        predictor.generator.manual_seed(int(predictor.seed if predictor.seed is not None
                                            else predictor.diffusion["seed"]))
    return predictor.predict_sliding_window_return_logits(data)


def _calibrate(passes: list, steps: int | None = None, samples: int | None = None) -> dict:
    """Temperature fitted on the validation voxels predicted at the chosen budget (a seeded voxel subset per case),
    then the error map (``error_map``; :func:`~diffnnunet.inference.calibration.fit_error_map`) of the native map
    or of the exported probabilities' margin at the fitted temperature, whichever finds held-out errors better
    (the stock model: the margin), with the validation AUROC of the raw input (``auroc_before``: the native map,
    or the margin without one) and the held-out AUROC of the error map (``auroc_after``)."""
    from diffnnunet.evaluation.uncertainty import auroc_from_histograms, uncertainty_counts
    from diffnnunet.inference.calibration import calibrate, error_voxels, exported_margin, fit_error_map, sample_voxels
    rng = np.random.default_rng(0)
    voxels, maps = [], []
    for predictor, dataset, keys in passes:
        lm = predictor.label_manager
        heads = lm.num_segmentation_heads
        for key in tqdm(keys, desc="calibration"):
            data, ref = load_preprocessed_case(dataset, key)
            out = _predict(predictor, data, steps, samples).float().cpu()
            voxels.append(sample_voxels(out[:heads], ref, lm, rng))
            pred = lm.convert_logits_to_segmentation(out[:heads])
            pred = pred.numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            native = out[heads].numpy() if out.shape[0] > heads else None
            maps.append(error_voxels(pred, native, ref, lm, rng, out[:heads]))
    has_regions = passes[0][0].label_manager.has_regions
    result = calibrate(voxels, has_regions)
    if any(m[2].any() for m in maps) and not all(m[2].all() for m in maps):
        # the exported probabilities' margin at the fitted temperature
        maps = [(*m[:3], exported_margin(torch.from_numpy(m[3].T) / result["temperature"], has_regions).numpy())
                for m in maps]
        predictor = passes[0][0]
        fit = fit_error_map(maps, predictor.uncertainty_measure if predictor.diffusion is not None else "margin")
        raw = 1 if maps[0][1] is not None else 3
        u, wrong = (np.concatenate([m[i] for m in maps]) for i in (raw, 2))
        fit["auroc_before"] = auroc_from_histograms(uncertainty_counts(u, wrong)["counts"])
        fit["auroc_after"] = fit["validation_auroc"][fit["inputs"]]  # held out: scored with the other half's fit
        result["error_map"] = fit
    return result


def validation_keys(preprocessed_dataset_folder: str, fold) -> list:
    """The fold's validation case identifiers from ``splits_final.json`` (fold 'all' has none)."""
    splits_file = join(preprocessed_dataset_folder, "splits_final.json")
    if fold == "all" or not os.path.isfile(splits_file):
        raise RuntimeError(f"{splits_file}: no validation split for fold {fold} (train a fold 0-4 first)")
    return list(load_json(splits_file)[int(fold)]["val"])


def tune_sampling(model_folder: str, preprocessed_dataset_folder: str, folds, steps_grid=DEFAULT_STEPS,
                  samples_grid=DEFAULT_SAMPLES, tolerance: float = 0.005, device=torch.device("cpu"),  # noqa: B008
                  checkpoint: str = "checkpoint_final.pth", max_cases: int | None = None, seed: int | None = None,
                  write: bool = True, calibration: bool = True, keep_budget: bool | None = None) -> dict:
    """Validation Dice, ECE and uncertainty AUROC (the chains' map in the plans' measure against the errors, exact)
    of every (steps, samples) in the grid on each fold's validation cases, the choice by :func:`choose_budget`; with
    ``calibration`` a temperature and an error map fitted at the chosen budget on the same cases; returns and
    (with ``write``) stores the choice in ``model_folder/sampling.json`` (atomically). A stock nnU-Net model has no
    budget: it gets the same calibration (temperature and the error map of its margin, predicted with its mirroring
    as diffnnunet_predict does by default), so that its uncertainty is compared like for like. ``keep_budget``
    (None: when the plans' ``recipe`` is ``paper``) skips the grid and keeps the plans' (published) budget: the
    summary stores it (``budget: "plans"``) with the calibration at that budget."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from diffnnunet.evaluation.uncertainty import (
        auroc_from_histograms,
        calibration_bins,
        confidence_and_correctness,
        ece_from_bins,
        merge_counts,
        uncertainty_counts,
    )
    from diffnnunet.inference.predictor import DiffusionPredictor

    grid = [(int(s), int(n)) for s in steps_grid for n in samples_grid]
    counts = {g: 0 for g in grid}
    ece_bins = {g: 0 for g in grid}
    unc_counts = {g: [] for g in grid}
    cases_used = 0
    passes = []  # (predictor, dataset, keys) per fold, for the calibration pass at the chosen budget
    for fold in folds:
        predictor = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                       seed=seed, allow_tqdm=False, use_tuned_sampling=False,
                                       save_uncertainty=True)
        predictor.initialize_from_trained_model_folder(model_folder, [fold], checkpoint)
        stock = predictor.diffusion is None
        if stock and not calibration:
            raise RuntimeError(f"{model_folder}: not a diffusion model, there is no sampling budget to tune (its "
                               "calibration is all the tuning does for it)")
        predictor.use_mirroring = stock  # as diffnnunet_predict predicts by default: stock nnU-Net with its TTA
        data_folder = join(preprocessed_dataset_folder, predictor.configuration_manager.data_identifier)
        dataset = infer_dataset_class(data_folder)(data_folder)
        keys = validation_keys(preprocessed_dataset_folder, fold)[:max_cases]
        passes.append((predictor, dataset, keys))
        if keep_budget is None:
            keep_budget = not stock and predictor.diffusion["recipe"] == "paper"
        if stock or keep_budget:
            cases_used += len(keys)
            continue
        lm = predictor.label_manager
        for key in tqdm(keys, desc=f"fold {fold}: tuning {len(grid)} budgets"):
            data, ref = load_preprocessed_case(dataset, key)
            keep = np.ones(ref.shape, bool) if lm.ignore_label is None else ref != lm.ignore_label
            classes = lm.foreground_regions if lm.has_regions else lm.foreground_labels
            for steps, samples in grid:
                out = _predict(predictor, data, steps, samples).float().cpu()
                logits = out[:lm.num_segmentation_heads]
                pred = lm.convert_logits_to_segmentation(logits)
                pred = pred.numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
                counts[(steps, samples)] = counts[(steps, samples)] + _counts(pred, ref, lm)
                conf, correct = confidence_and_correctness(lm.apply_inference_nonlin(logits).numpy(), ref, classes,
                                                           lm.has_regions)
                mask = np.broadcast_to(keep, conf.shape)
                ece_bins[(steps, samples)] = ece_bins[(steps, samples)] + calibration_bins(conf[mask], correct[mask])
                if out.shape[0] > lm.num_segmentation_heads:  # the native map of the chains (entropy)
                    wrong = (pred != ref)[keep]
                    unc_counts[(steps, samples)].append(uncertainty_counts(out[-1].numpy()[keep], wrong))
            cases_used += 1
    if cases_used == 0:
        raise RuntimeError(f"{model_folder}: the folds {list(folds)} have no validation cases to tune on")
    if passes[0][0].diffusion is None:
        return _write_summary(model_folder, {"calibration": _calibrate(passes), "mirroring": True,
                                             "folds": [int(f) for f in folds], "cases": cases_used,
                                             "checkpoint": checkpoint, "geometry": "preprocessed"}, write)
    if keep_budget:
        return _write_summary(model_folder, _plans_budget(passes, calibration, folds, cases_used, checkpoint), write)
    results = [{"steps": s, "samples": n, "evaluations": s * n, "dice": _dice(counts[(s, n)]),
                "ece": ece_from_bins(ece_bins[(s, n)]),
                "auroc": (auroc_from_histograms(merge_counts(unc_counts[(s, n)])["counts"])
                          if unc_counts[(s, n)] else float("nan"))} for s, n in grid]
    if all(np.isnan(r["dice"]) for r in results):
        raise RuntimeError(f"{model_folder}: no foreground in the validation cases, Dice is undefined")
    results = [{**r, "dice": -1.0 if np.isnan(r["dice"]) else r["dice"]} for r in results]
    chosen = choose_budget(results, tolerance)
    summary = {"sampling_steps": chosen["steps"], "samples_per_step": chosen["samples"], "dice": chosen["dice"],
               "best": max(results, key=lambda r: r["dice"]), "tolerance": tolerance, "grid": results,
               "folds": [f if f == "all" else int(f) for f in folds], "cases": cases_used,
               "checkpoint": checkpoint, "geometry": "preprocessed"}
    if calibration:
        summary["calibration"] = _calibrate(passes, chosen["steps"], chosen["samples"])
    return _write_summary(model_folder, summary, write)


def _plans_budget(passes: list, calibration: bool, folds, cases: int, checkpoint: str) -> dict:
    """The summary that keeps the plans' budget (``--recipe paper``: the published steps x samples), with the
    calibration fitted at that budget."""
    diffusion = passes[0][0].diffusion
    steps, samples = int(diffusion["sampling_steps"]), int(diffusion["samples_per_step"])
    summary = {"sampling_steps": steps, "samples_per_step": samples, "budget": "plans",
               "recipe": diffusion["recipe"], "folds": [f if f == "all" else int(f) for f in folds],
               "cases": cases, "checkpoint": checkpoint, "geometry": "preprocessed"}
    if calibration:
        summary["calibration"] = _calibrate(passes, steps, samples)
    return summary


def _write_summary(model_folder: str, summary: dict, write: bool) -> dict:
    """``summary`` into ``model_folder/sampling.json`` (atomically) with ``write``; returns it."""
    if write:
        write_json(join(model_folder, SAMPLING_FILE), summary)
    return summary
