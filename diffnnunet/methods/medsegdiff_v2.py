"""MedSegDiff-V2 (Wu et al., AAAI 2024): a Condition Model (plain U-Net on the image, anchor loss) conditions an
eps-predicting Diffusion Model (time-conditioned U-Net on cat(image, x_t)) through the Anchor Condition with U-SA
(first encoder stage) and the Semantic Condition with SS-Former + NBP-Filter (bottleneck); S DDIM samples fused by
STAPLE. Extended to nnU-Net's multi-class labels and regions, 2D and 3D. See documentation/medsegdiff_v2.md."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnnunet.config import method_defaults
from diffnnunet.methods.base import DiffusionMethod, masked_mean, soft_dice_loss
from diffnnunet.methods.staple import staple_fuse
from diffnnunet.methods.uncertainty import ChainStatistics, odds_to_categorical
from diffnnunet.networks import TimeUNet, resolve_arch_kwargs
from diffnnunet.networks.ss_former import SSFormer
from diffnnunet.networks.time_unet import conv_op_dim
from diffnnunet.processes import GaussianProcess

MULTICLASS_MODES = ("categorical", "per_channel")
FUSIONS = ("staple", "mean")
#: how the Diffusion Model's output becomes x0_theta under ``prediction: x0`` (see MedSegDiffV2.network_forward)
X0_OUTPUTS = ("sigmoid", "linear")
#: the Anchor Condition: U-SA (true), none (false) or Table 4's plain spatial attention ("sa")
U_SA_MODES = (True, False, "sa")


class GaussianSmoothing(nn.Module):
    """Depthwise convolution with a learnable Gaussian kernel, one sigma per channel: ``(B, C, *sp)`` -> same.

    k(x) = prod_axes exp(-x_a^2 / (2 sigma_c^2)), normalised to sum 1; ``size`` per axis (1 = no smoothing along it,
    for the in-plane-only stages nnU-Net plans for thick slices); zero padding."""

    def __init__(self, channels: int, size, sigma: float = 1.0):
        super().__init__()
        self.size = [int(s) for s in size]
        self.log_sigma = nn.Parameter(torch.full((channels,), float(sigma)).log())

    def kernel(self) -> torch.Tensor:
        """``(C, 1, *size)``."""
        sigma = self.log_sigma.exp()
        k = sigma.new_ones((sigma.shape[0],) + (1,) * len(self.size))
        for axis, n in enumerate(self.size):
            x = torch.arange(n, dtype=sigma.dtype, device=sigma.device) - (n - 1) / 2
            g = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
            shape = [sigma.shape[0]] + [1] * len(self.size)
            shape[1 + axis] = n
            k = k * g.reshape(shape)
        k = k / k.flatten(1).sum(1).reshape(-1, *([1] * len(self.size)))
        return k[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(F, f"conv{x.ndim - 2}d")
        return conv(x, self.kernel().to(x.dtype), padding=[n // 2 for n in self.size], groups=x.shape[1])


class USA(nn.Module):
    """Uncertain Spatial Attention (Eqs. 4-5): f_anc = max(f_c * k_Gauss, f_c);
    f_d' = sigmoid(f_anc * k_1x1) . f_d + f_d, with f_c the Condition Model's last decoder feature and f_d the
    Diffusion Model's first encoder feature, both ``(B, F0, *spatial)``; the 1x1 conv maps F0 channels to 1.
    ``uncertain=False`` is the plain Spatial Attention of Table 4's "SA" row: f_anc = f_c (no learnable Gaussian,
    no max), f_d' = sigmoid(f_c * k_1x1) . f_d + f_d."""

    def __init__(self, channels: int, dim: int, size, uncertain: bool = True):
        super().__init__()
        self.smooth = GaussianSmoothing(channels, size) if uncertain else None
        self.proj = getattr(nn, f"Conv{dim}d")(channels, 1, 1)

    def forward(self, f_c: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        f_anc = torch.maximum(self.smooth(f_c), f_c) if self.smooth is not None else f_c
        return torch.sigmoid(self.proj(f_anc.to(f_d.dtype))) * f_d + f_d


class MedSegDiffV2(DiffusionMethod):
    """Condition Model C(I) -> (anchor logits, last decoder feature f_c, bottleneck c); Diffusion Model
    eps_theta(cat(I, x_t), t) (x0_theta under plans ``prediction: x0``) with U-SA(f_c) on its first encoder stage
    and SS-Former(e, c, t) at its bottleneck.

    Args:
        arch_kwargs: the configuration's ``architecture.arch_kwargs`` (the topology of both U-Nets).
        input_channels: image channels M. num_classes: label channels N (one-hot with background, or regions).
        diffusion: the plans' ``diffusion`` section (keys in documentation/medsegdiff_v2.md): ``u_sa``,
            ``ss_former``, ``nbp_filter`` switch the parts (the paper's Table 4 ablation); ``anchor_alpha``,
            ``anchor_beta`` (Eq. 3); ``ss_blocks``, ``ss_dim`` (token width, at most the bottleneck's channels),
            ``nbp_blocks``, ``nbp_width``, ``max_tokens`` (null: no pooling); ``u_sa: "sa"`` the plain spatial
            attention of Table 4; ``diffusion_image`` (the image also enters the Diffusion Model; False: x_t
            alone, the paper's Fig. 1), ``ss_softmax`` (softmax over keys in the spectral attention); ``fusion``
            (``staple``, the paper, or ``mean``); ``anchor_weight`` (w: the output is (1 - w) fused chains + w
            the anchor's probabilities; 0 in the paper recipe); ``multiclass`` (``categorical``: softmax anchor for
            exclusive labels; ``per_channel``: sigmoids for regions).
    """

    name = "medsegdiff_v2"
    plans_name = "MedSegDiffV2Plans"
    probabilities = "per_channel"  # STAPLE posteriors, one per channel

    def __init__(self, arch_kwargs: dict, input_channels: int, num_classes: int, diffusion: dict):
        super().__init__(diffusion)
        diffusion = self.settings  # every key present (diffnnunet.config.resolve_diffusion)
        arch = resolve_arch_kwargs(arch_kwargs)
        self.num_classes = int(num_classes)
        self.process = GaussianProcess(diffusion["timesteps"], diffusion["schedule"],
                                       diffusion["beta_start"], diffusion["beta_end"],
                                       prediction=diffusion["prediction"])
        self.alpha = int(diffusion["anchor_alpha"])
        self.beta = float(diffusion["anchor_beta"])
        self.eta = float(diffusion["eta"])
        self.x0_output = diffusion["x0_output"]
        self.fusion = diffusion["fusion"]
        self.anchor_weight = float(diffusion["anchor_weight"])
        self.multiclass = diffusion["multiclass"]
        self.multiclass = "categorical" if self.multiclass == "auto" else self.multiclass
        if (self.fusion not in FUSIONS or self.multiclass not in MULTICLASS_MODES
                or self.x0_output not in X0_OUTPUTS):
            raise ValueError(f"MedSegDiff-V2 plans: fusion '{self.fusion}' (known: {', '.join(FUSIONS)}), "
                             f"multiclass '{self.multiclass}' (known: auto, {', '.join(MULTICLASS_MODES)}), "
                             f"x0_output '{self.x0_output}' (known: {', '.join(X0_OUTPUTS)})")
        if not 0.0 <= self.anchor_weight <= 1.0:
            raise ValueError(f"MedSegDiff-V2 plans: anchor_weight {self.anchor_weight} is not in [0, 1]")
        if diffusion["u_sa"] not in U_SA_MODES:
            raise ValueError(f"MedSegDiff-V2 plans: u_sa {diffusion['u_sa']!r} (known: true, false, \"sa\")")
        self.diffusion_image = bool(diffusion["diffusion_image"])
        self.condition = TimeUNet(input_channels, self.num_classes, **arch, time_embedding=False)
        self.diffusion = TimeUNet(input_channels * self.diffusion_image + self.num_classes, self.num_classes,
                                  **arch, time_embedding=True)
        dim = conv_op_dim(arch["conv_op"])
        features, kernels = self.diffusion.encoder.features, self.diffusion.encoder.kernel_sizes
        self.u_sa = (USA(features[0], dim, [5 if k > 1 else 1 for k in kernels[0]], diffusion["u_sa"] is True)
                     if diffusion["u_sa"] else None)
        max_tokens = diffusion["max_tokens"]
        self.ss_former = (SSFormer(features[-1], dim, self.diffusion.temb_dim, int(diffusion["ss_blocks"]),
                                   bool(diffusion["nbp_filter"]), None if max_tokens is None else int(max_tokens),
                                   int(diffusion["nbp_width"]), int(diffusion["nbp_blocks"]),
                                   min(int(diffusion["ss_dim"] or features[-1]), features[-1]),
                                   bool(diffusion["ss_softmax"]))
                          if diffusion["ss_former"] else None)

    @property
    def exclusive_labels(self) -> bool:
        """Mutually exclusive labels (one-hot with background) or regions: fixed by the plans' ``multiclass``."""
        return self.multiclass == "categorical"

    @property
    def categorical_chains(self) -> bool:
        """The map's chains are odds-normalised class probabilities for exclusive labels (see :meth:`sample`)."""
        return self.exclusive_labels

    @staticmethod
    def feature_map_size(arch_kwargs: dict, input_channels: int, num_classes: int, patch_size,
                         diffusion: dict | None = None) -> int:
        """VRAM proxy for the planner, one sample: both U-Nets (the Diffusion Model with its N extra input channels
        and time-embedding sums), U-SA's smoothed, max, gate, product and sum maps at full resolution and the
        SS-Former's tokens, N x N Fourier affinity maps and NBP-Filter activations
        (:meth:`SSFormer.feature_map_size`)."""
        settings = {**method_defaults("medsegdiff_v2"), **(diffusion or {}), "timesteps": 2}
        with torch.device("meta"):
            m = MedSegDiffV2(arch_kwargs, input_channels, num_classes, settings)
        patch = [int(p) for p in patch_size]
        total = m.condition.compute_conv_feature_map_size(patch) + m.diffusion.compute_conv_feature_map_size(patch)
        f0 = m.diffusion.encoder.features[0]
        voxels = int(torch.tensor(patch).prod())
        if m.u_sa is not None:  # U-SA: smoothed, max, gate, product, sum; the plain SA: gate, product, sum
            total += ((4 if m.u_sa.smooth is not None else 2) * f0 + 1) * voxels
        if m.ss_former is not None:
            bottleneck = list(patch)
            for stride in m.diffusion.encoder.strides:
                bottleneck = [b // s for b, s in zip(bottleneck, stride)]
            total += SSFormer.feature_map_size(m.diffusion.encoder.features[-1], bottleneck, settings["ss_blocks"],
                                               settings["nbp_filter"], settings["max_tokens"], settings["nbp_width"],
                                               settings["nbp_blocks"], m.ss_former.to_semantic[0].wq.in_features)
        return int(total)

    # -- networks --------------------------------------------------------------------------------------------------
    def condition_forward(self, image: torch.Tensor):
        """Condition Model on ``image`` ``(B, M, *sp)`` -> (anchor logits ``(B, N, *sp)``, last decoder feature f_c
        ``(B, F0, *sp)``, bottleneck embedding c ``(B, F_last, *bottleneck)``)."""
        kept = {}

        def keep(h, _temb):
            kept["c"] = h
            return h

        logits, f_c = self.condition(image, bottleneck_hook=keep, return_features=True)
        return logits, f_c, kept["c"]

    def network_forward(self, image: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                        cond=None) -> torch.Tensor:
        """eps_theta ``(B, N, *sp)`` for ``x_t`` ``(B, N, *sp)``, ``t`` ``(B,)``; ``cond`` = (f_c, c) from
        :meth:`condition_forward` (computed when None). Without ``x_t`` (nnU-Net's plain ``network(x)`` calls):
        the Condition Model's anchor logits. Under ``prediction: x0`` with ``x0_output: sigmoid`` (the default
        plans) the output is x0_theta = 2 sigmoid(z) - 1 of the U-Net's output z, in (-1, 1) like Diff-UNet's x0_hat;
        ``linear`` takes z itself (medsegdiff_v2.md, "x0 through a sigmoid")."""
        if x_t is None:
            return self.condition(image)
        if cond is None:
            cond = self.condition_forward(image)[1:]
        f_c, c = cond
        encoder_hook = bottleneck_hook = None
        if self.u_sa is not None:
            def encoder_hook(s, h):
                return self.u_sa(f_c, h) if s == 0 else h
        if self.ss_former is not None:
            def bottleneck_hook(h, temb):
                return self.ss_former(h, c, temb)
        inputs = torch.cat([image, x_t.to(image.dtype)], dim=1) if self.diffusion_image else x_t.to(image.dtype)
        out = self.diffusion(inputs, t, encoder_hook=encoder_hook, bottleneck_hook=bottleneck_hook)
        if self.x0_output == "sigmoid" and self.process.prediction == "x0":
            out = 2 * torch.sigmoid(out.float()) - 1
        return out

    def anchor_loss(self, logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor | None):
        """(L_dice, L_ce) of the anchor logits ``(B, N, *sp)``: softmax Dice + cross-entropy for exclusive labels,
        sigmoid Dice + binary cross-entropy per channel for regions; masked means."""
        logits = logits.float()
        if self.exclusive_labels:
            ce = masked_mean(-(x0 * F.log_softmax(logits, 1)).sum(1, keepdim=True), mask)
            return soft_dice_loss(torch.softmax(logits, 1), x0, mask), ce
        ce = masked_mean(F.binary_cross_entropy_with_logits(logits, x0, reduction="none"), mask)
        return soft_dice_loss(torch.sigmoid(logits), x0, mask), ce

    def training_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        """Eq. 3 averaged over the batch: L = mean_b ||eps - eps_theta||^2 + (1/B) sum_b [t_b = 0 mod alpha]
        (L_dice + beta L_ce), the anchor terms computed on the samples whose t is on the alpha grid. ``x0`` in
        {0, 1} ``(B, N, *sp)``; the diffusion runs on 2 x0 - 1. With ``prediction: x0`` (the default recipe) the
        Diffusion Model regresses x_0 instead: L_n = ||x_0 - x0_theta||^2."""
        x0_scaled = 2 * x0 - 1
        t = self.process.sample_timesteps(x0.shape[0], x0.device, generator) if t is None else t
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.process.q_sample(x0_scaled, t, noise)
        logits, f_c, c = self.condition_forward(image)
        out = self(image, x_t, t, (f_c, c))
        target = self.process.training_target(x0_scaled, noise, t)
        mse = masked_mean((out.float() - target) ** 2, mask)
        on_grid = (t % self.alpha) == 0
        # no t on the grid: a zero-weighted term keeps the anchor head in the graph (DDP without unused parameters)
        dice = ce = 0.0 * logits.float().sum()
        if bool(on_grid.any()):
            dice, ce = self.anchor_loss(logits[on_grid], x0[on_grid], None if mask is None else mask[on_grid])
        fraction = on_grid.float().mean()
        loss = mse + fraction * (dice + self.beta * ce)
        return {"loss": loss, "mse": mse.detach(), "anchor_dice": dice.detach(), "anchor_ce": ce.detach()}

    def step_modules(self) -> list:
        """The Diffusion Model (with U-SA and SS-Former) runs per step; the Condition Model once per window."""
        return [m for m in (self.diffusion, self.u_sa, self.ss_former) if m is not None]

    def benchmark_forward(self, image: torch.Tensor):
        _, f_c, c = self.condition_forward(image)
        x = torch.randn((image.shape[0], self.num_classes, *image.shape[2:]), device=image.device, dtype=image.dtype)
        t = torch.full((image.shape[0],), self.process.timesteps - 1, device=image.device, dtype=torch.long)
        return lambda: self(image, x, t, (f_c, c))

    def binarize(self, p: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A sample's decisions: one-hot of the argmax (exclusive labels) or p > 1/2 per channel (regions)."""
        if self.exclusive_labels:
            return torch.zeros_like(p, dtype=torch.bool).scatter_(dim, p.argmax(dim, keepdim=True), True)
        return p > 0.5

    @torch.no_grad()
    def sample(self, image, steps: int = 10, samples: int = 5, generator: torch.Generator | None = None,
               chunk: int | None = None, return_uncertainty: bool = False, uncertainty: str = "entropy"):
        """S DDIM chains (Song et al. Eq. 12 with x0 = (x_t - sqrt(1 - abar) eps_theta) / sqrt(abar), or x0_theta
        itself under ``prediction: x0``, clipped to [-1, 1]) on ``image`` ``(B, M, *sp)``, ``chunk`` chains per
        forward; the Condition Model runs once. Each chain's final x0 gives p = (x0 + 1) / 2 and its binary
        decision (:meth:`binarize`); the S decisions are fused by per-channel STAPLE (``fusion`` staple) or the p
        are averaged (``mean``), and the fused f is mixed with the Condition Model's anchor probabilities q
        (softmax for exclusive labels, sigmoid for regions): (1 - w) f + w q, w = ``anchor_weight`` (0: the chains
        alone, the paper; the public code's sampler blends its anchor in the same way). Returns ``(B, N, *sp)``;
        with ``return_uncertainty`` also the ``uncertainty`` map ``(B, 1, *sp)`` of the chains' p
        (:mod:`diffnnunet.methods.uncertainty`; class probabilities via :func:`odds_to_categorical` for
        exclusive labels)."""
        b, s = image.shape[0], max(1, int(samples))
        chunk = max(1, min(int(chunk or s), s))
        anchor, f_c, c = self.condition_forward(image)
        timesteps = self.process.set_timesteps(steps)
        chains = ChainStatistics(categorical=self.exclusive_labels, spread=return_uncertainty)
        decisions, p_sum = [], 0.0
        for start in range(0, s, chunk):
            n = min(chunk, s - start)
            image_n = image.repeat_interleave(n, 0)
            cond = (f_c.repeat_interleave(n, 0), c.repeat_interleave(n, 0))
            x = torch.randn((b * n, self.num_classes, *image.shape[2:]), generator=generator, device=image.device,
                            dtype=image.dtype)
            for i, t in enumerate(timesteps):
                tt = torch.full((b * n,), t, device=image.device, dtype=torch.long)
                out = self(image_n, x, tt, cond).to(x.dtype)
                x0_hat = self.process.predict_x0(out, x, tt).clamp(-1, 1)
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                x = self.process.step(x0_hat, x, t, t_prev, self.eta, generator)
            p = ((x0_hat.float() + 1) / 2).reshape(b, n, self.num_classes, *image.shape[2:])
            decisions.append(self.binarize(p, dim=2))
            p_sum = p_sum + p.sum(1)
            chains.add(odds_to_categorical(p, dim=2) if self.exclusive_labels else p)
        out = staple_fuse(torch.cat(decisions, 1)) if self.fusion == "staple" else p_sum / s
        if self.anchor_weight > 0:
            anchor = anchor.float()
            q = torch.softmax(anchor, 1) if self.exclusive_labels else torch.sigmoid(anchor)
            out = (1 - self.anchor_weight) * out + self.anchor_weight * q.to(out.dtype)
        return (out, chains.map(uncertainty)) if return_uncertainty else out
