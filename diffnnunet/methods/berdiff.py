"""BerDiff (Chen et al., MICCAI 2023): conditional Bernoulli diffusion on the label map, the network predicting the
flip noise, extended to mutually exclusive multi-class labels (categorical process) and nnU-Net regions (independent
Bernoulli channels). See documentation/berdiff.md for the equation -> code map and the multi-class design."""
from __future__ import annotations

import torch

from diffnnunet.methods.base import DiffusionMethod, masked_mean, soft_dice_loss
from diffnnunet.methods.uncertainty import ChainStatistics
from diffnnunet.networks import TimeUNet
from diffnnunet.processes import BernoulliProcess, CategoricalProcess
from diffnnunet.utils import expand_to

#: ``multiclass`` plans values: how the N label channels are diffused
MULTICLASS_MODES = ("auto", "categorical", "per_channel")
#: ``saliency`` plans values: the mean of the S binary samples (the paper) or of their expectations (Rao-Blackwell)
SALIENCY = ("samples", "expected")
#: ``prediction`` plans values: what the network's logits parameterise
PREDICTIONS = ("eps", "x0")


class BerDiff(DiffusionMethod):
    """Noise estimator eps_hat(y_t, t, x) = activation(TimeUNet(cat(x, y_t), t)) with a Bernoulli / categorical process.

    The N label channels (``x0`` from :func:`encode_target`) are diffused either as one categorical variable per
    voxel (mutually exclusive labels, one-hot with background; K = 2 is the paper's binary BerDiff exactly) or as N
    independent Bernoulli variables (nnU-Net regions, or N = 1). The plans' ``multiclass`` picks it: ``auto`` (default)
    starts categorical (N >= 2) and switches to per channel for good at the first training target that is not
    one-hot (a region target: background voxels have no channel on, nested regions several). The mode is kept in the
    persistent buffer ``per_channel`` so a checkpoint samples the way it was trained.

    Args:
        arch_kwargs: the configuration's ``architecture.arch_kwargs``. input_channels: image channels M.
        num_classes: label channels N. diffusion: the configuration's ``diffusion`` section of the plans.
    """

    name = "berdiff"
    plans_name = "BerDiffPlans"
    #: class default (mutually exclusive labels); instances in per-channel mode report ``per_channel``
    probabilities = "categorical"

    def __init__(self, arch_kwargs: dict, input_channels: int, num_classes: int, diffusion: dict):
        super().__init__(diffusion)
        diffusion = self.settings  # every key present (diffnnunet.config.resolve_diffusion)
        self.num_classes = int(num_classes)
        self.multiclass = diffusion["multiclass"]
        if self.multiclass not in MULTICLASS_MODES:
            raise ValueError(f"unknown multiclass mode '{self.multiclass}' (known: {', '.join(MULTICLASS_MODES)})")
        schedule = (diffusion["timesteps"], diffusion["schedule"],
                    diffusion["beta_start"], diffusion["beta_end"])
        self.bernoulli = BernoulliProcess(*schedule)
        self.categorical = CategoricalProcess(self.num_classes, *schedule) if self.num_classes >= 2 else None
        self.sampler = diffusion["sampler"]
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown BerDiff sampler '{self.sampler}' (known: ddim, ddpm)")
        self.eta = float(diffusion["eta"])
        self.bce_weight = float(diffusion["bce_weight"])
        self.dice_weight = float(diffusion["dice_weight"])
        self.prediction = diffusion["prediction"]
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown BerDiff prediction '{self.prediction}' (known: {', '.join(PREDICTIONS)})")
        self.saliency = diffusion["saliency"]
        if self.saliency not in SALIENCY:
            raise ValueError(f"unknown BerDiff saliency '{self.saliency}' (known: {', '.join(SALIENCY)})")
        self.network = TimeUNet(input_channels + self.num_classes, self.num_classes, **arch_kwargs,
                                time_embedding=True)
        per_channel = self.multiclass == "per_channel" or self.categorical is None
        if self.multiclass == "categorical" and self.categorical is None:
            raise ValueError("multiclass 'categorical' needs at least 2 label channels (background + foreground)")
        self.register_buffer("per_channel", torch.tensor(per_channel))  # persistent: the trained mode
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_mode())
        self._sync_mode()

    def _sync_mode(self):
        self.probabilities = "per_channel" if bool(self.per_channel) else "categorical"

    @property
    def process(self) -> BernoulliProcess:
        """The process of the current mode (one host read of the mode flag; call it outside step loops)."""
        return self.bernoulli if bool(self.per_channel) else self.categorical

    @staticmethod
    def feature_map_size(arch_kwargs: dict, input_channels: int, num_classes: int, patch_size) -> int:
        """VRAM proxy for the planner: the one noise estimator with the N extra noisy-label input channels."""
        m = BerDiff(arch_kwargs, input_channels, num_classes, {"timesteps": 2})
        return int(m.network.compute_conv_feature_map_size(patch_size))

    def network_forward(self, image: torch.Tensor, y_t: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
        """Noise logits ``(B, N, *spatial)`` for ``image`` ``(B, M, *spatial)``, ``y_t`` ``(B, N, *spatial)`` in {0, 1},
        ``t`` ``(B,)``. Without ``y_t`` (nnU-Net's plain ``network(x)`` calls) an all-zero y_t at t = T-1 stands in."""
        if y_t is None:
            y_t = image.new_zeros((image.shape[0], self.num_classes, *image.shape[2:]))
            t = torch.full((image.shape[0],), self.bernoulli.timesteps - 1, device=image.device, dtype=torch.long)
        return self.network(torch.cat([image, y_t.to(image.dtype)], dim=1), t)

    def benchmark_forward(self, image: torch.Tensor):
        y = image.new_zeros((image.shape[0], self.num_classes, *image.shape[2:]))
        t = torch.full((image.shape[0],), self.bernoulli.timesteps - 1, device=image.device, dtype=torch.long)
        return lambda: self(image, y, t)

    def estimates(self, proc, logits: torch.Tensor, y_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) from the network's logits ``(B, N, *sp)`` at ``y_t``. ``prediction`` eps (the paper):
        eps_hat = activation(logits), x0_hat = |y_t - eps_hat| (Eq. 7, step 1; the categorical shift). ``x0``: the
        logits are those of y_0 itself and eps_hat = |y_t - x0_hat|; the map between the two is its own inverse, so
        every equation is unchanged, but the network no longer has to learn the XOR of its input y_t with the label
        (documentation/berdiff.md, "Recipe")."""
        probs = proc.noise_probs(logits)
        other = proc.predict_x0(probs, y_t)
        return (probs, other) if self.prediction == "eps" else (other, probs)

    def _observe_targets(self, x0: torch.Tensor):
        """``auto``: the first target that is not one-hot switches to independent channels (regions)."""
        if bool(self.per_channel) or self.multiclass == "per_channel":
            return
        if bool((x0.sum(1) != 1).any()):
            if self.multiclass == "categorical":
                raise ValueError("BerDiff plans say multiclass 'categorical' but the training target is not one-hot "
                                 "(a region dataset?): set diffusion.multiclass to 'per_channel' or 'auto'")
            self.per_channel.fill_(True)
            self._sync_mode()

    def training_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        """Algorithm 1: L = L_KL (Eq. 8; the decoder NLL -log p(y_0 | y_1) at t = 1) + lambda L_BCE (Eq. 9), both
        averaged over the voxels where ``mask`` is 1, plus the recipe's ``dice_weight`` x the batch soft Dice loss of
        the x0 estimate y0_hat = |y_t - eps_hat| (Eq. 7, step 1; 0 in the paper). ``image`` ``(B, M, *sp)``, ``x0``
        ``(B, N, *sp)`` in {0, 1}."""
        self._observe_targets(x0)
        proc = self.process
        t = self.process.sample_timesteps(x0.shape[0], x0.device, generator) if t is None else t
        noise = proc.sample_noise(x0, t, generator) if noise is None else noise
        y_t = proc.q_sample(x0, t, noise)
        logits = self(image, y_t, t)
        eps_hat, x0_hat = self.estimates(proc, logits, y_t)
        mu_hat = proc.calibrate(y_t, eps_hat, t)  # Eq. 7
        theta_post = proc.posterior(y_t, x0, t)  # Eq. 4
        kl = proc.kl(theta_post, mu_hat)
        first = expand_to(t == 0, kl) > 0
        kl = masked_mean(torch.where(first, proc.decoder_nll(x0, mu_hat), kl), mask)
        # Eq. 9: BCE(eps_hat, eps); under x0-prediction it equals BCE(x0_hat, y_0) (the same permutation of both)
        bce = masked_mean(proc.noise_nll(noise if self.prediction == "eps" else x0, logits), mask)
        out = {"loss": kl + self.bce_weight * bce, "kl": kl.detach(), "bce": bce.detach()}
        if self.dice_weight:
            dice = soft_dice_loss(x0_hat.float(), x0, mask)
            out["loss"] = out["loss"] + self.dice_weight * dice
            out["dice"] = dice.detach()
        return out

    @torch.no_grad()
    def sample(self, image, steps: int = 10, samples: int = 8, generator: torch.Generator | None = None,
               chunk: int | None = None, return_uncertainty: bool = False, uncertainty: str = "entropy"):
        """Algorithm 2 over S independent chains (``chunk`` at a time): y_T ~ B(1/2) (categorical: uniform), then
        ``steps`` reverse steps on the respaced sub-sequence (``sampler`` ddim: Algorithm 2's DDIM update with
        ``eta``; ddpm: the posterior of Eq. 6/7). ``image``: ``(B, M, *spatial)``.

        Returns the saliency map ``(B, N, *spatial)``: the mean of the S binary / one-hot samples (``saliency``
        samples, the paper), or of their expectations, the chains' last x0_hat (``expected``: the last step draws
        y_0 ~ B(x0_hat), so this is the Rao-Blackwellised estimate of the same map, free of the final draw's
        noise); with
        ``return_uncertainty`` also the ``uncertainty`` map ``(B, 1, *spatial)``: one of
        :data:`~diffnnunet.methods.uncertainty.MEASURES` over the S chains' final x0 probabilities (continuous,
        where the binary draws would quantize the map to multiples of 1/S).
        """
        proc, per_channel = self.process, bool(self.per_channel)
        b, s = image.shape[0], max(1, int(samples))
        chunk = max(1, min(int(chunk or s), s))
        timesteps = proc.set_timesteps(steps)
        total = None
        chains = ChainStatistics(categorical=not per_channel, spread=return_uncertainty)
        for start in range(0, s, chunk):
            n = min(chunk, s - start)
            image_n = image.repeat_interleave(n, 0)
            y = proc.prior_sample((b * n, self.num_classes, *image.shape[2:]), generator, image.device, torch.float32)
            for i, t in enumerate(timesteps):
                tt = torch.full((b * n,), t, device=image.device, dtype=torch.long)
                x0_hat = self.estimates(proc, self(image_n, y, tt), y)[1]
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                if self.sampler == "ddim":
                    y = proc.step(x0_hat, y, t, t_prev, self.eta, generator)
                else:
                    y = proc.step_ddpm(x0_hat, y, t, t_prev, generator)
            y_sum = y.reshape(b, n, *y.shape[1:]).sum(1)
            total = y_sum if total is None else total + y_sum
            chains.add(x0_hat.reshape(b, n, *x0_hat.shape[1:]))
        freq = total / s if self.saliency == "samples" else chains.mean()
        return (freq, chains.map(uncertainty)) if return_uncertainty else freq
