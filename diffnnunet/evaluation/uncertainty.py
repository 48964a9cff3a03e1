"""Uncertainty quality, accumulated as fixed-bin statistics so whole datasets pool without keeping voxels.

ECE (Guo et al. 2017): sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins of the predicted class
probability. AUROC: probability that a wrongly labelled voxel has higher uncertainty than a correct one (ties,
i.e. the same bin, count one half), from histograms of the uncertainty of wrong and correct voxels.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15
AUROC_BINS = 1000


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """``(3, n_bins)``: voxel count, summed confidence and summed correctness per confidence bin."""
    confidence = np.clip(confidence.ravel().astype(np.float64), 0, 1)
    correct = correct.ravel().astype(np.float64)
    idx = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    return np.stack([np.bincount(idx, minlength=n_bins), np.bincount(idx, confidence, n_bins),
                     np.bincount(idx, correct, n_bins)])


def ece_from_bins(bins: np.ndarray) -> float:
    counts, conf, acc = bins
    total = counts.sum()
    if total == 0:
        return float("nan")
    nz = counts > 0
    return float(np.sum(np.abs(acc[nz] - conf[nz])) / total)


def uncertainty_histograms(uncertainty: np.ndarray, wrong: np.ndarray, n_bins: int = AUROC_BINS) -> np.ndarray:
    """``(2, n_bins)``: histograms of uncertainty in [0, 1] for wrong (row 0) and correct (row 1) voxels."""
    u = np.clip(uncertainty.ravel().astype(np.float64), 0, 1)
    idx = np.minimum((u * n_bins).astype(np.int64), n_bins - 1)
    wrong = wrong.ravel().astype(bool)
    return np.stack([np.bincount(idx[wrong], minlength=n_bins), np.bincount(idx[~wrong], minlength=n_bins)])


def auroc_from_histograms(hist: np.ndarray) -> float:
    """P(u_wrong > u_correct) + 0.5 P(same bin); NaN when either group is empty."""
    wrong, right = hist.astype(np.float64)
    if wrong.sum() == 0 or right.sum() == 0:
        return float("nan")
    right_below = np.concatenate([[0.0], np.cumsum(right)[:-1]])
    return float((np.sum(wrong * right_below) + 0.5 * np.sum(wrong * right)) / (wrong.sum() * right.sum()))


def confidence_and_correctness(probabilities: np.ndarray, reference: np.ndarray, labels_or_regions, has_regions):
    """Predicted-class probability and whether the predicted class is right, per voxel (per region and voxel
    for region-based datasets). ``probabilities``: ``(C, *spatial)``; ``reference``: ``(*spatial)`` label ids."""
    if not has_regions:
        pred = probabilities.argmax(0)
        return probabilities.max(0), pred == reference
    conf, correct = [], []
    for p, region in zip(probabilities, labels_or_regions):
        ref = np.isin(reference, region)
        conf.append(np.maximum(p, 1 - p))
        correct.append((p > 0.5) == ref)
    return np.stack(conf), np.stack(correct)
