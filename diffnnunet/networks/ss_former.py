"""MedSegDiff-V2's Semantic Condition: the Spectrum-Space Transformer (SS-Former) with its timestep-adaptive Neural
Band-Pass Filter (NBP-Filter), dimension-agnostic (the FFTs run over every spatial axis of the token grid).

Tokens are the bottleneck positions ("patchified" with patch size 1 at the bottleneck, where nnU-Net's topology has
already reduced a patch to a few voxels per axis); when the grid has more than ``max_tokens`` positions it is
average-pooled (the largest axis halved until it fits) and the block's output upsampled back, so the N x N affinity
maps stay affordable in 3D (``max_tokens`` None: never pooled, the paper). See documentation/medsegdiff_v2.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def frequency_coordinates(grid, device=None) -> torch.Tensor:
    """Normalised DFT frequencies of every position of ``grid`` (D axes), flattened: ``(N, D)``, N = prod(grid),
    values in [-0.5, 0.5) (``torch.fft.fftfreq`` per axis), in the row-major order of ``torch.fft.fftn``."""
    axes = [torch.fft.fftfreq(int(n), device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


class NBPFilter(nn.Module):
    """Neural band-pass filter: (coordinate map of M, t) -> filter ``(B, N, N)`` in (0, 1).

    The coordinate map of the affinity M ``(N_q x N_k)`` holds, at entry (i, j), the frequencies of query position i
    and key position j (2D values). ``R`` blocks of a pointwise (1x1) layer, layer normalisation and a scale and shift
    that two MLP layers project from the diffusion timestep embedding (one scalar pair per block and sample), then a
    last pointwise layer and a sigmoid (MedSegDiff-V2, "NBP-Filter").
    """

    def __init__(self, dim: int, temb_dim: int, width: int = 16, blocks: int = 6):
        super().__init__()
        self.inp = nn.Linear(2 * dim, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(width, elementwise_affine=False) for _ in range(blocks))
        self.film = nn.ModuleList(nn.Sequential(nn.Linear(temb_dim, width), nn.SiLU(), nn.Linear(width, 2))
                                  for _ in range(blocks))
        self.out = nn.Linear(width, 1)

    def forward(self, grid, temb: torch.Tensor) -> torch.Tensor:
        """``grid``: the token grid (D sizes); ``temb`` ``(B, temb_dim)`` -> filter ``(B, N, N)``."""
        coords = frequency_coordinates(grid, temb.device)
        n = coords.shape[0]
        pairs = torch.cat([coords[:, None].expand(n, n, -1), coords[None].expand(n, n, -1)], dim=-1)
        h = F.silu(self.inp(pairs.to(temb.dtype)))[None]  # (1, N, N, width)
        for layer, norm, film in zip(self.layers, self.norms, self.film):
            scale, shift = film(temb).unbind(-1)  # (B,) each: the "mean and variance" of the paper
            h = F.silu(norm(layer(h)) * (1 + scale[:, None, None, None]) + shift[:, None, None, None])
        return torch.sigmoid(self.out(h)[..., 0])


def _complex_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A real bias-free linear map applied to complex tokens ``(..., d)``: W Re(x) + i W Im(x)."""
    weight = weight.to(x.real.dtype)
    return torch.complex(F.linear(x.real, weight), F.linear(x.imag, weight))


class SpectralCrossAttention(nn.Module):
    """One attention module of an SS-Former block on token maps ``(B, N, d)`` laid out on ``grid``.

    F(.) is the orthonormal DFT over the grid's axes. M = (F(q) W^q)(F(k) W^k)^H / sqrt(d) ``(B, N, N)``, the
    NBP-Filter multiplies it (M' = M * filter), and M' goes back to space: A = Re(F^H M' F), which is exactly
    (q W^q)(k W^k)^T / sqrt(d) when the filter is 1 (the spectral affinity of a pass-all filter is the spatial one).
    The values get f = softmax(A) (kv W^v) (``softmax``, the recipe: the softmax over keys keeps the attention
    bounded) or the paper's f = A (kv W^v) = F^-1(M') (c W^v) (``softmax=False``), then q + W^o f and an MLP with
    a residual (the paper's "MLP to further refine"). Tokens ``(B, N, d)`` in, ``(B, N, d)`` out.
    """

    def __init__(self, dim: int, spatial_dims: int, temb_dim: int, nbp_filter: bool = True, nbp_width: int = 16,
                 nbp_blocks: int = 6, softmax: bool = True):
        super().__init__()
        self.softmax = bool(softmax)
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.wv, self.wo = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.filter = NBPFilter(spatial_dims, temb_dim, nbp_width, nbp_blocks) if nbp_filter else None
        self.scale = 1 / math.sqrt(dim)

    def affinity(self, q: torch.Tensor, k: torch.Tensor, grid, temb: torch.Tensor | None) -> torch.Tensor:
        """Spatial attention logits A ``(B, N, N)`` from queries ``q`` and keys ``k`` ``(B, N, d)``."""
        b, n, d = q.shape
        axes = tuple(range(1, 1 + len(grid)))
        fq = torch.fft.fftn(q.float().reshape(b, *grid, d), dim=axes, norm="ortho").reshape(b, n, d)
        fk = torch.fft.fftn(k.float().reshape(b, *grid, d), dim=axes, norm="ortho").reshape(b, n, d)
        m = _complex_linear(self.wq.weight, fq) @ _complex_linear(self.wk.weight, fk).conj().transpose(1, 2)
        m = m * self.scale
        if self.filter is not None:
            m = m * self.filter(grid, temb.float())
        qaxes, kaxes = tuple(range(1, 1 + len(grid))), tuple(range(1 + len(grid), 1 + 2 * len(grid)))
        m = m.reshape(b, *grid, *grid)
        a = torch.fft.fftn(torch.fft.ifftn(m, dim=qaxes, norm="ortho"), dim=kaxes, norm="ortho")
        return a.real.reshape(b, n, n)

    def forward(self, q, kv, grid, temb):
        a = self.affinity(self.norm_q(q), self.norm_kv(kv), grid, temb).to(q.dtype)
        f = (torch.softmax(a, dim=-1) if self.softmax else a) @ self.wv(self.norm_kv(kv))
        out = q + self.wo(f)
        return out + self.mlp(self.norm_mlp(out))


def token_grid(grid, max_tokens: int | None) -> list[int]:
    """The pooled token grid: ``grid`` with its largest axis halved (rounded up) until prod <= ``max_tokens``
    (None: ``grid`` itself, no pooling)."""
    grid = [int(g) for g in grid]
    while max_tokens is not None and math.prod(grid) > max_tokens and max(grid) > 1:
        i = grid.index(max(grid))
        grid[i] = (grid[i] + 1) // 2
    return grid


class SSFormer(nn.Module):
    """N SS-Former blocks: ``forward(e (B, C, *sp), c (B, C, *sp), temb (B, T)) -> (B, C, *sp)``.

    e is the Diffusion Model's bottleneck (noise embedding), c the Condition Model's (semantic embedding). Block n:
    c~ = Attn(q=e, kv=c^n) (the noise embedding encoded into the semantic one), c^{n+1} = Attn(q=c~, kv=e) (back to
    the noise domain). The tokens are linearly projected from C to ``dim`` channels first; the result is
    e + W c^N (W: ``dim`` -> C, zero-initialised: training starts from the plain Diffusion Model). Both maps are
    pooled to at most ``max_tokens`` positions first (:func:`token_grid`; None: never) and the update is upsampled
    back (trilinear / bilinear). ``softmax``: see :class:`SpectralCrossAttention`.
    """

    def __init__(self, channels: int, spatial_dims: int, temb_dim: int, blocks: int = 4, nbp_filter: bool = True,
                 max_tokens: int | None = 64, nbp_width: int = 16, nbp_blocks: int = 6, dim: int | None = None,
                 softmax: bool = True):
        super().__init__()
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        dim = int(dim or channels)
        self.embed_e, self.embed_c = nn.Linear(channels, dim), nn.Linear(channels, dim)  # the linear projection
        args = (dim, spatial_dims, temb_dim, nbp_filter, nbp_width, nbp_blocks, softmax)
        self.to_semantic = nn.ModuleList(SpectralCrossAttention(*args) for _ in range(blocks))
        self.to_noise = nn.ModuleList(SpectralCrossAttention(*args) for _ in range(blocks))
        self.out = nn.Linear(dim, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, e: torch.Tensor, c: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        spatial = list(e.shape[2:])
        grid = token_grid(spatial, self.max_tokens)
        if grid != spatial:
            pool = getattr(F, f"adaptive_avg_pool{len(grid)}d")
            e_tok, c_tok = pool(e, grid), pool(c, grid)
        else:
            e_tok, c_tok = e, c
        b, ch = e.shape[:2]
        e_tok = self.embed_e(e_tok.flatten(2).transpose(1, 2))  # (B, N, d)
        c_tok = self.embed_c(c_tok.flatten(2).transpose(1, 2).to(e_tok.dtype))
        for to_semantic, to_noise in zip(self.to_semantic, self.to_noise):
            c_mixed = to_semantic(e_tok, c_tok, grid, temb)
            c_tok = to_noise(c_mixed, e_tok, grid, temb)
        update = self.out(c_tok).transpose(1, 2).reshape(b, ch, *grid)
        if grid != spatial:
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(grid)]
            update = F.interpolate(update, size=spatial, mode=mode, align_corners=False)
        return e + update

    @staticmethod
    def feature_map_size(channels: int, spatial, blocks: int, nbp_filter: bool, max_tokens: int | None,
                         nbp_width: int, nbp_blocks: int, dim: int | None = None) -> int:
        """Activation elements of one sample (planner proxy): per attention module the token maps (normalised q,
        kv, the q/k spectra and projections (complex: 2 each), v, f, output, MLP hidden 2d, residuals ~ 14 N d),
        the N x N maps (complex M, M', inverse transforms: 8; A and its softmax: 2) and the NBP-Filter's
        ``nbp_blocks`` x 4 width-wide N x N activations; plus the pooled / upsampled maps."""
        grid = token_grid(spatial, max_tokens)
        n, d = math.prod(grid), int(dim or channels)
        per_module = 14 * n * d + 10 * n * n + (4 * nbp_blocks + 2) * nbp_width * n * n * int(nbp_filter)
        return int(2 * blocks * per_module + 4 * channels * math.prod(int(s) for s in spatial) + 3 * n * d)
