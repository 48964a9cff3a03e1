"""Mirrored chains: a window's S sampling chains spread over nnU-Net's mirror views, test-time mirroring at no extra
network evaluation (documentation/inference.md, "Mirrored chains"). Used by DiffusionPredictor when the plans say
``mirror_chains: true``."""
from __future__ import annotations

import itertools

import torch

from diffnnunet.methods.uncertainty import FOLD_PARTS, MEASURES, FoldStatistics


def mirror_combinations(allowed_axes) -> list:
    """Flip dims of ``(K, C, *patch)`` windows for every mirror combination of ``allowed_axes`` (spatial axes),
    identity first, then single axes, pairs, ... (nnU-Net's order): 4 in 2D, 8 in 3D, [()] for none."""
    axes = [int(a) + 2 for a in (allowed_axes or ())]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def mirror_views(samples: int, allowed_axes) -> list | None:
    """[(flip dims of ``(K, C, *patch)`` windows, chain count), ...]: the S chains spread as evenly as possible
    (the first S mod V views one more) over V = min(S, M) of the M mirror combinations of ``allowed_axes`` (spatial
    axes; 4 combinations in 2D, 8 in 3D, identity included), in nnU-Net's order (identity, single axes, pairs, ...).
    None for one chain or no allowed axis."""
    combos, s = mirror_combinations(allowed_axes), int(samples)
    if s < 2 or len(combos) < 2:
        return None
    v = min(s, len(combos))
    return [(combos[i], s // v + (1 if i < s % v else 0)) for i in range(v)]


def sample_over_views(sample, x: torch.Tensor, views: list, measure: str | None, categorical: bool,
                      fold_parts: bool = False, members=None):
    """Run ``sample(windows, n, native_kwargs)`` (a method's sampler with n chains) on each view of ``x``
    ``(K, C_in, *patch)`` and flip its outputs back. Returns (probabilities ``(K, C, *patch)``, their chain-weighted
    mean over the views; the ``measure`` map ``(K, 1, *patch)`` of all S chains pooled, None without a measure).
    The map is combined from each view's parts with :class:`FoldStatistics` (weights = chain counts; exact for
    entropy, mutual information and std); with ``fold_parts`` the pooled parts are returned instead, for several
    folds to combine again. A measure that does not decompose is the chain-weighted mean of the views' maps.
    ``members(n)``: the map's members for n chains (a method's ``map_members``; n itself when None), the weight of
    a view's map parts."""
    members = members or (lambda n: n)
    decomposes = measure in MEASURES
    native = ({"return_uncertainty": True, "uncertainty": measure + (FOLD_PARTS if decomposes else "")}
              if measure else {})
    stats = FoldStatistics(measure, categorical) if measure and decomposes else None
    prediction, maps, total = 0.0, [], 0
    for dims, n in views:
        out = sample(torch.flip(x, dims) if dims else x, n, native)
        p, u = out if isinstance(out, tuple) else (out, None)
        prediction = prediction + n * (torch.flip(p, dims) if dims else p)
        total += n
        if u is not None:
            u = torch.flip(u, dims) if dims else u
            if stats is not None:
                stats.add(u, members(n))
            else:
                maps.append(members(n) * u)
    prediction = prediction / total
    if stats is not None and stats.count:
        return prediction, (stats.parts() if fold_parts else stats.map())
    return prediction, (sum(maps) / sum(members(n) for _, n in views) if maps else None)
