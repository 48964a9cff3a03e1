"""Known answers for the exact uncertainty metrics: AUROC against scikit-learn, AURC, Brier, overlap Dice."""
import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffnnunet.evaluation.uncertainty import (
    aurc_from_counts,
    auroc_from_histograms,
    auroc_tie_bound,
    binned_auroc,
    brier_sums,
    dice_from_overlap,
    merge_counts,
    optimal_aurc,
    overlap_counts,
    uncertainty_counts,
)


def _near_zero_data(n=60000, seed=0):
    """Half the voxels exactly 0, the rest log-normal around 1e-4 (errors 3x higher): saturated, heavy near 0."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < 0.05
    u = np.where(rng.random(n) < 0.5, 0.0, rng.lognormal(-9, 2, n))
    u[wrong] *= 3
    return np.clip(u, 0, 1).astype(np.float32), wrong


def _pooled(u, wrong, n_cases=3, **kw):
    return merge_counts([uncertainty_counts(u[i::n_cases], wrong[i::n_cases]) for i in range(n_cases)], **kw)


def test_exact_auroc_matches_sklearn_on_mass_near_zero():
    u, wrong = _near_zero_data()
    stats = _pooled(u, wrong)
    assert stats["shift"] == 0 and auroc_tie_bound(stats) == 0.0
    assert auroc_from_histograms(stats["counts"]) == pytest.approx(roc_auc_score(wrong, u), abs=1e-12)
    # the old 1000-bin figure: every voxel below 0.001 ties, which moves this saturated map by more than 1e-3
    assert abs(binned_auroc(stats) - roc_auc_score(wrong, u)) > 1e-3


def test_coarsened_auroc_within_its_bound_and_1e_3():
    u, wrong = _near_zero_data(seed=1)
    stats = _pooled(u, wrong, max_distinct=3000)
    assert stats["shift"] > 0 and len(stats["keys"]) <= 3000
    error = abs(auroc_from_histograms(stats["counts"]) - roc_auc_score(wrong, u))
    assert error <= auroc_tie_bound(stats) + 1e-12 and error < 1e-3


def test_auroc_ties_count_half():
    u = np.array([0, 0, 0.5, 1], np.float32)
    wrong = np.array([1, 0, 0, 1], bool)
    # pairs (wrong, correct): (0, 0) tie 1/2, (0, 0.5) 0, (1, 0) 1, (1, 0.5) 1 -> 2.5 / 4
    assert auroc_from_histograms(uncertainty_counts(u, wrong)["counts"]) == pytest.approx(0.625)
    assert roc_auc_score(wrong, u) == pytest.approx(0.625)


def test_aurc_hand_computed():
    # most certain first: risk 0/1, 1/2, 1/3, 2/4
    stats = uncertainty_counts(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1], bool))
    assert aurc_from_counts(stats) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    # one certain correct voxel, then a tie of three (two wrong) entering in random order:
    # expected risk 0, (2/3)/2, (4/3)/3, 2/4 -> 23/72
    u, wrong = np.array([0, 0.5, 0.5, 0.5]), np.array([0, 1, 1, 0], bool)
    assert aurc_from_counts(uncertainty_counts(u, wrong)) == pytest.approx(23 / 72)
    orders = [np.r_[0, p] for p in itertools.permutations([1, 1, 0])]
    assert np.mean([np.mean(np.cumsum(o) / np.arange(1, 5)) for o in orders]) == pytest.approx(23 / 72)
    assert optimal_aurc(1, 4) == pytest.approx(1 / 16)  # error last: risk 0, 0, 0, 1/4


def test_aurc_matches_direct_per_voxel_computation():
    rng = np.random.default_rng(2)
    u = rng.permutation(np.arange(1, 2001, dtype=np.float32)) / 2001  # distinct values: no ties
    wrong = rng.random(2000) < rng.random(2000) * u * 0.8
    order = np.argsort(u)
    direct = np.mean(np.cumsum(wrong[order]) / np.arange(1, 2001))
    assert aurc_from_counts(_pooled(u, wrong)) == pytest.approx(direct, rel=1e-10)
    errors_last = np.sort(wrong)
    assert optimal_aurc(wrong.sum(), 2000) == pytest.approx(np.mean(np.cumsum(errors_last) / np.arange(1, 2001)))


def test_brier_labels_and_regions():
    probs = np.array([[0.7, 0.2, 0.0], [0.2, 0.5, 0.0], [0.1, 0.3, 1.0]])  # (C=3, 3 voxels)
    ref = np.array([0, 2, 1])
    valid = np.array([True, True, False])
    # voxel 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14; voxel 1: 0.2^2 + 0.5^2 + 0.7^2 = 0.78; voxel 2 ignored
    sq, n = brier_sums(probs, ref, [1, 2], False, valid)
    assert (sq / n, n) == (pytest.approx(0.46), 2)
    regions = [(1, 2), (2,)]
    p = np.array([[0.8, 0.6, 0.1], [0.3, 0.9, 0.0]])
    # region (1, 2): y = 1, 1, 0 -> 0.04 + 0.16 + 0.01; region (2,): y = 0, 1, 0 -> 0.09 + 0.01 + 0
    sq, n = brier_sums(p, np.array([1, 2, 0]), regions, True, np.ones(3, bool))
    assert (sq / n, n) == (pytest.approx(0.31 / 6), 6)


def test_uncertainty_error_overlap_dice():
    counts = overlap_counts(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert counts.tolist() == [1, 2, 2] and dice_from_overlap(counts) == pytest.approx(0.5)
    assert np.isnan(dice_from_overlap(overlap_counts(np.zeros(3, bool), np.zeros(3, bool))))
