"""Diff-UNet (Xing et al., MICCAI 2023): x0-predicting Gaussian diffusion on one-hot labels with a separate image
feature encoder and Step-Uncertainty Fusion. See documentation/diff_unet.md for the equation -> code map."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffnnunet.methods.base import DiffusionMethod, masked_mean, soft_dice_loss
from diffnnunet.methods.uncertainty import ChainStatistics, odds_to_categorical
from diffnnunet.networks import TimeUNet, UNetEncoder
from diffnnunet.processes import GaussianProcess


def logits_to_x0(logits: torch.Tensor) -> torch.Tensor:
    """The denoiser outputs a logit per channel; x0_hat = 2 sigmoid(logit) - 1 lies in [-1, 1], the space of the
    scaled one-hot labels. (The public code clipped the raw logit to [-1, 1] instead, which is not x0.)"""
    return 2 * torch.sigmoid(logits) - 1


def step_uncertainty(p_bar: torch.Tensor) -> torch.Tensor:
    """u_i = -p_bar log(p_bar), elementwise (Diff-UNet Eq. 4); ``p_bar`` is the mean over S samples."""
    return -p_bar * torch.log(p_bar.clamp(min=1e-12))


def fusion_weight(p_bar: torch.Tensor, step: int, scale: float) -> torch.Tensor:
    """w_i = exp(sigmoid(i / scale) * (1 - u_i)), ``step`` = i counted from 1 (Diff-UNet Sec. 2.3)."""
    return torch.exp(torch.sigmoid(torch.tensor(step / scale, dtype=p_bar.dtype)) * (1 - step_uncertainty(p_bar)))


class DiffUNet(DiffusionMethod):
    """Denoiser DU(cat(I, x_t), t, FE(I)) -> logit of x0 (Eq. 2) with a Gaussian process (Eq. 1).

    Args:
        arch_kwargs: the configuration's ``architecture.arch_kwargs`` (topology of both encoders and decoder).
        input_channels: image channels M. num_classes: label channels N (one-hot incl. background, or regions).
        diffusion: the configuration's ``diffusion`` section of the plans.
    """

    name = "diff_unet"

    def __init__(self, arch_kwargs: dict, input_channels: int, num_classes: int, diffusion: dict):
        super().__init__(diffusion)
        diffusion = self.settings  # every key present (diffnnunet.config.resolve_diffusion)
        self.num_classes = num_classes
        self.process = GaussianProcess(diffusion["timesteps"], diffusion["schedule"],
                                       diffusion["beta_start"], diffusion["beta_end"],
                                       prediction="x0")
        self.fusion = diffusion["fusion"]
        #: mutually exclusive labels (True, nnU-Net's default) or regions: how the sigmoids become an uncertainty
        #: map; the predictor sets it from the dataset's label manager
        self.exclusive_labels = True
        self.eta = float(diffusion["eta"])
        self.loss_weights = diffusion["loss_weights"]
        self.denoiser = TimeUNet(input_channels + num_classes, num_classes, **arch_kwargs, time_embedding=True)
        enc_kwargs = {k: v for k, v in arch_kwargs.items() if k not in ("n_conv_per_stage_decoder",)}
        self.feature_encoder = UNetEncoder(input_channels, **enc_kwargs)

    @staticmethod
    def feature_map_size(arch_kwargs: dict, input_channels: int, num_classes: int, patch_size) -> int:
        """VRAM proxy for the planner: denoiser (with the N extra noisy-label input channels and the time
        embedding sums) plus the separate feature encoder and the fused (summed) encoder maps."""
        m = DiffUNet(arch_kwargs, input_channels, num_classes, {"timesteps": 2})
        return int(m.denoiser.compute_conv_feature_map_size(patch_size)
                   + m.feature_encoder.feature_map_size(patch_size)
                   + m.feature_encoder.stage_output_size(patch_size))

    def network_forward(self, image: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                features=None) -> torch.Tensor:
        """Logit of x0, ``(B, N, *spatial)``. Without ``x_t`` (nnU-Net's plain ``network(x)`` calls) a zero label
        map at t = T-1 stands in, so the module still maps images to label logits."""
        if x_t is None:
            x_t = image.new_zeros((image.shape[0], self.num_classes, *image.shape[2:]))
            t = torch.full((image.shape[0],), self.process.timesteps - 1, device=image.device, dtype=torch.long)
        if features is None:
            features = self.feature_encoder(image)
        return self.denoiser(torch.cat([image, x_t], dim=1), t, added=features)

    def training_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        """L = L_dice + L_bce + L_mse on x0 (Eq. 3). ``x0`` in {0,1}; the diffusion runs on 2 x0 - 1."""
        x0_scaled = 2 * x0 - 1
        t = self.process.sample_timesteps(x0.shape[0], x0.device, generator) if t is None else t
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.process.q_sample(x0_scaled, t, noise)
        logits = self(image, x_t, t)
        w = self.loss_weights
        dice = soft_dice_loss(torch.sigmoid(logits), x0, mask)
        bce = masked_mean(F.binary_cross_entropy_with_logits(logits, x0, reduction="none"), mask)
        mse = masked_mean((logits_to_x0(logits) - x0_scaled) ** 2, mask)
        loss = w["dice"] * dice + w["bce"] * bce + w["mse"] * mse
        return {"loss": loss, "dice": dice.detach(), "bce": bce.detach(), "mse": mse.detach()}

    def benchmark_forward(self, image: torch.Tensor):
        features = self.feature_encoder(image)
        x = torch.randn((image.shape[0], self.num_classes, *image.shape[2:]), device=image.device, dtype=image.dtype)
        t = torch.full((image.shape[0],), self.process.timesteps - 1, device=image.device, dtype=torch.long)
        return lambda: self(image, x, t, features)

    @property
    def categorical_chains(self) -> bool:
        """The map's chains are odds-normalised class probabilities for exclusive labels (see :meth:`sample`)."""
        return bool(self.exclusive_labels)

    @torch.no_grad()
    def sample(self, image, steps: int = 10, samples: int = 4, generator: torch.Generator | None = None,
               chunk: int | None = None, return_uncertainty: bool = False, return_steps: bool = False,
               uncertainty: str = "entropy"):
        """DDIM (eta from the plans, 0 = deterministic) over S independent chains and Step-Uncertainty Fusion
        Y = sum_i w_i p_bar_i / sum_i w_i (Eq. 4 and the weight formula; normalised so Y is a probability).

        The feature encoder runs once per call, shared by all steps and samples; chains run ``chunk`` at a time
        (the plans' ``samples_per_forward``, derived from the memory budget). ``image``: ``(B, M, *spatial)``.
        Returns probabilities ``(B, N, *spatial)``; with ``return_uncertainty`` also the ``uncertainty`` map
        ``(B, 1, *spatial)`` of the S chains' final-step probabilities (:mod:`diffnnunet.methods.uncertainty`;
        for mutually exclusive labels, ``exclusive_labels``, the sigmoids turned into class probabilities by
        :func:`odds_to_categorical`, as the export does; per channel for regions), independent of SUF, which only
        decides the segmentation (its late, confident steps would hide the chains' disagreement); with
        ``return_steps`` also the per-step p_bar_i.
        """
        b, s = image.shape[0], max(1, int(samples))
        chunk = max(1, min(int(chunk or s), s))
        base_features = self.feature_encoder(image)
        timesteps = self.process.set_timesteps(steps)
        step_sums = [None] * len(timesteps)
        chains = ChainStatistics(categorical=self.exclusive_labels)
        for start in range(0, s, chunk):
            n = min(chunk, s - start)
            features = [f.repeat_interleave(n, 0) for f in base_features]
            image_n = image.repeat_interleave(n, 0)
            x = torch.randn((b * n, self.num_classes, *image.shape[2:]), generator=generator,
                            device=image.device, dtype=image.dtype)
            for i, t in enumerate(timesteps):
                tt = torch.full((b * n,), t, device=image.device, dtype=torch.long)
                logits = self(image_n, x, tt, features)
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                x = self.process.step(logits_to_x0(logits), x, t, t_prev, self.eta, generator)
                p = torch.sigmoid(logits).float().reshape(b, n, *logits.shape[1:])
                step_sums[i] = p.sum(1) if step_sums[i] is None else step_sums[i] + p.sum(1)
            if return_uncertainty:
                # the final step's probabilities of these n chains, as the export sees them
                chains.add(odds_to_categorical(p, dim=2) if self.exclusive_labels else p)
        per_step = [total / s for total in step_sums]
        out = self.fuse(per_step)
        if return_steps:
            return out, per_step
        return (out, chains.map(uncertainty)) if return_uncertainty else out

    def fuse(self, per_step: list) -> torch.Tensor:
        """Combine the per-step mean predictions p_bar_i: ``step_uncertainty`` (SUF, the paper), ``mean`` (the
        paper's simple fusion SF) or ``last`` (plain DDIM output)."""
        if self.fusion == "last":
            return per_step[-1]
        if self.fusion == "mean":
            return torch.stack(per_step).mean(0)
        weights = [fusion_weight(p, i + 1, len(per_step)) for i, p in enumerate(per_step)]
        return sum(w * p for w, p in zip(weights, per_step)) / sum(weights)
