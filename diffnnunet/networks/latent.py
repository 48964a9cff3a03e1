"""LDSeg's latent networks (Zaman et al. 2024, Sec. III and IV.B), built from nnU-Net's plans topology.

* :class:`LabelEncoder`  f_label-enc: residual conv stages without skips down to the latent, then a non-affine
  per-channel standardisation (:class:`LatentStandardize`) so z_l(0) has mu 0, sigma 1 per channel (Eq. 10).
* :class:`ImageEncoder`  f_image-enc: the same stages on the image, self-attention after its last two downsampling
  stages (:class:`SpatialSelfAttention`), to the same latent size (Eq. 9).
* :class:`LabelDecoder`  f_label-dec: the mirrored stages (transposed convs, residual blocks) to class logits
  (Eq. 13; the softmax is applied by the method). No skips in the paper; with ``image_skips`` every decoder stage
  also sees the image encoder's output of the same stage (the recipe: the detail a 16x latent cannot carry).

Stages are nnU-Net's ``StackedResidualBlocks`` with the plans' conv/norm/nonlin ops and kernel sizes; which stages
and strides form the latent downsampling is decided by :func:`latent_layout` (stored in the plans).
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
from torch import nn

from diffnnunet.networks.time_unet import _as_list, _common_kwargs, conv_op_dim, resolve_arch_kwargs

#: per-axis latent downsampling LDSeg aims for (4 stride-2 stages, paper Sec. IV.B: 512 -> 32)
LATENT_DOWNSAMPLING = 16
#: the latent keeps at least this many positions along every axis (instance statistics need more than one)
MIN_LATENT_SIZE = 2


def latent_layout(arch_kwargs: dict, patch_size=None, target: int = LATENT_DOWNSAMPLING,
                  min_size: int = MIN_LATENT_SIZE) -> tuple[list, list]:
    """Choose the latent downsampling from the plans' strides: ``(latent_strides, denoiser_strides)``.

    The plans' stages are taken in order and, per axis, a stage's stride is kept while the cumulative product stays
    <= ``target`` (so anisotropic axes, which the plans downsample later, downsample less) and, when ``patch_size``
    is given, divides the patch and leaves at least ``min_size`` latent positions. Trailing stages that no longer
    downsample are dropped (at least one stage is kept). ``latent_strides`` is a list of per-stage, per-axis strides.
    ``denoiser_strides`` is the 2-stage topology of the latent denoiser: stride 2 along latent axes of size >= 4 and
    even, 1 elsewhere (all 1 without a patch size).
    """
    kw = resolve_arch_kwargs({"conv_op": arch_kwargs["conv_op"]})
    dim = conv_op_dim(kw["conv_op"])
    strides = [_as_list(s, dim) for s in _as_list(arch_kwargs["strides"], arch_kwargs["n_stages"])]
    cum, chosen = [1] * dim, []
    for stage in strides:
        eff = []
        for a, f in enumerate(stage):
            new = cum[a] * int(f)
            ok = f > 1 and new <= target and (patch_size is None or (patch_size[a] % new == 0
                                                                     and patch_size[a] // new >= min_size))
            eff.append(int(f) if ok else 1)
            cum[a] = new if ok else cum[a]
        chosen.append(eff)
        if all(c >= target for c in cum):
            break
    while len(chosen) > 1 and all(s == 1 for s in chosen[-1]):
        chosen.pop()
    if patch_size is None:
        return chosen, [[1] * dim, [1] * dim]
    latent = [p // c for p, c in zip(patch_size, cum)]
    return chosen, [[1] * dim, [2 if (n >= 4 and n % 2 == 0) else 1 for n in latent]]


def total_stride(latent_strides) -> list:
    """Per-axis product of the stage strides: the patch-to-latent downsampling factor."""
    out = [1] * len(latent_strides[0])
    for stage in latent_strides:
        out = [o * s for o, s in zip(out, stage)]
    return out


class LatentStandardize(nn.Module):
    """Non-affine per-sample, per-channel standardisation over the latent positions (instance normalisation
    without learnable scale/shift): z <- (z - mean) / sqrt(var + eps). ``(B, C, *latent)`` -> same shape.

    This is the paper's "normalization layer ... to ensure standardized distribution (mu = 0, sigma = 1)". It is
    per sample (not over the batch) so the latent a label maps to never depends on the other samples of a batch.
    Computed in float32 (also under autocast)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zf = z.float()
        axes = tuple(range(2, z.ndim))
        mean = zf.mean(axes, keepdim=True)
        var = zf.var(axes, keepdim=True, unbiased=False)
        return (zf - mean) / torch.sqrt(var + self.eps)


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the flattened spatial positions, pre-LayerNorm, residual.
    ``(B, C, *spatial)`` -> same shape; dimension-agnostic (2D and 3D alike)."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        heads = max(h for h in (heads, 2, 1) if channels % h == 0)
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, P, C)
        h = self.norm(tokens)
        h, _ = self.attn(h, h, h, need_weights=False)
        return (tokens + h).transpose(1, 2).reshape(b, c, *spatial)


def stage_settings(arch_kwargs: dict, n: int):
    """Features, kernel sizes and residual-block counts of the first ``n`` plans stages (1 block = 2 convs)."""
    n_stages = arch_kwargs["n_stages"]
    dim = conv_op_dim(resolve_arch_kwargs({"conv_op": arch_kwargs["conv_op"]})["conv_op"])
    features = _as_list(arch_kwargs["features_per_stage"], n_stages)[:n]
    kernels = [_as_list(k, dim) for k in _as_list(arch_kwargs["kernel_sizes"], n_stages)][:n]
    blocks = [max(1, (int(c) + 1) // 2) for c in _as_list(arch_kwargs["n_conv_per_stage"], n_stages)][:n]
    return features, kernels, blocks


class _LatentEncoder(nn.Module):
    """Residual stages ``latent_strides`` (no skips) then a 1x1 conv to ``latent_channels``.
    ``(B, C_in, *spatial)`` -> ``(B, latent_channels, *spatial / total_stride)``."""

    def __init__(self, arch_kwargs: dict, input_channels: int, latent_channels: int, latent_strides,
                 attention_stages=()):
        super().__init__()
        kw = resolve_arch_kwargs(arch_kwargs)
        conv_op, common = kw["conv_op"], _common_kwargs(kw)
        features, kernels, blocks = stage_settings(arch_kwargs, len(latent_strides))
        stages, ch = [], input_channels
        for i, stride in enumerate(latent_strides):
            layers = [StackedResidualBlocks(blocks[i], conv_op, ch, features[i], kernels[i], stride, **common)]
            if i in attention_stages:
                layers.append(SpatialSelfAttention(features[i]))
            stages.append(nn.Sequential(*layers))
            ch = features[i]
        self.stages = nn.Sequential(*stages)
        self.out = conv_op(ch, latent_channels, 1, 1, 0, bias=True)

    def forward(self, x: torch.Tensor, return_skips: bool = False):
        """The latent ``(B, latent_channels, *latent)``; with ``return_skips`` also the list of every stage's output
        ``(B, features[i], *spatial / stride up to stage i)``, shallowest first."""
        if not return_skips:
            return self.out(self.stages(x))
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return self.out(x), skips


#: how the label encoder standardises its latent: per sample (the paper's reading), over the batch, or not at all
LATENT_NORMS = ("instance", "batch", "none")


class LabelEncoder(_LatentEncoder):
    """f_label-enc (Eq. 10): one-hot labels ``(B, N, *spatial)`` -> standardised z_l(0) ``(B, C_l, *latent)``.

    ``latent_norm``: ``instance`` (:class:`LatentStandardize`, per sample and channel), ``batch`` (non-affine batch
    normalisation: batch statistics in training, running statistics in eval) or ``none``."""

    def __init__(self, arch_kwargs: dict, num_classes: int, latent_channels: int, latent_strides,
                 latent_norm: str = "instance"):
        super().__init__(arch_kwargs, num_classes, latent_channels, latent_strides)
        if latent_norm not in LATENT_NORMS:
            raise ValueError(f"latent_norm '{latent_norm}' (known: {', '.join(LATENT_NORMS)})")
        dim = conv_op_dim(resolve_arch_kwargs({"conv_op": arch_kwargs["conv_op"]})["conv_op"])
        batch_norm = getattr(nn, f"BatchNorm{dim}d")
        self.standardize = {"instance": LatentStandardize, "none": nn.Identity,
                            "batch": lambda: batch_norm(latent_channels, affine=False)}[latent_norm]()

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.standardize(super().forward(x0))


class ImageEncoder(_LatentEncoder):
    """f_image-enc (Eq. 9): image ``(B, M, *spatial)`` -> z_i ``(B, C_l, *latent)``, with self-attention after the
    last two downsampling stages (paper Sec. IV.B; ``attention=False`` leaves it out)."""

    def __init__(self, arch_kwargs: dict, input_channels: int, latent_channels: int, latent_strides,
                 attention: bool = True):
        down = [i for i, s in enumerate(latent_strides) if any(v > 1 for v in s)]
        super().__init__(arch_kwargs, input_channels, latent_channels, latent_strides,
                         attention_stages=down[-2:] if attention else ())


class LabelDecoder(nn.Module):
    """f_label-dec (Eq. 13): z ``(B, C_l, *latent)`` -> class logits ``(B, N, *spatial)``. The encoder's stages in
    reverse, each residual blocks then a transposed conv undoing that stage's stride; no skip connections in the
    paper. With ``image_skips`` the residual blocks of decoder stage i take, concatenated to their input, the image
    encoder's output of stage i (``ImageEncoder(..., return_skips=True)``, same resolution): a U-Net path from the
    image into the decoder, so thin structures need not pass through the latent."""

    def __init__(self, arch_kwargs: dict, num_classes: int, latent_channels: int, latent_strides,
                 image_skips: bool = False):
        super().__init__()
        kw = resolve_arch_kwargs(arch_kwargs)
        conv_op, common = kw["conv_op"], _common_kwargs(kw)
        transp = get_matching_convtransp(conv_op)
        features, kernels, blocks = stage_settings(arch_kwargs, len(latent_strides))
        self.image_skips = bool(image_skips)
        self._skip_stage = {}  # index in self.blocks -> the encoder stage whose output it concatenates
        layers, ch = [], latent_channels
        for i in reversed(range(len(latent_strides))):
            if self.image_skips:
                self._skip_stage[len(layers)] = i
            extra = features[i] if self.image_skips else 0
            layers.append(StackedResidualBlocks(blocks[i], conv_op, ch + extra, features[i], kernels[i], 1, **common))
            ch = features[i]
            stride = latent_strides[i]
            if any(s > 1 for s in stride):
                nxt = features[max(i - 1, 0)]
                layers.append(transp(ch, nxt, stride, stride, bias=kw.get("conv_bias", True)))
                ch = nxt
        self.blocks = nn.Sequential(*layers)
        self.head = conv_op(ch, num_classes, 1, 1, 0, bias=True)

    def forward(self, z: torch.Tensor, skips: list | None = None) -> torch.Tensor:
        """``skips``: the image encoder's stage outputs (shallowest first), required with ``image_skips``."""
        if not self.image_skips:
            return self.head(self.blocks(z))
        if skips is None:
            raise ValueError("this label decoder was built with image_skips: pass the image encoder's stage outputs")
        for index, layer in enumerate(self.blocks):
            if index in self._skip_stage:
                z = torch.cat([z, skips[self._skip_stage[index]].to(z.dtype)], dim=1)
            z = layer(z)
        return self.head(z)
