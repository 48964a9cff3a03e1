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

**Two inputs.** The chains' map is not the only per-voxel evidence the predictor has: the exported (temperature-
scaled) class probabilities carry their own confidence, h = 1 - (p_(1) - p_(2)), one minus the margin between the
two most probable classes (:func:`exported_margin`; nnU-Net's softmax entropy ranks voxels almost the same way, and
on the demo the margin found the errors better than the entropy H(p) / log C for every trainer, by 0.0006-0.004
AUROC). When the tuning hands h as well, :func:`fit_error_map` fits a second curve g_c(h) the same way and, per
predicted label, the logistic regression P(wrong) = sigmoid(w0 + w1 logit e'_c(u) + w2 logit g'_c(h)) with
w1, w2 >= 0 (:func:`_fit_combination`; e' and g' carry the eps tie-break, so each input keeps its own order
inside the flat steps). Which of the three the map writes (``inputs``: ``map`` = e'_c(u), ``confidence`` =
g'_c(h), ``both`` = the regression) is chosen on the validation voxels (:func:`choose_inputs`): the single input
with the higher AUROC, and both only when they beat it by more than :data:`INPUTS_TOLERANCE`. The preference for
one input is measured: the validation cases share the training cases' distribution, the test cases need not, and
the regression is the first to over-fit it (demo, BerDiff, test slices: 0.919 with the map, 0.936 with h, 0.896
with both, though both matched h on the validation slices, 0.9457 against 0.9459). Error maps of earlier versions
(no ``combine``), or a predictor that hands no h, use e'_c(u).
"""
from __future__ import annotations

import math

import numpy as np
import torch

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
#: logits of the curves' error rates are taken of rates clipped to [LOGIT_EPS, 1 - LOGIT_EPS]
LOGIT_EPS = 1e-4
#: L2 penalty on the combination's input weights (a nudge against over-fitting a few validation cases)
COMBINE_L2 = 1e-3
#: the error map's possible inputs: the chains' map, the exported probabilities' margin, both (module docstring)
INPUTS = ("map", "confidence", "both")
#: both inputs are used only when their validation AUROC beats the better single input's by more than this
INPUTS_TOLERANCE = 0.002


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


def error_voxels(segmentation: np.ndarray, uncertainty: np.ndarray, reference: np.ndarray, label_manager,
                 rng: np.random.Generator, max_voxels: int = VOXELS_PER_CASE, logits=None) -> tuple:
    """Predicted label map, native map and reference label map of one case (``(*spatial)`` each) -> (labels
    ``(n,)``, map ``(n,)``, wrong ``(n,)``) of a seeded voxel subset, ignore-label voxels left out; wrong = the
    predicted label differs from the reference (as ``diffnnunet_evaluate`` counts errors). With the export
    ``logits`` ``(C, *spatial)`` a fourth element: their values at the same voxels, ``(n, C)``."""
    seg, ref = np.asarray(segmentation).reshape(-1), np.asarray(reference).reshape(-1)
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    idx = np.flatnonzero(np.ones(ref.shape, bool) if label_manager.ignore_label is None
                         else ref != label_manager.ignore_label)
    if idx.size > max_voxels:
        idx = np.sort(rng.choice(idx, max_voxels, replace=False))
    out = (seg[idx].astype(np.int64), u[idx], seg[idx] != ref[idx])
    if logits is None:
        return out
    z = torch.as_tensor(logits).float().cpu().reshape(logits.shape[0], -1)
    return (*out, z[:, torch.from_numpy(idx)].T.numpy())


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


def _logit(e: np.ndarray) -> np.ndarray:
    e = np.clip(np.asarray(e, np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(e / (1 - e))


def _fit_combination(x: np.ndarray, wrong: np.ndarray) -> list:
    """Weights (w0, w1, ..., wk) of P(wrong) = sigmoid(w0 + sum_j wj x_j), ``x`` ``(n, k)``, minimising the mean
    log loss plus :data:`COMBINE_L2` sum_j wj^2 with wj >= 0 for j >= 1 (L-BFGS-B, started at the first input
    alone: w = (0, 1, 0, ...)). All voxels right or all wrong: that start, i.e. the first curve unchanged."""
    from scipy.optimize import minimize
    from scipy.special import expit
    k = x.shape[1]
    start = np.r_[0.0, 1.0, np.zeros(k - 1)]
    if wrong.all() or not wrong.any():
        return start.tolist()
    y = wrong.astype(np.float64)
    xb = np.c_[np.ones(len(x)), x]

    def loss(w):
        s = xb @ w
        log_p = -np.logaddexp(0, -s)  # log sigmoid(s)
        log_q = -np.logaddexp(0, s)
        prob = expit(s)
        value = -np.mean(y * log_p + (1 - y) * log_q) + COMBINE_L2 * np.sum(w[1:] ** 2)
        grad = xb.T @ (prob - y) / len(y) + np.r_[0.0, 2 * COMBINE_L2 * w[1:]]
        return value, grad

    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(None, None)] + [(0, None)] * k)
    return [float(v) for v in result.x]


def fit_error_map(samples: list, measure: str) -> dict:
    """``samples``: (labels, map, wrong) triples of :func:`error_voxels`, or (labels, map, wrong, h) with h the
    exported probabilities' margin complement at the same voxels (:func:`exported_margin`) -> ``{"measure", "labels":
    {label: curve}, "pooled": curve}``, a curve being the knots ``u`` and ``error`` of the isotonic regression of
    wrong on the map among the voxels predicted as that label (``pooled``: all voxels, for labels never predicted on
    the validation cases), with the voxel and error counts. With h also ``"confidence"`` (the same curves of wrong
    on h), ``"combine"`` (per label and ``pooled`` the weights (w0, w1, w2) of :func:`_fit_combination` on
    (logit e'_c(u), logit g'_c(h))), ``"validation_auroc"`` of each of :data:`INPUTS` on these voxels and the
    chosen ``"inputs"`` (module docstring)."""
    labels = np.concatenate([s[0] for s in samples])
    u = np.concatenate([s[1] for s in samples])
    wrong = np.concatenate([s[2] for s in samples])
    classes = [str(int(c)) for c in np.unique(labels)]
    fit = {"measure": measure, "pooled": _isotonic_curve(u, wrong),
           "labels": {c: _isotonic_curve(u[labels == int(c)], wrong[labels == int(c)]) for c in classes}}
    if not samples or len(samples[0]) < 4:
        return fit
    h = np.concatenate([np.asarray(s[3], np.float64) for s in samples])
    fit["confidence"] = {"pooled": _isotonic_curve(h, wrong),
                         "labels": {c: _isotonic_curve(h[labels == int(c)], wrong[labels == int(c)])
                                    for c in classes}}
    fit["combine"] = {}
    for c in [None, *classes]:
        m = np.ones(len(u), bool) if c is None else labels == int(c)
        curve_u = fit["pooled"] if c is None else fit["labels"][c]
        curve_h = fit["confidence"]["pooled"] if c is None else fit["confidence"]["labels"][c]
        x = np.stack([_logit(_curve_value(curve_u, u[m])), _logit(_curve_value(curve_h, h[m]))], 1)
        fit["combine"]["pooled" if c is None else c] = _fit_combination(x, wrong[m])
    from diffnnunet.evaluation.uncertainty import auroc_from_histograms, uncertainty_counts
    fit["validation_auroc"] = {}
    for inputs in INPUTS:
        fit["inputs"] = inputs
        mapped = apply_error_map(torch.from_numpy(u), torch.from_numpy(labels), fit, torch.from_numpy(h)).numpy()
        fit["validation_auroc"][inputs] = auroc_from_histograms(uncertainty_counts(mapped, wrong)["counts"])
    fit["inputs"] = choose_inputs(fit["validation_auroc"])
    return fit


def choose_inputs(validation_auroc: dict, tolerance: float = INPUTS_TOLERANCE) -> str:
    """The error map's inputs from their validation AUROCs (``{"map", "confidence", "both"}``): the better single
    input (the map on a tie), and both only when they beat it by more than ``tolerance`` (module docstring)."""
    a = validation_auroc
    single = "map" if a["map"] >= a["confidence"] else "confidence"
    return "both" if a["both"] > a[single] + tolerance else single


def uses_confidence(error_map: dict) -> bool:
    """Whether the error map reads the exported margin h (its chosen ``inputs`` are not the map alone); fits of
    earlier versions (no ``combine``) never do."""
    return "combine" in error_map and error_map.get("inputs", "map") != "map"


def apply_error_map(uncertainty: torch.Tensor, segmentation: torch.Tensor, error_map: dict,
                    confidence: torch.Tensor | None = None) -> torch.Tensor:
    """The native map ``(*spatial)`` and the predicted label map ``(*spatial)`` -> the error map (module
    docstring), float32 in [0, 1], same shape: e_c interpolated linearly between the knots of the voxel's
    predicted label c (the pooled curve for a label without one), constant beyond the end knots. With the
    exported margin complement h ``(*spatial)`` (``confidence``, :func:`exported_margin`) and a fit that has
    ``combine``: the fit's ``inputs``, g'_c(h) or sigmoid(w0 + w1 logit e'_c(u) + w2 logit g'_c(h)) instead."""
    from scipy.special import expit
    u = uncertainty.float().cpu().numpy()
    seg = np.asarray(segmentation.cpu() if isinstance(segmentation, torch.Tensor) else segmentation)
    inputs = error_map.get("inputs", "map") if confidence is not None and uses_confidence(error_map) else "map"
    h = None if inputs == "map" else confidence.float().cpu().numpy().astype(np.float64)
    out = np.empty(u.shape, np.float64)
    for c in np.unique(seg):
        key = str(int(c))
        m = seg == c
        if inputs != "confidence":
            e = _curve_value(error_map["labels"].get(key, error_map["pooled"]), u[m])
        if inputs != "map":
            g = _curve_value(error_map["confidence"]["labels"].get(key, error_map["confidence"]["pooled"]), h[m])
        if inputs == "both":
            w = error_map["combine"].get(key, error_map["combine"]["pooled"])
            e = expit(w[0] + w[1] * _logit(e) + w[2] * _logit(g))
        out[m] = g if inputs == "confidence" else e
    return torch.from_numpy(out.astype(np.float32))
