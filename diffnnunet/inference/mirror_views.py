"""nnU-Net's mirror views of a window, for the sampler's test-time mirroring (DiffusionPredictor with
``use_mirroring``, ``--mirror``)."""
from __future__ import annotations

import itertools


def mirror_combinations(allowed_axes) -> list:
    """Flip dims of ``(K, C, *patch)`` windows for every mirror combination of ``allowed_axes`` (spatial axes),
    identity first, then single axes, pairs, ... (nnU-Net's order): 4 in 2D, 8 in 3D, [()] for none."""
    axes = [int(a) + 2 for a in (allowed_axes or ())]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
