"""Native uncertainty maps from the S sampling chains of any method, computed per window in float32.

Every sampler runs S independent chains; each ends in class probabilities p_s ``(B, C, *spatial)``. The maps
(documentation/evaluation.md) are, per voxel, with H the entropy normalised to [0, 1]:

- ``entropy`` (default): total predictive entropy H(p_bar) of the chains' mean p_bar = (1/S) sum_s p_s.
- ``mutual_information``: H(p_bar) - (1/S) sum_s H(p_s), the epistemic part (the chains disagree); 0 when every
  chain gives the same probabilities, whatever they are.
- ``std``: the per-voxel standard deviation of p_s across the chains (population, 1/S), averaged over channels;
  in [0, 1/2].

H is the categorical entropy -sum_c p_c log p_c / log C for class probabilities that sum to one (``categorical``),
and the binary entropy averaged over channels, -(p log p + (1-p) log(1-p)) / log 2, for independent per-channel
probabilities (sigmoids: regions, or methods that estimate each label channel on its own).

Several folds (models) predict a case one after the other, each through the whole sliding window, so a window's
chains never meet the other folds' chains. :class:`FoldStatistics` combines them where each measure decomposes over
the pooled chains of F folds with equal chain counts, p_bar = (1/F) sum_f p_bar_f:

- ``entropy``: H(p_bar) = (1/F) sum_f H(p_bar_f) + JSD, with JSD = H(p_bar) - (1/F) sum_f H(p_bar_f) >= 0 (the
  generalised Jensen-Shannon divergence of the folds' means: their disagreement);
- ``mutual_information``: H(p_bar) - (1/(F S)) sum_{f,s} H(p_fs) = (1/F) sum_f MI_f + JSD;
- ``std``: per channel Var = (1/F) sum_f Var_f + (1/F) sum_f (p_bar_f - p_bar)^2 (within + between folds).

The within-fold terms are each fold's blended map (per channel for ``std``), the between-fold terms come from the
folds' blended means, so one fold gives back its own map and folds that agree add nothing; where the windows do
not overlap the result is the measure of all folds' chains pooled.
"""
from __future__ import annotations

import math
import sys

import torch

MEASURES = ("entropy", "mutual_information", "std")
#: the measures of the chains' spread: 0 everywhere for one chain (of one fold)
SPREAD_MEASURES = ("mutual_information", "std")
#: removed measures that plans of earlier versions may name -> the one read in their place (plans_measure)
REMOVED_MEASURES = {"mi_entropy": "mutual_information"}
_warned_removed: set = set()
#: suffix of a measure that asks ChainStatistics.map for the parts FoldStatistics combines, not for the map
FOLD_PARTS = "+folds"


def parse_measure(name: str) -> tuple[str, bool]:
    """``"entropy"`` -> ("entropy", False); ``"entropy+folds"`` -> ("entropy", True); ValueError if unknown."""
    base = name[:-len(FOLD_PARTS)] if name.endswith(FOLD_PARTS) else name
    if base not in MEASURES:
        raise ValueError(f"unknown uncertainty measure '{name}' (known: {', '.join(MEASURES)})")
    return base, base != name


def plans_measure(name: str) -> str:
    """The plans' ``uncertainty`` measure, a removed one (:data:`REMOVED_MEASURES`) read as its replacement with one
    warning line on stderr per process; an error map fitted for the removed measure then no longer matches."""
    if name not in REMOVED_MEASURES:
        return name
    new = REMOVED_MEASURES[name]
    if name not in _warned_removed:
        _warned_removed.add(name)
        print(f"warning: uncertainty measure '{name}' was removed; using '{new}' (re-run diffnnunet_tune_sampling "
              "to refit the error map)", file=sys.stderr)
    return new


def normalized_entropy(p: torch.Tensor, categorical: bool) -> torch.Tensor:
    """H(p) in [0, 1], ``(B, C, *spatial)`` -> ``(B, 1, *spatial)`` (module docstring; 0 log 0 = 0)."""
    p = p.float()
    if categorical:
        c = p.shape[1]
        h = -torch.xlogy(p, p).sum(1, keepdim=True)
        return h / math.log(c) if c > 1 else torch.zeros_like(h)
    q = 1 - p
    h = -(torch.xlogy(p, p) + torch.xlogy(q, q))
    return h.mean(1, keepdim=True) / math.log(2)


def odds_to_categorical(p: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Independent per-channel probabilities of mutually exclusive labels -> class probabilities along ``dim``:
    P(c) = odds_c / sum_k odds_k with odds = p / (1 - p), the probability that channel c is the one 'on' channel
    (the conversion nnU-Net's softmax applies to the exported logit(p); see predictor.probabilities_to_logits)."""
    p = p.float().clamp(eps, 1 - eps)
    odds = p / (1 - p)
    return odds / odds.sum(dim, keepdim=True)


class ChainStatistics:
    """Streaming per-voxel statistics of chains' probabilities; chains may arrive in chunks of any size.

    ``add(p)`` with ``p`` ``(B, n, C, *spatial)`` (n chains of B windows); ``mean()`` -> p_bar ``(B, C, *spatial)``;
    ``map(measure)`` -> ``(B, 1, *spatial)``; with ``spread=False`` only the mean and the entropy of the mean.
    Sums are kept relative to the first chain (a shift), so the variance has no cancellation when all chains are
    nearly equal.
    """

    def __init__(self, categorical: bool, spread: bool = True):
        self.categorical = bool(categorical)
        self.spread = bool(spread)  # False: only the mean is kept (no map asked for)
        self.count = 0
        self.shift = self.d_sum = self.d_sq = self.h_sum = None

    def add(self, p: torch.Tensor) -> None:
        p = p.float()
        if self.shift is None:
            self.shift = p[:, 0]
            self.d_sum = torch.zeros_like(self.shift)
            if self.spread:
                self.d_sq = torch.zeros_like(self.shift)
                self.h_sum = torch.zeros_like(self.shift[:, :1])
        d = p - self.shift[:, None]
        self.d_sum += d.sum(1)
        b, n = p.shape[:2]
        if self.spread:
            self.d_sq += (d * d).sum(1)
            self.h_sum += (normalized_entropy(p.flatten(0, 1), self.categorical)
                           .reshape(b, n, 1, *p.shape[3:]).sum(1))
        self.count += n

    def mean(self) -> torch.Tensor:
        return self.shift + self.d_sum / self.count

    def channel_std(self) -> torch.Tensor:
        """Population standard deviation across the chains per channel ``(B, C, *spatial)``."""
        m = self.d_sum / self.count
        return (self.d_sq / self.count - m * m).clamp(min=0).sqrt()

    def map(self, measure: str = "entropy") -> torch.Tensor:
        """The ``measure`` map ``(B, 1, *spatial)``; with one chain every spread measure is 0.
        ``measure + FOLD_PARTS``: the parts :class:`FoldStatistics` combines over folds, ``(B, 1 + C, *spatial)``
        (the map, then p_bar) for entropy and mutual information, ``(B, 2 C, *spatial)`` (the per-channel std,
        then p_bar) for std; every part is linear in the sliding window's blending."""
        measure, parts = parse_measure(measure)
        if measure != "entropy" and not self.spread:
            raise RuntimeError(f"'{measure}' needs the chains' spread: build ChainStatistics(..., spread=True)")
        if measure == "std":
            std = self.channel_std()
            return torch.cat([std, self.mean()], 1) if parts else std.mean(1, keepdim=True)
        u = normalized_entropy(self.mean(), self.categorical)
        if measure == "mutual_information":
            u = (u - self.h_sum / self.count).clamp(min=0)  # >= 0 by Jensen; the clamp removes rounding below 0
        return torch.cat([u, self.mean()], 1) if parts else u


class FoldStatistics:
    """The ``measure`` map of several folds from their parts (module docstring): ``add(parts)`` once per fold with
    ``parts`` ``(B, K, *spatial)`` from ``ChainStatistics.map(measure + FOLD_PARTS)`` (blended like the map);
    ``map()`` -> ``(B, 1, *spatial)``. ``categorical``: the entropy of the folds' chains (ChainStatistics')."""

    def __init__(self, measure: str, categorical: bool):
        self.measure, self.categorical = parse_measure(measure)[0], bool(categorical)
        self.count = 0
        self.within = self.shift = self.d_sum = self.d_sq = self.h_sum = None

    def add(self, parts: torch.Tensor) -> None:
        """One fold's parts."""
        parts = parts.float()
        c = parts.shape[1] // 2 if self.measure == "std" else 1
        within, p = parts[:, :c], parts[:, c:]
        if self.measure == "std":
            within = within * within  # the fold's per-channel variance
        if self.shift is None:
            self.shift = p  # sums relative to the first fold's mean: no cancellation when the folds agree
            self.within, self.d_sum = torch.zeros_like(within), torch.zeros_like(p)
            self.d_sq = torch.zeros_like(p)
            self.h_sum = torch.zeros_like(within[:, :1])
        d = p - self.shift
        self.within += within
        self.d_sum += d
        self.d_sq += d * d
        if self.measure != "std":
            self.h_sum += normalized_entropy(p, self.categorical)
        self.count += 1

    def _channel_std(self) -> torch.Tensor:
        """Per channel sqrt(within + between variance) ``(B, C, *spatial)`` (std only)."""
        f = self.count
        m = self.d_sum / f
        return (self.within / f + (self.d_sq / f - m * m).clamp(min=0)).sqrt()

    def map(self) -> torch.Tensor:
        if self.measure == "std":
            return self._channel_std().mean(1, keepdim=True)
        f = self.count
        jsd = normalized_entropy(self.shift + self.d_sum / f, self.categorical) - self.h_sum / f
        return self.within / f + jsd.clamp(min=0)  # JSD >= 0 by Jensen; the clamp removes rounding below 0
