"""Uncertainty quality, accumulated as per-case statistics that pool exactly over a dataset without keeping voxels.

ECE (Guo et al. 2017): sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins of the predicted class
probability. AUROC: probability that a wrongly labelled voxel has higher uncertainty than a correct one, ties
counting one half (the Mann-Whitney U / (W R), as scikit-learn's ``roc_auc_score``), computed exactly from counts of
wrong and correct voxels per distinct float32 uncertainty value. AURC (Geifman & El-Yaniv 2017): the mean selective
risk over all coverages when voxels are admitted from most to least certain. Brier score: mean squared error of the
probabilities against the one-hot reference.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15
AUROC_BINS = 1000
MAX_DISTINCT = 1 << 21  # distinct values kept exactly before the float32 mantissa is coarsened (see coarsen_counts)
MAX_SHIFT = 20  # at most 20 of the 23 mantissa bits dropped: 3 bits (1/8 relative) is the coarsest grid used


def normalized_entropy(probabilities: np.ndarray, has_regions: bool) -> np.ndarray:
    """Voxelwise predictive uncertainty in [0, 1] from class probabilities ``(C, *spatial)``.

    Mutually exclusive labels: H(p) / log C with H(p) = -sum_c p_c log p_c. Regions (independent sigmoids): the
    mean over regions of the binary entropy divided by log 2.
    """
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    if has_regions:
        q = np.clip(1.0 - probabilities.astype(np.float64), 1e-12, 1.0)
        h = -(p * np.log(p) + q * np.log(q)) / np.log(2.0)
        return np.clip(h.mean(0), 0, 1).astype(np.float32)
    if probabilities.shape[0] < 2:
        return np.zeros(probabilities.shape[1:], np.float32)
    h = -(p * np.log(p)).sum(0) / np.log(probabilities.shape[0])
    return np.clip(h, 0, 1).astype(np.float32)


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


def auroc_from_histograms(hist: np.ndarray) -> float:
    """P(u_wrong > u_correct) + 0.5 P(same bin); NaN when either group is empty.

    ``hist``: ``(2, K)`` counts of wrong (row 0) and correct (row 1) voxels per bin or distinct value, ascending.
    """
    wrong, right = hist.astype(np.float64)
    if wrong.sum() == 0 or right.sum() == 0:
        return float("nan")
    right_below = np.concatenate([[0.0], np.cumsum(right)[:-1]])
    return float((np.sum(wrong * right_below) + 0.5 * np.sum(wrong * right)) / (wrong.sum() * right.sum()))


def uncertainty_counts(uncertainty: np.ndarray, wrong: np.ndarray) -> dict:
    """Exact per-value statistics of one case: ``keys`` ``(K,)`` uint32, the ascending bit patterns of the distinct
    float32 uncertainty values (clipped to [0, 1], NaN counted as 1, -0 as 0; for non-negative floats the bit
    pattern orders as the value), ``counts`` ``(2, K)`` int64 of wrong (row 0) and correct (row 1) voxels per value,
    and ``shift``, the number of low mantissa bits dropped (0: exact; see ``coarsen_counts``)."""
    u = np.clip(np.nan_to_num(np.asarray(uncertainty, np.float32).ravel(), nan=1.0), 0, 1) + np.float32(0)
    keys, inverse = np.unique(u.view(np.uint32), return_inverse=True)
    wrong = np.asarray(wrong, bool).ravel()
    counts = np.stack([np.bincount(inverse, wrong, len(keys)), np.bincount(inverse, ~wrong, len(keys))])
    return coarsen_counts({"keys": keys, "counts": counts.astype(np.int64), "shift": 0})


def counts_by_label(uncertainty: np.ndarray, wrong: np.ndarray, predicted: np.ndarray, valid: np.ndarray) -> dict:
    """One case's :func:`uncertainty_counts` per predicted label: uncertainty, wrong, predicted label map and the
    voxels to count (ignore label left out), each ``(*spatial)`` -> ``{label: counts}`` for every label predicted
    on a valid voxel (:func:`within_label_auroc` pools them over cases)."""
    return {int(c): uncertainty_counts(uncertainty[valid & (predicted == c)], wrong[valid & (predicted == c)])
            for c in np.unique(predicted[valid])}


def coarsen_counts(stats: dict, shift: int | None = None, max_distinct: int = MAX_DISTINCT) -> dict:
    """Merge values that share all but the low ``shift`` mantissa bits (with ``shift=None``: the smallest shift, at
    most ``MAX_SHIFT``, leaving ``max_distinct`` values or fewer). A float32 grid of relative width 2^(shift - 23),
    dense near 0 (a log scale with linear steps inside each power of two); 0 and 1 stay their own values. Merged
    values tie, which can move the AUROC by at most ``auroc_tie_bound``."""
    keys, counts, current = stats["keys"], stats["counts"], stats["shift"]
    if shift is None:
        shift = current
        while shift < MAX_SHIFT and _n_distinct(keys >> np.uint32(shift)) > max_distinct:
            shift += 1
    if shift <= current:
        return stats
    coarse = (keys >> np.uint32(shift)) << np.uint32(shift)
    starts = np.flatnonzero(np.concatenate([[True], coarse[1:] != coarse[:-1]]))
    return {"keys": coarse[starts], "counts": np.add.reduceat(counts, starts, axis=1), "shift": shift}


def _n_distinct(sorted_keys: np.ndarray) -> int:
    return int(np.count_nonzero(sorted_keys[1:] != sorted_keys[:-1])) + int(len(sorted_keys) > 0)


def merge_counts(stats: list[dict], max_distinct: int = MAX_DISTINCT) -> dict:
    """Pool per-case ``uncertainty_counts``: every case brought to the coarsest shift among them, keys concatenated
    and re-uniqued, counts summed; coarsened again if more than ``max_distinct`` values remain."""
    shift = max(s["shift"] for s in stats)
    stats = [coarsen_counts(s, shift) for s in stats]
    keys, inverse = np.unique(np.concatenate([s["keys"] for s in stats]), return_inverse=True)
    wrong, right = np.concatenate([s["counts"] for s in stats], axis=1)
    counts = np.stack([np.bincount(inverse, wrong, len(keys)), np.bincount(inverse, right, len(keys))])
    counts = np.rint(counts).astype(np.int64)  # float64 sums of integers: exact below 2^53 voxels
    return coarsen_counts({"keys": keys, "counts": counts, "shift": shift}, max_distinct=max_distinct)


def values_of(stats: dict) -> np.ndarray:
    """The float32 uncertainty values ``(K,)`` of ``stats['keys']`` (the lower edge of each group when coarsened)."""
    return stats["keys"].view(np.float32)


def auroc_tie_bound(stats: dict) -> float:
    """Upper bound of |AUROC(stats) - exact AUROC|: 0 when no value was merged (``shift`` 0); otherwise half the
    fraction of (wrong, correct) pairs inside merged groups, 0.5 sum_g w_g r_g / (W R), leaving out the group of
    exact 0 (only values below 2^(MAX_SHIFT - 149), subnormals, can join it)."""
    if stats["shift"] == 0:
        return 0.0
    w, r = stats["counts"].astype(np.float64)
    inside = stats["keys"] != 0
    return float(0.5 * np.sum(w[inside] * r[inside]) / max(w.sum() * r.sum(), 1.0))


def binned_auroc(stats: dict, n_bins: int = AUROC_BINS) -> float:
    """The previous figure, for comparison: AUROC of the counts regrouped into ``n_bins`` equal-width bins."""
    idx = np.minimum((values_of(stats).astype(np.float64) * n_bins).astype(np.int64), n_bins - 1)
    w, r = stats["counts"]
    return auroc_from_histograms(np.stack([np.bincount(idx, w, n_bins), np.bincount(idx, r, n_bins)]))


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H(n) = sum_{i=1}^{n} 1/i for integer arrays ``n >= 0`` (digamma(n + 1) + Euler's gamma)."""
    from scipy.special import digamma
    return digamma(np.asarray(n, np.float64) + 1) + np.euler_gamma


def aurc_from_counts(stats: dict) -> float:
    """Area under the risk-coverage curve, AURC = (1/N) sum_{k=1}^{N} E_k / k, E_k the errors among the k most
    certain voxels. A tie group of n voxels with e errors admitted after K voxels with E errors enters in random
    order, so in expectation E_{K+j} = E + j e / n and the group adds sum_{j=1}^{n} (E + j e/n) / (K + j)
    = e + (E - K e/n) (H(K + n) - H(K)). NaN without voxels."""
    errors, right = stats["counts"].astype(np.float64)
    size = errors + right
    n_total = size.sum()
    if n_total == 0:
        return float("nan")
    k_before = np.concatenate([[0.0], np.cumsum(size)[:-1]])
    e_before = np.concatenate([[0.0], np.cumsum(errors)[:-1]])
    keep = size > 0
    e, n, k0, e0 = errors[keep], size[keep], k_before[keep], e_before[keep]
    terms = e + (e0 - k0 * e / n) * (_harmonic(k0 + n) - _harmonic(k0))
    return float(terms.sum() / n_total)


def optimal_aurc(n_errors: float, n_total: float) -> float:
    """AURC of an oracle ranking every error last: (1/N) sum_{k=N-E+1}^{N} (k - (N - E)) / k
    = (E - (N - E)(H(N) - H(N - E))) / N; the floor that AURC is compared with (E-AURC = AURC - this)."""
    if n_total == 0:
        return float("nan")
    correct = n_total - n_errors
    return float((n_errors - correct * (_harmonic(n_total) - _harmonic(correct))) / n_total)


def risk_coverage_curve(stats: dict, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, risk)``, each ``(P,)``, at the ends of the tie groups (at most ``max_points`` of them, evenly
    picked, the last one always kept): coverage K/N and risk E_K/K."""
    errors, right = stats["counts"].astype(np.float64)
    k, e = np.cumsum(errors + right), np.cumsum(errors)
    keep = k > 0
    k, e = k[keep], e[keep]
    if len(k) > max_points:
        idx = np.unique(np.linspace(0, len(k) - 1, max_points).astype(np.int64))
        k, e = k[idx], e[idx]
    return k / k[-1], e / k


def brier_sums(probabilities: np.ndarray, reference: np.ndarray, labels_or_regions, has_regions: bool,
               valid: np.ndarray) -> np.ndarray:
    """``(2,)``: summed squared error and number of terms, so Brier = sum / count pools over cases.

    Labels: ``probabilities`` ``(C, *spatial)`` over classes 0..C-1, one term per voxel, sum_c (p_c - [y = c])^2
    (0 to 2). Regions: ``(R, *spatial)``, one term per region and voxel, (p_r - [y in r])^2 (0 to 1).
    ``reference``: ``(*spatial)`` label ids; ``valid``: ``(*spatial)`` bool, voxels counted (ignore label out)."""
    sq = 0.0
    if has_regions:
        for p, region in zip(probabilities, labels_or_regions):
            sq += float(np.sum((p[valid].astype(np.float64) - np.isin(reference[valid], region)) ** 2))
        return np.array([sq, float(valid.sum()) * len(probabilities)])
    ref = reference[valid]
    for c, p in enumerate(probabilities):
        sq += float(np.sum((p[valid].astype(np.float64) - (ref == c)) ** 2))
    return np.array([sq, float(valid.sum())])


OVERLAP_THRESHOLD = 0.5


def overlap_counts(uncertain: np.ndarray, error: np.ndarray) -> np.ndarray:
    """``(3,)``: |U & E|, |U|, |E| of two boolean masks (uncertainty above ``OVERLAP_THRESHOLD``, errors of one label
    or region); pooled by summing, Dice = 2 |U & E| / (|U| + |E|) (NaN when both are empty)."""
    return np.array([np.sum(uncertain & error), np.sum(uncertain), np.sum(error)], np.int64)


def dice_from_overlap(counts: np.ndarray) -> float:
    both, u, e = (float(x) for x in counts)
    return float("nan") if u + e == 0 else 2 * both / (u + e)


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


def within_label_auroc(by_label: list[dict]) -> dict:
    """Per-case ``{predicted label: uncertainty_counts}`` -> ``AUROC_within_predicted_label`` (per predicted
    label, the AUROC of the map against the errors among the voxels predicted as that label, pooled over cases;
    None where that label has no error or no correct voxel) and ``AUROC_within_label_mean`` (their unweighted
    mean, None when no label has both): how well the map ranks errors inside a label, which the pooled AUROC
    mixes with how well it separates labels of different error rates."""
    labels = sorted({c for case in by_label for c in case})
    per_label = {}
    for c in labels:
        value = auroc_from_histograms(merge_counts([case[c] for case in by_label if c in case])["counts"])
        per_label[str(c)] = None if np.isnan(value) else value
    scored = [v for v in per_label.values() if v is not None]
    return {"AUROC_within_predicted_label": per_label,
            "AUROC_within_label_mean": float(np.mean(scored)) if scored else None}
