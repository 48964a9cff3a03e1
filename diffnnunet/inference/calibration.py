"""Temperature scaling of the exported class probabilities, fitted on a fold's validation cases (Guo et al. 2017).

The predictor hands nnU-Net's export logits z (:func:`~diffnnunet.inference.predictor.probabilities_to_logits`),
which nnU-Net turns into probabilities with a softmax (labels) or a sigmoid (regions). Temperature scaling
divides them by one scalar T > 0 before that: p = softmax(z / T). T > 1 softens over-confident probabilities,
T < 1 sharpens under-confident ones; the argmax, hence the segmentation, is unchanged (for regions the 0.5
threshold of sigmoid(z / T) is unchanged as well).

The fit is one-dimensional. Guo et al. minimise the negative log-likelihood of the validation voxels' reference
labels (:func:`fit_temperature`, a bounded search over log T); that is the right criterion when the probabilities
are smooth, but diffusion exports are often near-binary (BerDiff's sample frequencies, STAPLE posteriors), where
a few confidently wrong voxels dominate the NLL and its T can raise the ECE (measured: BerDiff on the demo, ECE
0.076 -> 0.130 at the NLL's T = 2.95). :func:`calibrate` therefore keeps the T of the lowest validation ECE among
the NLL's T, T = 1 and a log-spaced grid over [T_MIN, T_MAX] (:data:`GRID`), so the fit never makes the
validation ECE worse.
"""
from __future__ import annotations

import math

import numpy as np
import torch

#: search range of T
T_MIN, T_MAX = 0.05, 20.0
#: log-spaced candidates searched for the lowest validation ECE (ratio 1.08 between neighbours)
GRID = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 79))
#: validation voxels kept per case for the fit (a seeded random subset; all when the case is smaller)
VOXELS_PER_CASE = 50_000


def sample_voxels(logits: torch.Tensor, reference: np.ndarray, label_manager, rng: np.random.Generator,
                  max_voxels: int = VOXELS_PER_CASE) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` ``(C, *spatial)``, ``reference`` ``(*spatial)`` label ids -> (logits ``(n, C)``, targets): label
    ids ``(n,)`` for labels, region masks ``(n, R)`` for regions; ignore-label voxels left out."""
    z = logits.float().cpu().reshape(logits.shape[0], -1).T.numpy()
    ref = np.asarray(reference).reshape(-1)
    keep = np.ones(ref.shape, bool) if label_manager.ignore_label is None else ref != label_manager.ignore_label
    idx = np.flatnonzero(keep)
    if idx.size > max_voxels:
        idx = np.sort(rng.choice(idx, max_voxels, replace=False))
    if label_manager.has_regions:
        target = np.stack([np.isin(ref[idx], r) for r in label_manager.foreground_regions], 1).astype(np.float32)
    else:
        target = ref[idx].astype(np.int64)
    return z[idx], target


def nll(logits: np.ndarray, target: np.ndarray, temperature: float, has_regions: bool) -> float:
    """Mean negative log-likelihood of ``target`` under softmax(z / T) (labels, ``target`` ``(n,)`` ids) or
    sigmoid(z / T) (regions, ``target`` ``(n, R)`` in {0, 1}, averaged over regions)."""
    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float64)) / temperature
    if has_regions:
        y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float64))
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))
    return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(target)))


def fit_temperature(logits: np.ndarray, target: np.ndarray, has_regions: bool) -> float:
    """argmin_T NLL(T) over [T_MIN, T_MAX] (bounded Brent search on log T)."""
    from scipy.optimize import minimize_scalar
    result = minimize_scalar(lambda log_t: nll(logits, target, math.exp(log_t), has_regions),
                             bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                             options={"xatol": 1e-4})
    return float(math.exp(result.x))


def expected_calibration_error(logits: np.ndarray, target: np.ndarray, temperature: float,
                               has_regions: bool) -> float:
    """ECE (15 equal-width bins, as diffnnunet_evaluate) of the predicted class (labels) or of each region's
    binary decision (regions) under the temperature."""
    from diffnnunet.evaluation.uncertainty import calibration_bins, ece_from_bins
    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float64)) / temperature
    if has_regions:
        p = torch.sigmoid(z).numpy()
        return ece_from_bins(calibration_bins(np.maximum(p, 1 - p), (p > 0.5) == (target > 0.5)))
    p = torch.softmax(z, 1).numpy()
    return ece_from_bins(calibration_bins(p.max(1), p.argmax(1) == target))


def calibrate(samples: list, has_regions: bool) -> dict:
    """``samples``: (logits, target) pairs of :func:`sample_voxels` -> ``{"temperature", "temperature_nll",
    "ece_before", "ece_after", "nll_before", "nll_after", "voxels"}`` on the pooled voxels: ``temperature`` is the
    lowest-ECE candidate of the NLL fit, 1 and :data:`GRID` (module docstring; the first of equal ECEs in that
    order), ``temperature_nll`` the NLL fit's."""
    z = np.concatenate([s[0] for s in samples])
    y = np.concatenate([s[1] for s in samples])
    t_nll = fit_temperature(z, y, has_regions)
    candidates = [t_nll, 1.0, *(float(t) for t in GRID)]
    eces = [expected_calibration_error(z, y, t, has_regions) for t in candidates]
    best = int(np.argmin(eces))
    t = candidates[best]
    return {"temperature": t, "temperature_nll": t_nll, "ece_before": eces[1], "ece_after": eces[best],
            "nll_before": nll(z, y, 1.0, has_regions), "nll_after": nll(z, y, t, has_regions),
            "voxels": int(len(y))}
