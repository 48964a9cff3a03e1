"""LDSeg (Zaman et al. 2024): end-to-end latent diffusion segmentation. A label encoder maps one-hot labels to a
standardised latent, an image encoder to a conditioning latent of the same size, a time-conditioned denoiser
predicts the noise of the perturbed label latent and a label decoder maps (denoised) latents to class
probabilities. See documentation/ldseg.md for the equation -> code map and what differs from the paper."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffnnunet.config import RECIPE_MIN_LATENT_SIZE
from diffnnunet.methods.base import DiffusionMethod, masked_mean, soft_dice_loss
from diffnnunet.methods.uncertainty import ChainStatistics
from diffnnunet.networks import TimeUNet
from diffnnunet.networks.latent import (
    LATENT_DOWNSAMPLING,
    MIN_LATENT_SIZE,
    ImageEncoder,
    LabelDecoder,
    LabelEncoder,
    latent_layout,
    stage_settings,
    total_stride,
)
from diffnnunet.networks.time_unet import _common_kwargs, conv_op_dim, resolve_arch_kwargs
from diffnnunet.processes import GaussianProcess

DENOISED_LATENTS = ("paper", "x0")
#: what the latent denoiser outputs: eps (the paper, Eq. 17) or the clean latent x0 (well conditioned at t ~ T)
PREDICTIONS = ("eps", "x0")
#: decoder output: softmax over the N channels (exclusive labels) or a sigmoid per channel (nnU-Net regions)
MULTICLASS_MODES = ("categorical", "per_channel")


def ce_loss(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 14, L_CE = -sum_c y_c log(y_hat_c), y_hat = softmax(logits); masked mean over voxels. ``(B, N, *sp)``."""
    per_voxel = -(x0 * F.log_softmax(logits.float(), dim=1)).sum(1, keepdim=True)
    return masked_mean(per_voxel, mask)


def bce_loss(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 14 for independent per-channel (region) outputs: binary cross-entropy of sigmoid(logits), masked mean
    over voxels and channels. ``(B, N, *sp)``."""
    return masked_mean(F.binary_cross_entropy_with_logits(logits.float(), x0, reduction="none"), mask)


def latent_mask(mask: torch.Tensor | None, latent_shape) -> torch.Tensor | None:
    """The ignore mask ``(B, 1, *spatial)`` averaged onto the latent grid: the fraction of each latent cell's
    voxels that count, used as the weight of that cell in the noise loss (Eq. 17)."""
    if mask is None:
        return None
    pool = getattr(F, f"adaptive_avg_pool{mask.ndim - 2}d")
    return pool(mask.float(), tuple(latent_shape))


class LDSeg(DiffusionMethod):
    """f_label-enc, f_image-enc, f_denoiser, f_label-dec and the Gaussian process (cosine, eps-prediction).

    Args:
        arch_kwargs: the configuration's ``architecture.arch_kwargs`` (ops, features, kernels, strides).
        input_channels: image channels M. num_classes: label channels N (one-hot including background).
        diffusion: the plans' ``diffusion`` section: ``latent_strides`` / ``denoiser_strides`` (from
            :meth:`configure_plans`; recomputed from ``arch_kwargs`` without the patch constraint if missing),
            ``latent_channels``, ``timesteps``, ``schedule``, ``loss_weights`` (``dice`` = gamma, ``mse`` = lambda),
            ``denoised_latent`` (``paper``: z_t - eps_hat, Eq. 12; ``x0``: the x0 estimate), ``x0_clip``, ``eta``,
            ``multiclass`` (``categorical``: softmax decoder, the paper; ``per_channel``: sigmoids for nnU-Net
            regions; the planner resolves ``auto`` from dataset.json), ``image_skips`` (the label decoder also sees
            the image encoder's stage outputs; False is the paper's latent-only decoder), ``image_attention``
            (the image encoder's self-attention, the paper's; True).
    """

    name = "ldseg"
    plans_name = "LDSegPlans"
    probabilities = "categorical"

    def __init__(self, arch_kwargs: dict, input_channels: int, num_classes: int, diffusion: dict):
        super().__init__(diffusion)
        diffusion = self.settings  # every key present (diffnnunet.config.resolve_diffusion)
        arch_kwargs = resolve_arch_kwargs(arch_kwargs)
        fallback_latent, fallback_denoiser = latent_layout(arch_kwargs)
        self.latent_strides = [list(s) for s in diffusion.get("latent_strides") or fallback_latent]
        denoiser_strides = [list(s) for s in diffusion.get("denoiser_strides") or fallback_denoiser]
        self.latent_channels = int(diffusion["latent_channels"])
        self.num_classes = num_classes
        prediction = diffusion["prediction"]
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction '{prediction}' (known for ldseg: {', '.join(PREDICTIONS)})")
        self.process = GaussianProcess(diffusion["timesteps"], diffusion["schedule"],
                                       prediction=prediction)
        weights = diffusion["loss_weights"]
        self.w_ce, self.gamma, self.lam = weights["ce"], weights["dice"], weights["mse"]
        self.w_ae = float(weights["autoencoder"])
        self.latent_stop_gradient = bool(diffusion["latent_stop_gradient"])
        self.denoised_latent = diffusion["denoised_latent"]
        if self.denoised_latent not in DENOISED_LATENTS:
            raise ValueError(f"denoised_latent '{self.denoised_latent}' (known: {', '.join(DENOISED_LATENTS)})")
        self.x0_clip = float(diffusion["x0_clip"])
        self.eta = float(diffusion["eta"])
        multiclass = diffusion["multiclass"]
        self.probabilities = "categorical" if multiclass == "auto" else multiclass
        if self.probabilities not in MULTICLASS_MODES:
            raise ValueError(f"multiclass '{multiclass}' (known: auto, {', '.join(MULTICLASS_MODES)})")
        self.default_steps = int(diffusion["sampling_steps"])
        cl = self.latent_channels
        self.label_encoder = LabelEncoder(arch_kwargs, num_classes, cl, self.latent_strides,
                                          diffusion["latent_norm"])
        self.image_encoder = ImageEncoder(arch_kwargs, input_channels, cl, self.latent_strides,
                                          attention=bool(diffusion["image_attention"]))
        self.image_skips = bool(diffusion["image_skips"])
        self.label_decoder = LabelDecoder(arch_kwargs, num_classes, cl, self.latent_strides, self.image_skips)
        self.denoiser = TimeUNet(2 * cl, cl, **self.denoiser_arch(arch_kwargs, len(self.latent_strides),
                                                                  denoiser_strides), time_embedding=True)
        self._targets_checked = False

    @staticmethod
    def denoiser_arch(arch_kwargs: dict, n_latent_stages: int, denoiser_strides) -> dict:
        """A 2-stage TimeUNet topology on the latent: features F and min(2F, max plans features), F the features
        of the last latent stage; the plans' ops; 3-wide kernels; ``denoiser_strides`` (from :func:`latent_layout`)."""
        features, _, _ = stage_settings(arch_kwargs, n_latent_stages)
        top = max(stage_settings(arch_kwargs, arch_kwargs["n_stages"])[0])
        dim = conv_op_dim(arch_kwargs["conv_op"])
        f = int(features[-1])
        return dict(n_stages=2, features_per_stage=[f, min(2 * f, int(top)) if top > f else f],
                    conv_op=arch_kwargs["conv_op"], kernel_sizes=[[3] * dim] * 2, strides=denoiser_strides,
                    n_conv_per_stage=[2, 2], n_conv_per_stage_decoder=[2], **_common_kwargs(arch_kwargs))

    # -- plans hooks -------------------------------------------------------------------------------------------
    @classmethod
    def configure_plans(cls, settings: dict, plan: dict) -> dict:
        """Store the latent downsampling chosen from the plan's strides and patch (:func:`latent_layout`)."""
        arch, patch = plan["architecture"]["arch_kwargs"], [int(p) for p in plan["patch_size"]]
        target = int(settings.get("latent_downsampling", LATENT_DOWNSAMPLING))
        min_size = int(settings.get("min_latent_size", MIN_LATENT_SIZE))
        latent_strides, denoiser_strides = latent_layout(arch, patch, target, min_size)
        settings["latent_strides"], settings["denoiser_strides"] = latent_strides, denoiser_strides
        settings["latent_size"] = [p // s for p, s in zip(patch, total_stride(latent_strides))]
        return settings

    @staticmethod
    def feature_map_size(arch_kwargs: dict, input_channels: int, num_classes: int, patch_size) -> int:
        """VRAM proxy for the planner: elements of every conv / transposed-conv / attention output of one training
        forward (both encoders, denoiser, decoder) for one sample, counted with shape-only (meta) tensors."""
        latent_strides, denoiser_strides = latent_layout(arch_kwargs, patch_size, min_size=RECIPE_MIN_LATENT_SIZE)
        settings = {"latent_strides": latent_strides, "denoiser_strides": denoiser_strides, "timesteps": 2}
        with torch.device("meta"):
            m = LDSeg(arch_kwargs, input_channels, num_classes, settings)
            counted = (torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention)
            total = [0]

            def hook(_module, _inputs, output):
                output = output[0] if isinstance(output, tuple) else output
                total[0] += output[0].numel()  # one sample of the batch

            handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, counted)]
            image = torch.empty(1, input_channels, *patch_size)
            z_i, skips = m.image_encoder(image, return_skips=True)
            z_l = m.label_encoder(torch.empty(1, num_classes, *patch_size))
            m.label_decoder(m.denoiser(torch.cat([z_l, z_i], 1), torch.zeros(1, dtype=torch.long)), skips)
            for h in handles:
                h.remove()
        return int(total[0])

    # -- the four networks -------------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """z_i = f_image-enc(X) (Eq. 9): ``(B, M, *spatial)`` -> ``(B, C_l, *latent)``."""
        return self.image_encoder(image)

    def condition(self, image: torch.Tensor):
        """What one window's sampling needs of the image, computed once: ``(z_i, skips)``, z_i of Eq. 9 and, with
        ``image_skips``, the image encoder's stage outputs for the label decoder (else None)."""
        if self.image_skips:
            return self.image_encoder(image, return_skips=True)
        return self.image_encoder(image), None

    def encode_label(self, x0: torch.Tensor) -> torch.Tensor:
        """z_l(0) = f_label-enc(y) (Eq. 10), standardised per channel: ``(B, N, *spatial)`` -> ``(B, C_l, *latent)``."""
        return self.label_encoder(x0)

    def predict_noise(self, z_t: torch.Tensor, z_i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f_denoiser(z_l(t), z_i, t) on concat(z_t, z_i): eps_hat (Eqs. 12, 17; ``prediction: eps``) or the clean
        latent (``prediction: x0``), ``(B, C_l, *latent)``."""
        return self.denoiser(torch.cat([z_t, z_i.to(z_t.dtype)], dim=1), t)

    def step_modules(self) -> list:
        """Only the latent denoiser runs per step; the encoders run once per window, the decoder once per chain."""
        return [self.denoiser]

    def decode(self, z: torch.Tensor, skips: list | None = None) -> torch.Tensor:
        """Class logits of f_label-dec (Eq. 13): ``(B, C_l, *latent)`` -> ``(B, N, *spatial)``; ``skips`` from
        :meth:`condition` (same batch as ``z``)."""
        return self.label_decoder(z, skips)

    def to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """y_hat: softmax over channels (``categorical``, the paper) or per-channel sigmoid (``per_channel``)."""
        logits = logits.float()
        return torch.softmax(logits, 1) if self.probabilities == "categorical" else torch.sigmoid(logits)

    def estimate_x0(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's x0 estimate, clipped to +-x0_clip (the latent is standardised). For eps-prediction
        x0 = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), whose gain 1/sqrt(abar_t) reaches 2e4 at t = T-1 of
        the cosine schedule; for x0-prediction it is the output itself."""
        x0 = self.process.predict_x0(output.float(), z_t.float(), t)
        return x0.clamp(-self.x0_clip, self.x0_clip).to(z_t.dtype)

    def denoise(self, z_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_dn: ``paper`` z_t - eps_hat (Eq. 12) or ``x0`` the proper x0 estimate (:meth:`estimate_x0`)."""
        if self.denoised_latent == "paper":
            eps_hat = output if self.process.prediction == "eps" else self.process.predict_eps(output, z_t, t)
            return z_t - eps_hat
        return self.estimate_x0(output, z_t, t)

    def segmentation_loss(self, logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor | None):
        """(L_CE, L_DSC) of Eqs. 14-15 on decoder logits ``(B, N, *sp)`` against one-hot ``x0``."""
        ce = ce_loss(logits, x0, mask) if self.probabilities == "categorical" else bce_loss(logits, x0, mask)
        return ce, soft_dice_loss(self.to_probabilities(logits), x0, mask)

    # -- interface ---------------------------------------------------------------------------------------------
    def network_forward(self, image: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Class logits ``(B, N, *spatial)`` of one deterministic DDIM chain started at the prior's mode z_T = 0
        (for nnU-Net's plain ``network(x)`` calls; prediction uses :meth:`sample`)."""
        z_i, skips = self.condition(image)
        z = self._ddim(torch.zeros_like(z_i), z_i, self.process.set_timesteps(steps or self.default_steps), None)
        return self.decode(z, skips)

    def benchmark_forward(self, image: torch.Tensor):
        """One sampler unit on ``image`` ``(1, M, *patch)`` with z_i precomputed: one denoiser step on the latent
        plus one full-resolution decoder pass. A sample costs ``steps`` denoiser passes and ONE decoder pass, so
        ``steps x samples`` units over-count the decoder (the dominant cost) by a factor of ``steps``."""
        z_i, skips = self.condition(image)
        z = torch.randn(z_i.shape, device=image.device, dtype=z_i.dtype)
        t = torch.full((image.shape[0],), self.process.timesteps - 1, device=image.device, dtype=torch.long)
        return lambda: self.decode(self.predict_noise(z, z_i, t), skips)

    def _check_targets(self, x0: torch.Tensor):
        """Once: the softmax decoder needs mutually exclusive labels (one-hot, sums to 1), not regions."""
        if not self._targets_checked and self.probabilities == "categorical":
            if not torch.all(x0.sum(1) == 1):
                raise ValueError("LDSeg's softmax decoder (multiclass 'categorical') needs mutually exclusive labels; "
                                 "for region-based datasets plan with multiclass 'auto' or 'per_channel'")
            self._targets_checked = True

    def training_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        """Algorithm 1: L = L_CE + gamma L_DSC (Eqs. 14-16) on f_label-dec(z_dn) + lambda ||eps_hat - eps||^2
        (Eqs. 17-18). ``image`` ``(B, M, *sp)``, ``x0`` one-hot ``(B, N, *sp)``, ``mask`` ``(B, 1, *sp)`` or None.
        Ignored voxels enter the label encoder as all-zero (unknown) and are left out of every term."""
        self._check_targets(x0)
        z_l = self.encode_label(x0 if mask is None else x0 * mask)
        z_i, skips = self.condition(image)
        t = self.process.sample_timesteps(x0.shape[0], x0.device, generator) if t is None else t
        if noise is None:
            noise = torch.randn(z_l.shape, generator=generator, device=z_l.device, dtype=z_l.dtype)
        z_d = z_l.detach() if self.latent_stop_gradient else z_l  # what the diffusion branch sees of z_l(0)
        z_t = self.process.q_sample(z_d, t, noise)
        output = self.predict_noise(z_t, z_i, t).float()
        ce, dice = self.segmentation_loss(self.decode(self.denoise(z_t, output, t), skips), x0, mask)
        target = self.process.training_target(z_d.float(), noise.float(), t)
        mse = masked_mean((output - target) ** 2, latent_mask(mask, z_l.shape[2:]))
        loss = self.w_ce * ce + self.gamma * dice + self.lam * mse
        terms = {"ce": ce.detach(), "dice": dice.detach(), "mse": mse.detach()}
        if self.w_ae > 0:  # auxiliary: the decoder also reconstructs the clean label latent
            ae_ce, ae_dice = self.segmentation_loss(self.decode(z_l, skips), x0, mask)
            ae = self.w_ce * ae_ce + self.gamma * ae_dice
            loss, terms["autoencoder"] = loss + self.w_ae * ae, ae.detach()
        return {"loss": loss, **terms}

    def _ddim(self, z: torch.Tensor, z_i: torch.Tensor, timesteps: list, generator) -> torch.Tensor:
        """Algorithm 2 with DDIM (Song et al. Eq. 12): z_T -> z_0 conditioned on z_i, ``(B, C_l, *latent)``."""
        for i, t in enumerate(timesteps):
            tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            x0_hat = self.estimate_x0(self.predict_noise(z, z_i, tt), z, tt)
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            z = self.process.step(x0_hat, z, t, t_prev, self.eta, generator)
        return z

    @torch.no_grad()
    def sample(self, image, steps: int = 2, samples: int = 4, generator: torch.Generator | None = None,
               chunk: int | None = None, return_uncertainty: bool = False, uncertainty: str = "entropy"):
        """S DDIM chains (Algorithm 2), decoded and averaged: mean class probabilities ``(B, N, *spatial)``; with
        ``return_uncertainty`` also the ``uncertainty`` map ``(B, 1, *spatial)`` of the S decoded probability maps
        (:mod:`diffnnunet.methods.uncertainty`; ``std`` is the paper's Fig. 10 map: the per-voxel standard
        deviation across the samples, averaged over channels).

        z_i is computed once per call. All S initial latents ``(B, S, C_l, *latent)`` are drawn first, so with
        eta = 0 the result does not depend on ``chunk`` (how many chains run in one forward). No per-step
        re-standardisation of the latent over the batch (unlike the public code)."""
        b, s = image.shape[0], max(1, int(samples))
        chunk = max(1, min(int(chunk or s), s))
        z_i, skips = self.condition(image)
        noise = torch.randn((b, s, *z_i.shape[1:]), generator=generator, device=z_i.device, dtype=torch.float32)
        timesteps = self.process.set_timesteps(steps)
        chains = ChainStatistics(categorical=self.probabilities == "categorical", spread=return_uncertainty)
        for start in range(0, s, chunk):
            n = min(chunk, s - start)
            z = self._ddim(noise[:, start:start + n].reshape(b * n, *z_i.shape[1:]), z_i.repeat_interleave(n, 0),
                           timesteps, generator)
            chain_skips = None if skips is None else [f.repeat_interleave(n, 0) for f in skips]
            chains.add(self.to_probabilities(self.decode(z, chain_skips)).reshape(b, n, self.num_classes,
                                                                                   *image.shape[2:]))
        return (chains.mean(), chains.map(uncertainty)) if return_uncertainty else chains.mean()
