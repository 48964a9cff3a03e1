"""A U-Net whose every stage is conditioned on the diffusion timestep, built from nnU-Net's topology.

The constructor takes exactly the ``arch_kwargs`` nnU-Net's planner writes for ``PlainConvUNet`` (conv op, stages,
features, kernel sizes, strides, convs per stage, norm, nonlinearity), so anisotropic kernels and strides, 2D and 3D
all come from the plans. Conv blocks are nnU-Net's own (``StackedConvBlocks``); the timestep embedding is added after
the first conv of every encoder and decoder stage.

Conditioning hooks (small, optional; methods plug their modules in instead of copying the network):

- ``added``: features summed onto every encoder stage (Diff-UNet's image encoder);
- ``encoder_hook(s, h) -> h``: any module applied to encoder stage ``s``'s output before it is passed on and
  kept as a skip (MedSegDiff-V2's U-SA gate into the first stage);
- ``bottleneck_hook(h, temb) -> h``: a block at the bottleneck that also sees the timestep embedding
  (MedSegDiff-V2's SS-Former);
- ``return_features=True``: also return the last decoder feature ``(B, F0, *spatial)`` before the 1x1 head
  (MedSegDiff-V2's anchor condition);
- ``latent_dim`` + ``latent (B, latent_dim)``: adaptive normalisation, a per-channel scale and shift of every
  stage's first conv output projected from a latent embedding (cDAL's z);
- ``residual=True``: every stage becomes a residual block, its conv stack plus a shortcut of its input (identity,
  or a strided 1x1 conv where the channels or the resolution change; cDAL's generator and discriminator).
"""
from __future__ import annotations

import math
import pydoc

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

from diffnnunet.utils import expand_to

_IMPORTED_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def resolve_arch_kwargs(arch_kwargs: dict) -> dict:
    """Turn the dotted class names of a plans ``arch_kwargs`` into classes (as nnU-Net's get_network_from_plans)."""
    kw = dict(arch_kwargs)
    for key in _IMPORTED_KWARGS:
        if isinstance(kw.get(key), str):
            located = pydoc.locate(kw[key])
            if located is None:
                raise ImportError(f"plans name '{kw[key]}' for {key}, which cannot be imported")
            kw[key] = located
    return kw


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of integer timesteps ``(B,)`` followed by a 2-layer MLP -> ``(B, dim)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return self.mlp(emb)


class _Stage(nn.Module):
    """``n`` convs (the first with ``stride``); an optional projected time embedding is added after the first.
    With ``residual`` the stage is a residual block: out = convs(x) + shortcut(x), the shortcut the identity when
    the shape is kept, else a 1x1 conv with the stage's stride (``(B, in_ch, *sp)`` -> ``(B, out_ch, *sp / stride)``).
    """

    def __init__(self, n_convs, conv_op, in_ch, out_ch, kernel, stride, common: dict, temb_dim: int | None,
                 latent_dim: int | None = None, residual: bool = False):
        super().__init__()
        self.first = StackedConvBlocks(1, conv_op, in_ch, out_ch, kernel, stride, **common)
        self.rest = (StackedConvBlocks(n_convs - 1, conv_op, out_ch, out_ch, kernel, 1, **common)
                     if n_convs > 1 else None)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, out_ch)) if temb_dim else None
        self.latent_proj = nn.Linear(latent_dim, 2 * out_ch) if latent_dim else None
        if self.latent_proj is not None:  # starts as the identity modulation (scale 0, shift 0)
            nn.init.zeros_(self.latent_proj.weight)
            nn.init.zeros_(self.latent_proj.bias)
        self.stride = list(stride) if isinstance(stride, (list, tuple)) else [stride] * conv_op_dim(conv_op)
        self.out_ch, self.n_convs, self.residual = out_ch, n_convs, bool(residual)
        projected = in_ch != out_ch or any(s != 1 for s in self.stride)
        self.shortcut = (conv_op(in_ch, out_ch, 1, self.stride, 0, bias=False) if residual and projected
                         else None)

    def forward(self, x, temb=None, latent=None):
        h = self._convs(x, temb, latent)
        if not self.residual:
            return h
        return h + (self.shortcut(x) if self.shortcut is not None else x)

    def _convs(self, x, temb=None, latent=None):
        h = self.first(x)
        if self.time_proj is not None:
            h = h + expand_to(self.time_proj(temb), h)
        if self.latent_proj is not None and latent is not None:  # h (1 + scale(z)) + shift(z), per channel
            scale, shift = self.latent_proj(latent).chunk(2, dim=1)
            h = h * (1 + expand_to(scale, h)) + expand_to(shift, h)
        return self.rest(h) if self.rest is not None else h

    def feature_map_size(self, input_size) -> np.int64:
        out = [i // s for i, s in zip(input_size, self.stride)]
        # the sum with the embedding is one more map, the latent modulation another
        maps = self.n_convs + (1 if self.time_proj is not None else 0) + (1 if self.latent_proj is not None else 0)
        maps += int(self.residual) + int(self.shortcut is not None)  # the residual sum, the projected shortcut
        return np.int64(maps) * np.prod([self.out_ch, *out], dtype=np.int64)


def _common_kwargs(kw: dict) -> dict:
    return {"conv_bias": kw.get("conv_bias", True), "norm_op": kw.get("norm_op"),
            "norm_op_kwargs": kw.get("norm_op_kwargs"), "dropout_op": kw.get("dropout_op"),
            "dropout_op_kwargs": kw.get("dropout_op_kwargs"), "nonlin": kw.get("nonlin"),
            "nonlin_kwargs": kw.get("nonlin_kwargs")}


def _as_list(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class UNetEncoder(nn.Module):
    """Encoder half of the plans topology. ``forward(x (B, C_in, *spatial), temb=None, added=None)`` returns the
    list of stage outputs, finest first; ``added[s]`` (same shapes) is summed onto stage ``s`` before it is passed on
    (Diff-UNet Eq. 2: image features fused into the denoiser's encoder); ``hook(s, h) -> h`` then transforms it;
    ``latent`` ``(B, latent_dim)`` modulates every stage when built with ``latent_dim``; ``residual`` makes every
    stage a residual block (:class:`_Stage`)."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, temb_dim: int | None = None, latent_dim: int | None = None,
                 residual: bool = False, **kwargs):
        super().__init__()
        conv_op = resolve_arch_kwargs({"conv_op": conv_op})["conv_op"]
        self.features = _as_list(features_per_stage, n_stages)
        self.kernel_sizes = [_as_list(k, conv_op_dim(conv_op)) for k in _as_list(kernel_sizes, n_stages)]
        self.strides = [_as_list(s, conv_op_dim(conv_op)) for s in _as_list(strides, n_stages)]
        n_convs = _as_list(n_conv_per_stage, n_stages)
        common = _common_kwargs(resolve_arch_kwargs(kwargs))
        stages, ch = [], input_channels
        for s in range(n_stages):
            stages.append(_Stage(n_convs[s], conv_op, ch, self.features[s], self.kernel_sizes[s], self.strides[s],
                                 common, temb_dim, latent_dim, residual))
            ch = self.features[s]
        self.stages = nn.ModuleList(stages)
        self.conv_op = conv_op

    def forward(self, x, temb=None, added=None, hook=None, latent=None):
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x, temb, latent)
            if added is not None:
                x = x + added[s]
            if hook is not None:
                x = hook(s, x)
            skips.append(x)
        return skips

    def feature_map_size(self, input_size) -> np.int64:
        total = np.int64(0)
        for stage in self.stages:
            total += stage.feature_map_size(input_size)
            input_size = [i // s for i, s in zip(input_size, stage.stride)]
        return total

    def stage_output_size(self, input_size) -> np.int64:
        """Elements of the stage outputs alone (one map per stage), e.g. the cost of summing features onto them."""
        total = np.int64(0)
        for stage in self.stages:
            input_size = [i // s for i, s in zip(input_size, stage.stride)]
            total += np.prod([stage.out_ch, *input_size], dtype=np.int64)
        return total


def conv_op_dim(conv_op) -> int:
    return {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv_op]


class TimeUNet(nn.Module):
    """Time-conditioned U-Net. ``forward(x (B, C_in, *spatial), t (B,), added=None) -> (B, num_classes, *spatial)``.

    Signature-compatible with nnU-Net's ``PlainConvUNet`` so ``get_network_from_plans`` can build it; ``t=None``
    skips the time embedding (used when the same class serves as a plain segmentation network). The optional
    hooks of the module docstring (``encoder_hook``, ``bottleneck_hook``, ``return_features``, ``latent``) are
    how methods condition it; with none given it is the plain time-conditioned U-Net. ``residual=True`` makes every
    encoder and decoder stage a residual block (off: nnU-Net's plain stages).
    """

    def __init__(self, input_channels: int, num_classes: int, n_stages: int, features_per_stage, conv_op,
                 kernel_sizes, strides, n_conv_per_stage, n_conv_per_stage_decoder, conv_bias: bool = True,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None, deep_supervision: bool = False, time_embedding: bool = True,
                 latent_dim: int | None = None, residual: bool = False):
        super().__init__()
        common_in = {"conv_bias": conv_bias, "norm_op": norm_op, "norm_op_kwargs": norm_op_kwargs,
                     "dropout_op": dropout_op, "dropout_op_kwargs": dropout_op_kwargs, "nonlin": nonlin,
                     "nonlin_kwargs": nonlin_kwargs}
        features = _as_list(features_per_stage, n_stages)
        self.temb_dim = 4 * features[0] if time_embedding else None
        self.time_embed = TimeEmbedding(self.temb_dim) if time_embedding else None
        self.encoder = UNetEncoder(input_channels, n_stages, features, conv_op, kernel_sizes, strides,
                                   n_conv_per_stage, temb_dim=self.temb_dim, latent_dim=latent_dim,
                                   residual=residual, **common_in)
        conv_op = self.encoder.conv_op
        transp = get_matching_convtransp(conv_op)
        common = _common_kwargs(resolve_arch_kwargs(common_in))
        n_dec = _as_list(n_conv_per_stage_decoder, n_stages - 1)
        ups, stages = [], []
        for s in range(n_stages - 2, -1, -1):  # coarse to fine
            stride = self.encoder.strides[s + 1]
            ups.append(transp(features[s + 1], features[s], stride, stride, bias=conv_bias))
            stages.append(_Stage(n_dec[s], conv_op, 2 * features[s], features[s], self.encoder.kernel_sizes[s], 1,
                                 common, self.temb_dim, latent_dim, residual))
        self.ups, self.dec_stages = nn.ModuleList(ups), nn.ModuleList(stages)
        self.head = conv_op(features[0], num_classes, 1, 1, 0, bias=True)
        self.num_classes = num_classes
        self.deep_supervision = False  # one full-resolution output; kept for nnU-Net API compatibility

    def embed_time(self, t: torch.Tensor | None):
        return None if (t is None or self.time_embed is None) else self.time_embed(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, added=None, encoder_hook=None,
                bottleneck_hook=None, latent: torch.Tensor | None = None, return_features: bool = False):
        """Logits ``(B, num_classes, *spatial)``; with ``return_features`` the tuple (logits, last decoder
        feature ``(B, features[0], *spatial)``)."""
        temb = self.embed_time(t)
        if self.time_embed is not None and temb is None:  # plain call (e.g. nnU-Net's network plot): t = 0
            temb = self.time_embed(torch.zeros(x.shape[0], device=x.device, dtype=torch.long))
        skips = self.encoder(x, temb, added, encoder_hook, latent)
        h = skips[-1]
        if bottleneck_hook is not None:
            h = bottleneck_hook(h, temb)
        for i, (up, stage) in enumerate(zip(self.ups, self.dec_stages)):
            h = stage(torch.cat([up(h), skips[-(i + 2)]], dim=1), temb, latent)
        logits = self.head(h)
        return (logits, h) if return_features else logits

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Number of feature-map elements for one sample of ``input_size`` (nnU-Net's VRAM proxy, same convention
        as ``PlainConvUNet``: one map per conv output, plus one per time-embedding sum)."""
        total = self.encoder.feature_map_size(input_size)
        sizes, size = [], list(input_size)
        for s in self.encoder.strides:
            size = [i // j for i, j in zip(size, s)]
            sizes.append(size)
        for i, stage in enumerate(self.dec_stages):
            level = len(sizes) - 2 - i
            total += np.prod([stage.out_ch, *sizes[level]], dtype=np.int64)  # transposed conv output
            total += stage.feature_map_size(sizes[level])
        total += np.prod([self.num_classes, *sizes[0]], dtype=np.int64)
        return total
