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

**The error map.** The native uncertainty maps rank voxels by the chains' entropy or disagreement, but a map's
level means different things under different predicted labels: on the demo, Diff-UNet's background voxels carry
an entropy floor of about 0.11 without a single error, while some grey-matter errors sit at 0.02, so the raw
entropy finds the errors with an AUROC of 0.62. :func:`fit_error_map` fits, per predicted label c on the
validation voxels, the isotonic (non-decreasing) regression e_c(u) of "the voxel is wrong" on the map u, over
bins of at least 100 voxels with rates shrunk towards the label's own (:func:`_isotonic_curve`);
:func:`apply_error_map` writes u' = (e_c(u) + eps u) / (1 + eps) instead, the estimated probability that the
voxel's label is wrong, with eps = :data:`TIE_BREAK` keeping the raw order inside each flat step of e_c. Within a
predicted label the ranking is the map's own; across labels it becomes comparable.

**Its input.** The chains' map is not the only per-voxel evidence the predictor has: the exported (temperature-
scaled) class probabilities carry their own confidence, h = 1 - (p_(1) - p_(2)), one minus the margin between the
two most probable classes (:func:`exported_margin`; nnU-Net's softmax entropy ranks voxels almost the same way).
:func:`fit_error_map` fits the same curves g_c(h) of the margin and keeps the input (``inputs``: ``map`` or
``confidence``) whose error map finds the errors better on validation cases it was not fitted on (two halves of
the cases, each scored with the curves of the other; ``validation_auroc``), the map on a tie; the stored curves are
then refitted on all cases. The stock nnU-Net model gets exactly this treatment with the margin as its only input
(and the same temperature fit), so that diffusion and nnU-Net uncertainty are compared after the same post-hoc
calibration. A logistic combination of both inputs was measured no better and removed.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from diffnnunet.config import SAMPLING_FILE

#: search range of T
T_MIN, T_MAX = 0.05, 20.0
#: log-spaced candidates searched for the lowest validation ECE (ratio 1.08 between neighbours)
GRID = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 79))
#: at most this many bins (knots) per label of an error map, each of at least ERROR_MAP_BIN voxels
ERROR_MAP_KNOTS = 64
ERROR_MAP_BIN = 100
#: pseudo-voxels at the label's own error rate added to every bin (shrinkage of sparse bins)
ERROR_MAP_PRIOR = 10
#: weight of the raw map inside the error map's flat steps (see the module docstring)
TIE_BREAK = 1e-4
#: validation voxels kept per case for the fit (a seeded random subset; all when the case is smaller)
VOXELS_PER_CASE = 50_000
#: the error map's possible inputs: the chains' map and the exported probabilities' margin (module docstring)
INPUTS = ("map", "confidence")


def voxel_subset(reference: np.ndarray, label_manager, rng: np.random.Generator,
                 max_voxels: int = VOXELS_PER_CASE) -> np.ndarray:
    """The flat indices ``(n,)`` (sorted) of the voxels of a reference label map ``(*spatial)`` that a fit reads:
    every voxel but the ignore label's, a seeded random ``max_voxels`` of them when there are more."""
    ref = np.asarray(reference).reshape(-1)
    idx = np.flatnonzero(np.ones(ref.shape, bool) if label_manager.ignore_label is None
                         else ref != label_manager.ignore_label)
    if idx.size > max_voxels:
        idx = np.sort(rng.choice(idx, max_voxels, replace=False))
    return idx


def sample_voxels(logits: torch.Tensor, reference: np.ndarray, label_manager, rng: np.random.Generator,
                  max_voxels: int = VOXELS_PER_CASE) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` ``(C, *spatial)``, ``reference`` ``(*spatial)`` label ids -> (logits ``(n, C)``, targets): label
    ids ``(n,)`` for labels, region masks ``(n, R)`` for regions; ignore-label voxels left out."""
    z = logits.float().cpu().reshape(logits.shape[0], -1).T.numpy()
    ref = np.asarray(reference).reshape(-1)
    idx = voxel_subset(ref, label_manager, rng, max_voxels)
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


def exported_margin(logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """The confidence of the exported probabilities: export logits ``(C, *spatial)`` (already divided by the
    temperature) -> h ``(*spatial)`` in [0, 1], 0 when certain: one minus the margin between the two most probable
    classes of softmax(z), 1 - (p_(1) - p_(2)), for labels; the mean over regions of 1 - |2 sigmoid(z) - 1| for
    regions (each region's own margin), as nnU-Net's export turns z into probabilities."""
    z = logits.float()
    if has_regions:
        return (1 - (2 * torch.sigmoid(z) - 1).abs()).mean(0)
    if z.shape[0] < 2:
        return torch.zeros_like(z[0])
    top = torch.softmax(z, 0).topk(2, dim=0).values
    return 1 - (top[0] - top[1])


def error_voxels(segmentation: np.ndarray, uncertainty: np.ndarray | None, reference: np.ndarray, label_manager,
                 rng: np.random.Generator, logits, max_voxels: int = VOXELS_PER_CASE) -> tuple:
    """Predicted label map, native map (None for a model without one), reference label map (``(*spatial)`` each)
    and the export ``logits`` ``(C, *spatial)`` -> (labels ``(n,)``, map ``(n,)`` or None, wrong ``(n,)``, logits
    ``(n, C)``) of a seeded voxel subset, ignore-label voxels left out; wrong = the predicted label differs from the
    reference (as ``diffnnunet_evaluate`` counts errors)."""
    seg, ref = np.asarray(segmentation).reshape(-1), np.asarray(reference).reshape(-1)
    idx = voxel_subset(ref, label_manager, rng, max_voxels)
    u = None if uncertainty is None else np.asarray(uncertainty, dtype=np.float64).reshape(-1)[idx]
    z = torch.as_tensor(logits).float().cpu().reshape(logits.shape[0], -1)
    return seg[idx].astype(np.int64), u, seg[idx] != ref[idx], z[:, torch.from_numpy(idx)].T.numpy()


def _isotonic_curve(u: np.ndarray, wrong: np.ndarray) -> dict:
    """The error curve of one label: the voxels sorted by u in bins of at least :data:`ERROR_MAP_BIN` (and at most
    :data:`ERROR_MAP_KNOTS` bins), each bin's error rate shrunk towards the label's own rate r by
    :data:`ERROR_MAP_PRIOR` pseudo-voxels ((errors + a r) / (n + a)), then the isotonic regression of those rates
    on the bins' mean u, weighted by the bins' sizes. The bins and the shrinkage keep a handful of validation
    errors in a sparse tail from setting a whole label's level (measured: 2 errors among 4 background voxels put
    the demo's background tail at 0.5 without them)."""
    from sklearn.isotonic import IsotonicRegression
    order = np.argsort(u, kind="stable")
    u, wrong = u[order], wrong[order].astype(float)
    size = max(ERROR_MAP_BIN, -(-len(u) // ERROR_MAP_KNOTS))
    starts = np.arange(0, len(u), size)
    if len(starts) > 1 and len(u) - starts[-1] < size // 2:
        starts = starts[:-1]  # a short last bin joins the one before
    counts = np.diff(np.r_[starts, len(u)]).astype(float)
    centers = np.add.reduceat(u, starts) / counts
    rate = wrong.mean()
    smoothed = (np.add.reduceat(wrong, starts) + ERROR_MAP_PRIOR * rate) / (counts + ERROR_MAP_PRIOR)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    fitted = iso.fit(centers, smoothed, sample_weight=counts).predict(centers)
    return {"u": centers.tolist(), "error": fitted.tolist(), "voxels": int(len(u)), "errors": int(wrong.sum())}


def _curve_value(curve: dict, x: np.ndarray) -> np.ndarray:
    """A curve at ``x``, its flat steps ordered by ``x`` itself: (e(x) + eps x) / (1 + eps), eps = TIE_BREAK."""
    return (np.interp(x, curve["u"], curve["error"]) + TIE_BREAK * np.clip(x, 0, 1)) / (1 + TIE_BREAK)


def _curves(x: np.ndarray, labels: np.ndarray, wrong: np.ndarray) -> dict:
    """``{"pooled": curve, "labels": {label: curve}}`` of one input ``x`` ``(n,)`` (:func:`_isotonic_curve`)."""
    return {"pooled": _isotonic_curve(x, wrong),
            "labels": {str(int(c)): _isotonic_curve(x[labels == c], wrong[labels == c]) for c in np.unique(labels)}}


def _halves(samples: list) -> list:
    """Two disjoint halves of the validation voxels for held-out scoring: even and odd cases, or with one case its
    even and odd voxels."""
    if len(samples) > 1:
        return [samples[0::2], samples[1::2]]
    return [[tuple(None if a is None else a[k::2] for a in samples[0])] for k in (0, 1)]


def _concat(samples: list, i: int):
    parts = [s[i] for s in samples]
    return None if any(p is None for p in parts) else np.concatenate([np.asarray(p, np.float64) if i in (1, 3)
                                                                      else p for p in parts])


def fit_error_map(samples: list, measure: str) -> dict:
    """``samples``: per case (labels ``(n,)``, map ``(n,)`` or None, wrong ``(n,)``, h ``(n,)`` or None), the
    predicted labels, the chains' native map, the errors and the exported probabilities' margin complement
    (:func:`exported_margin`) at the same voxels -> ``{"measure", "inputs", "pooled": curve, "labels": {label:
    curve}, "validation_auroc": {input: AUROC}[, "control": curves]}``: the curves (:func:`_isotonic_curve`, per
    predicted label and ``pooled`` for labels never predicted on the validation cases) of the input chosen by
    its held-out AUROC (module docstring), refitted on every case. ``inputs`` is ``map`` when there is no h and
    ``confidence`` when there is no map (the stock nnU-Net model). When the map wins, ``control`` keeps the
    margin's curves as well (never applied by the predictor): the control a benchmark scores the exported map
    against (the margin recalibrated per predicted label the same way); when the margin wins, the error map is
    the control."""
    from diffnnunet.evaluation.uncertainty import auroc_from_histograms, uncertainty_counts
    column = {"map": 1, "confidence": 3}  # each input's place in a sample
    available = [name for name, i in column.items() if _concat(samples, i) is not None]
    if not available:
        raise ValueError("fit_error_map: the samples carry neither a map nor the exported margin")
    held_out = {}
    halves = _halves(samples)
    for name in available:
        scored, wrong = [], []
        for fit_on, score_on in ((halves[0], halves[1]), (halves[1], halves[0])):
            curves = _curves(_concat(fit_on, column[name]), _concat(fit_on, 0), _concat(fit_on, 2))
            scored.append(apply_error_map(torch.from_numpy(_concat(score_on, column[name])),
                                          torch.from_numpy(_concat(score_on, 0)),
                                          {"inputs": name, **curves}).numpy())
            wrong.append(_concat(score_on, 2))
        held_out[name] = auroc_from_histograms(uncertainty_counts(np.concatenate(scored),
                                                                  np.concatenate(wrong))["counts"])
    inputs = available[0] if len(available) == 1 else (
        "map" if not held_out["confidence"] > held_out["map"] else "confidence")
    labels, wrong = _concat(samples, 0), _concat(samples, 2)
    fit = {"measure": measure, "inputs": inputs, **_curves(_concat(samples, column[inputs]), labels, wrong),
           "validation_auroc": held_out}
    if inputs != "confidence" and "confidence" in available:
        fit["control"] = _curves(_concat(samples, column["confidence"]), labels, wrong)
    return fit


def upgrade_error_map(error_map: dict) -> dict:
    """An error map as :func:`fit_error_map` writes it from one stored by an earlier version: those kept the
    map's curves at the top level and the margin's under ``confidence`` (plus ``combine`` weights); a fit that
    chose both inputs at once can no longer be applied (ValueError)."""
    if "combine" not in error_map:
        return error_map
    inputs = error_map.get("inputs", "map")
    if inputs not in INPUTS:
        raise ValueError(f"error_map: inputs '{inputs}' (a combination of map and margin) are no longer supported")
    source = error_map["confidence"] if inputs == "confidence" else error_map
    return {"measure": error_map["measure"], "inputs": inputs, "pooled": source["pooled"],
            "labels": source["labels"]}


def checked_error_map(error_map: dict) -> dict:
    """A stored error map (sampling.json's, an ensemble's error_map.json) as :func:`apply_error_map` reads it:
    upgraded (:func:`upgrade_error_map`), with a known input and curves of finite knots and values in [0, 1] of
    equal, non-zero length; ValueError (KeyError, TypeError for a wrong structure) otherwise."""
    error_map = upgrade_error_map(error_map)
    if error_map["inputs"] not in INPUTS:
        raise ValueError(f"error_map: unknown inputs '{error_map['inputs']}'")
    for curve in [error_map["pooled"], *error_map["labels"].values()]:
        if len(curve["u"]) != len(curve["error"]) or not curve["u"]:
            raise ValueError("error_map: knots and values differ in length")
        u, e = np.asarray(curve["u"], np.float64), np.asarray(curve["error"], np.float64)
        if not (np.isfinite(u).all() and np.isfinite(e).all() and e.min() >= 0 and e.max() <= 1):
            raise ValueError("error_map: knots not finite or error rates outside [0, 1]")
    return error_map


def apply_error_map(x: torch.Tensor, segmentation: torch.Tensor, error_map: dict) -> torch.Tensor:
    """The error map's input ``x`` ``(*spatial)`` (the native map u for ``inputs`` ``map``, the exported margin
    complement h for ``confidence``; :func:`error_map_input`) and the predicted label map ``(*spatial)`` -> the
    estimated probability that the voxel's label is wrong, float32 in [0, 1], same shape: the curve of the voxel's
    predicted label c (the pooled curve for a label without one) interpolated linearly between its knots,
    constant beyond the end knots, with the tie-break (e_c(x) + eps x) / (1 + eps) (module docstring)."""
    u = x.float().cpu().numpy()
    seg = np.asarray(segmentation.cpu() if isinstance(segmentation, torch.Tensor) else segmentation)
    out = np.empty(u.shape, np.float64)
    for c in np.unique(seg):
        m = seg == c
        out[m] = _curve_value(error_map["labels"].get(str(int(c)), error_map["pooled"]), u[m])
    return torch.from_numpy(out.astype(np.float32))


def error_map_input(error_map: dict, native_map: torch.Tensor | None, logits: torch.Tensor,
                    has_regions: bool) -> torch.Tensor | None:
    """What the error map reads: the exported margin complement of ``logits`` ``(C, *spatial)`` (already divided
    by the temperature) for ``inputs`` ``confidence``, else the native map ``(*spatial)`` (None without one)."""
    if error_map.get("inputs", "map") == "confidence":
        return exported_margin(logits, has_regions)
    return native_map


def load_tuned_sampling(model_folder: str) -> dict | None:
    """What the tuning stored (None when the folder has none): ``sampling_steps`` and ``samples_per_step`` (diffusion
    models), ``temperature`` and ``error_map`` (when calibrated; the stock model has only these)."""
    path = join(model_folder, SAMPLING_FILE)
    if not os.path.isfile(path):
        return None
    try:
        tuned = load_json(path)
        out = {}
        if "sampling_steps" in tuned or "samples_per_step" in tuned:
            out = {"sampling_steps": int(tuned["sampling_steps"]), "samples_per_step": int(tuned["samples_per_step"])}
            if tuned.get("budget") == "plans":  # recipe paper: the published budget, kept (not chosen) by the tuning
                out["budget"] = "plans"
        if tuned.get("calibration"):
            out["temperature"] = float(tuned["calibration"]["temperature"])
            if not out["temperature"] > 0:
                raise ValueError(f"temperature {out['temperature']} is not > 0")
            error_map = tuned["calibration"].get("error_map")
            if error_map:
                out["error_map"] = checked_error_map(error_map)
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{path}: unreadable sampling budget or calibration ({e}); delete it or re-run "
                           "diffnnunet_tune_sampling") from None
