"""cDAL (Hejrati et al., MICCAI 2024): few-step (T <= 4) conditional diffusion whose x0-generator takes a random
latent z (adaptive normalisation of every stage) and is trained on labels weighted by the spatial attention of a
time-conditioned discriminator. See documentation/cdal.md for the equation -> code map and the ablation switches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnnunet.methods.base import DiffusionMethod, masked_mean, soft_dice_loss
from diffnnunet.methods.uncertainty import ChainStatistics
from diffnnunet.networks import TimeUNet, UNetEncoder
from diffnnunet.networks.time_unet import TimeEmbedding, _as_list
from diffnnunet.processes import GaussianProcess

MULTICLASS_MODES = ("categorical", "per_channel")
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
#: what A_D multiplies: the diffused 2 x0 - 1 (``signed``, the recipe) or the {0, 1} label (``label``, the paper)
ATTENTION_ON = ("signed", "label")
#: the discriminator's optimizer steps per generator step: the parts of its loss each step takes (Sec. 2.2)
DISCRIMINATOR_PARTS = {1: (None,), 2: ("real", "fake")}


def attention_stage(arch_kwargs: dict, attn_scale: int) -> int:
    """The deepest encoder stage whose total stride (largest over axes) is at most ``attn_scale`` (the paper's
    Table 1 names the map by its size, 16/32/64, i.e. a downsampling of the label; here by that downsampling)."""
    n = int(arch_kwargs["n_stages"])
    total, best = None, 0
    for s, stride in enumerate(_as_list(arch_kwargs["strides"], n)):
        stride = _as_list(stride, 1) if not isinstance(stride, (list, tuple)) else list(stride)
        total = stride if total is None else [a * b for a, b in zip(total, stride)]
        if max(total) <= attn_scale:
            best = s
    return best


class LatentMapping(nn.Module):
    """z ``(B, L)`` ~ N(0, I) -> latent embedding ``(B, E)`` (3-layer MLP), fed to the generator's adaptive norm."""

    def __init__(self, latent_dim: int, embed_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim),
                                 nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """D(x_{t-1}, x_t, t): the plans' encoder topology (nnU-Net's plain stages, or residual blocks with
    ``residual``, the paper's) on cat(x_{t-1}, x_t) ``(B, 2N, *spatial)`` with a sinusoidal time embedding added in
    every stage, global average pooling and a linear head -> real/fake logit ``(B,)``. ``forward(..., stage=s)``
    also returns stage ``s``'s feature map."""

    def __init__(self, arch_kwargs: dict, num_classes: int, residual: bool = False):
        super().__init__()
        enc_kwargs = {k: v for k, v in arch_kwargs.items() if k != "n_conv_per_stage_decoder"}
        features = _as_list(arch_kwargs["features_per_stage"], arch_kwargs["n_stages"])
        self.time_embed = TimeEmbedding(4 * features[0])
        self.encoder = UNetEncoder(2 * num_classes, temb_dim=4 * features[0], residual=residual, **enc_kwargs)
        self.head = nn.Linear(features[-1], 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, stage: int | None = None):
        feats = self.encoder(torch.cat([x_prev, x_t], dim=1), self.time_embed(t))
        logit = self.head(feats[-1].flatten(2).mean(2))[:, 0]
        return logit if stage is None else (logit, feats[stage])


class CDAL(DiffusionMethod):
    """Generator x_theta(x_t, t, z, I) = TimeUNet(cat(I, x_t), t, latent=mapping(z)) -> label logits (Eq. 3); the
    discriminator (training only) gives the attention A_D; Gaussian process with T <= 4 steps, x0 prediction.

    Labels are diffused as 2 x0 - 1 in [-1, 1]; x0_hat = 2 p - 1 with p the softmax (``categorical``, exclusive
    labels) or per-channel sigmoid (``per_channel``, regions) of the generator's logits.
    ``attention_on`` (``signed``: A_D times 2 x0 - 1; ``label``: 2 (x0 * A_D) - 1, the paper's x0 * A_D on the
    {0, 1} label), ``discriminator_steps`` (1: one step on the summed real + fake loss; 2: the paper's step on
    the real pair, then one on the fake pair, :meth:`extra_steps`) and ``residual_blocks`` (residual stages in
    the generator and the discriminator, the paper's) select the recipe or the paper.

    Args:
        arch_kwargs: ``architecture.arch_kwargs`` (generator and discriminator topology). input_channels: M.
        num_classes: N. diffusion: the plans' section: ``timesteps``, ``schedule`` (``vp``), ``beta_start``/
            ``beta_end``, ``latent`` (on/off), ``latent_dim`` L, ``attention`` (on/off), ``attention_stage`` (or
            ``attn_scale``), ``multiclass``, ``loss_weights`` (``mse``: Eq. 4; ``dice``: optional, 0 = the paper).
    """

    name = "cdal"
    plans_name = "cDALPlans"
    probabilities = "categorical"
    forward_modes = {"loss": "training_loss", "discriminator_loss": "discriminator_loss"}
    #: each of the two steps leaves the other network's parameters out of its graph
    ddp_find_unused_parameters = True

    def __init__(self, arch_kwargs: dict, input_channels: int, num_classes: int, diffusion: dict):
        super().__init__(diffusion)
        diffusion = self.settings  # every key present (diffnnunet.config.resolve_diffusion)
        self.num_classes = int(num_classes)
        self.process = GaussianProcess(diffusion["timesteps"], diffusion["schedule"],
                                       diffusion["beta_start"], diffusion["beta_end"],
                                       prediction="x0")
        multiclass = diffusion["multiclass"]
        self.probabilities = "categorical" if multiclass == "auto" else multiclass
        if self.probabilities not in MULTICLASS_MODES:
            raise ValueError(f"multiclass '{multiclass}' (known: auto, {', '.join(MULTICLASS_MODES)})")
        self.use_latent = bool(diffusion["latent"])
        self.use_attention = bool(diffusion["attention"])
        self.latent_dim = int(diffusion["latent_dim"])
        self.attention_stage = int(diffusion.get("attention_stage",
                                                 attention_stage(arch_kwargs, diffusion["attn_scale"])))
        self.eta = float(diffusion["eta"])
        self.attention_on = diffusion["attention_on"]
        self.discriminator_parts = DISCRIMINATOR_PARTS.get(diffusion["discriminator_steps"])
        if self.attention_on not in ATTENTION_ON or self.discriminator_parts is None:
            raise ValueError(f"cDAL plans: attention_on '{self.attention_on}' (known: {', '.join(ATTENTION_ON)}), "
                             f"discriminator_steps {diffusion['discriminator_steps']} (known: 1, 2)")
        residual = bool(diffusion["residual_blocks"])
        weights = diffusion["loss_weights"]
        self.w_mse, self.w_dice = float(weights["mse"]), float(weights["dice"])
        features = _as_list(arch_kwargs["features_per_stage"], arch_kwargs["n_stages"])
        embed = 4 * features[0]
        self.mapping = LatentMapping(self.latent_dim, embed) if self.use_latent else None
        self.generator = TimeUNet(input_channels + self.num_classes, self.num_classes, **arch_kwargs,
                                  time_embedding=True, latent_dim=embed if self.use_latent else None,
                                  residual=residual)
        self.discriminator = Discriminator(arch_kwargs, self.num_classes, residual)
        self._fake_input = None  # (x_t, t) of the last "real" step, for the "fake" step (discriminator_steps 2)

    # -- plans hooks -----------------------------------------------------------------------------------------------
    @classmethod
    def configure_plans(cls, settings: dict, plan: dict) -> dict:
        """Store the discriminator stage of the attention map chosen from ``attn_scale`` and the plan's strides."""
        settings["attention_stage"] = attention_stage(plan["architecture"]["arch_kwargs"], settings["attn_scale"])
        return settings

    @staticmethod
    def feature_map_size(arch_kwargs: dict, input_channels: int, num_classes: int, patch_size,
                         diffusion: dict | None = None) -> int:
        """VRAM proxy: the generator (N extra input channels, time sums, latent modulation, residual sums) plus the
        discriminator encoder (both are in memory in training; only the generator runs at inference), built from
        ``diffusion`` (the planner's recipe section; the defaults without)."""
        settings = {**(diffusion or {}), "method": "cdal", "timesteps": 2}
        settings.pop("attention_stage", None)
        m = CDAL(arch_kwargs, input_channels, num_classes, settings)
        return int(m.generator.compute_conv_feature_map_size(patch_size)
                   + m.discriminator.encoder.feature_map_size(patch_size))

    def extra_optimised(self) -> dict:
        return {"discriminator": self.discriminator}

    def extra_steps(self) -> dict:
        """name -> the ``part`` of each of its optimizer steps per iteration: ``(None,)`` one step on the whole
        loss, ``("real", "fake")`` the paper's two updates of D (Sec. 2.2)."""
        return {"discriminator": self.discriminator_parts}

    def step_modules(self) -> list:
        """Only the generator (and the z mapping) run per sampling step; the discriminator never at inference."""
        return ([self.mapping] if self.mapping is not None else []) + [self.generator]

    # -- generator ---------------------------------------------------------------------------------------------------
    def draw_z(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """z ~ N(0, I_L), ``(B, L)``; None when the latent is switched off."""
        if not self.use_latent:
            return None
        return torch.randn((batch, self.latent_dim), generator=generator, device=device)

    def network_forward(self, image: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                        z: torch.Tensor | None = None) -> torch.Tensor:
        """Generator logits ``(B, N, *spatial)`` for ``image`` ``(B, M, *sp)``, ``x_t`` ``(B, N, *sp)``, ``t``
        ``(B,)``, ``z`` ``(B, L)``. Without ``x_t`` (nnU-Net's plain calls) x_t = 0 at t = T-1 and z = 0."""
        if x_t is None:
            x_t = image.new_zeros((image.shape[0], self.num_classes, *image.shape[2:]))
            t = torch.full((image.shape[0],), self.process.timesteps - 1, device=image.device, dtype=torch.long)
        if z is None and self.use_latent:
            z = image.new_zeros((image.shape[0], self.latent_dim))
        latent = self.mapping(z.to(image.dtype)) if self.use_latent else None
        return self.generator(torch.cat([image, x_t.to(image.dtype)], dim=1), t, latent=latent)

    def to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.softmax(logits, 1) if self.probabilities == "categorical" else torch.sigmoid(logits)

    def predict_x0(self, image, x_t, t, z) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat = 2 p - 1 in the diffused label space, p) for one generator call, ``(B, N, *spatial)`` each."""
        p = self.to_probabilities(self(image, x_t, t, z))
        return 2 * p - 1, p

    # -- discriminator and its attention --------------------------------------------------------------------------
    def attention_map(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A_D ``(B, 1, *spatial)`` in [0, 1]: the channel mean of D's feature map at ``attention_stage`` on the
        real pair (Sec. 2.2), upsampled (linear interpolation) to the label's size and normalised per sample by
        its largest magnitude, |a| / max |a| (1 = most attended; plain x_t at inference is A_D = 1 everywhere)."""
        _, feat = self.discriminator(x_prev, x_t, t, stage=self.attention_stage)
        a = feat.float().mean(1, keepdim=True)
        a = F.interpolate(a, size=x_t.shape[2:], mode=_INTERPOLATION[a.ndim - 2], align_corners=False).abs()
        return a / a.flatten(1).amax(1).clamp(min=1e-12).reshape(-1, *[1] * (a.ndim - 1))

    def _real_pair(self, x0s, t, generator):
        n1 = torch.randn(x0s.shape, generator=generator, device=x0s.device, dtype=x0s.dtype)
        n2 = torch.randn(x0s.shape, generator=generator, device=x0s.device, dtype=x0s.dtype)
        return self.process.q_sample_pair(x0s, t, n1, n2)

    def discriminator_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                           t: torch.Tensor | None = None, part: str | None = None) -> dict:
        """D step (generator frozen): real pair (x_{t-1} ~ q(x_{t-1} | x0), x_t ~ q(x_t | x_{t-1})) labelled 1,
        fake pair (x_hat_{t-1} ~ q(x_{t-1} | x_t, x0_hat), x_t) labelled 0 (Eq. 2), binary cross-entropy.
        ``image`` ``(B, M, *sp)``, ``x0`` ``(B, N, *sp)`` in {0, 1}; ``mask`` is not used (D judges whole maps).
        ``part`` None: both terms (one step); ``"real"``: the real term, keeping its (x_t, t) for the ``"fake"``
        part, which pairs that x_t with x_hat_{t-1} (the paper's two updates of D, Sec. 2.2)."""
        if part not in (None, "real", "fake"):
            raise ValueError(f"discriminator_loss part '{part}' (known: None, real, fake)")
        x0s = 2 * x0 - 1
        kept, self._fake_input = self._fake_input, None
        if part == "fake" and kept is not None and kept[0].shape == x0.shape:
            x_t, t = kept
        else:
            t = self.process.sample_timesteps(x0.shape[0], x0.device, generator) if t is None else t
            x_prev, x_t = self._real_pair(x0s, t, generator)
        out = {}
        if part in (None, "real"):
            out["d_real"] = F.softplus(-self.discriminator(x_prev, x_t, t).float()).mean()
            if part == "real":
                self._fake_input = (x_t.detach(), t)
        if part in (None, "fake"):
            with torch.no_grad():
                x0_hat, _ = self.predict_x0(image, x_t, t, self.draw_z(x0.shape[0], x0.device, generator))
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                fake_prev = self.process.posterior_sample(x0_hat.to(x0.dtype), x_t, t, noise)
            out["d_fake"] = F.softplus(self.discriminator(fake_prev, x_t, t).float()).mean()
        return {"loss": sum(out.values()), **{k: v.detach() for k, v in out.items()}}

    def training_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        """Generator step (D frozen), Eq. 4: x0_att = x0 * A_D, x_t_att ~ q(x_t | x0_att) (``noise``), loss
        ||x0 - x_theta(x_t_att, t, z, I)||^2 (masked mean) + optional ``dice`` weight x soft Dice of p.
        In the diffused space: x0_att = (2 x0 - 1) A_D (``attention_on: signed``) or 2 (x0 A_D) - 1 (``label``,
        the paper's product on the {0, 1} label). Without ``attention`` x0_att = 2 x0 - 1 (the paper's
        'w/o Attention' ablation)."""
        x0s = 2 * x0 - 1
        b = x0.shape[0]
        t = self.process.sample_timesteps(b, x0.device, generator) if t is None else t
        x0_att = x0s
        if self.use_attention:
            x_prev, x_t = self._real_pair(x0s, t, generator)
            with torch.no_grad():
                a_d = self.attention_map(x_prev, x_t, t).to(x0s.dtype)
                x0_att = x0s * a_d if self.attention_on == "signed" else 2 * (x0 * a_d) - 1
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t_att = self.process.q_sample(x0_att, t, noise)
        x0_hat, p = self.predict_x0(image, x_t_att, t, self.draw_z(b, x0.device, generator))
        mse = masked_mean((x0_hat - x0s) ** 2, mask)
        terms = {"mse": mse.detach()}
        loss = self.w_mse * mse
        if self.w_dice > 0:
            dice = soft_dice_loss(p, x0, mask)
            loss, terms["dice"] = loss + self.w_dice * dice, dice.detach()
        return {"loss": loss, **terms}

    # -- inference -----------------------------------------------------------------------------------------------------
    def benchmark_forward(self, image: torch.Tensor):
        """One generator call (z mapping included) on ``image`` ``(1, M, *patch)``; D is never run at inference."""
        x = torch.randn((image.shape[0], self.num_classes, *image.shape[2:]), device=image.device, dtype=image.dtype)
        t = torch.full((image.shape[0],), self.process.timesteps - 1, device=image.device, dtype=torch.long)
        z = self.draw_z(image.shape[0], image.device)
        return lambda: self(image, x, t, z)

    @torch.no_grad()
    def sample(self, image, steps: int = 2, samples: int = 5, generator: torch.Generator | None = None,
               chunk: int | None = None, return_uncertainty: bool = False, uncertainty: str = "mutual_information"):
        """S chains (``chunk`` at a time) of ``steps`` reverse steps (all T when steps >= T): x_T ~ N(0, I), then
        per step a fresh z, x0_hat = x_theta(x_t, t, z, I) on the PLAIN x_t (A_D needs the ground truth; plain x_t
        is A_D = 1) and x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) (Eq. 2; ``eta`` = 1 with respaced steps, the last
        step lands on x0_hat). ``image`` ``(B, M, *spatial)``.

        Returns the mean of the chains' final probabilities ``(B, N, *spatial)`` (the paper averages 5 samples);
        with ``return_uncertainty`` also the ``uncertainty`` map ``(B, 1, *spatial)`` of the chains' final
        probabilities (:mod:`diffnnunet.methods.uncertainty`)."""
        b, s = image.shape[0], max(1, int(samples))
        chunk = max(1, min(int(chunk or s), s))
        timesteps = self.process.set_timesteps(steps)
        chains = ChainStatistics(categorical=self.probabilities == "categorical", spread=return_uncertainty)
        for start in range(0, s, chunk):
            n = min(chunk, s - start)
            image_n = image.repeat_interleave(n, 0)
            x = torch.randn((b * n, self.num_classes, *image.shape[2:]), generator=generator, device=image.device,
                            dtype=image.dtype)
            for i, t in enumerate(timesteps):
                tt = torch.full((b * n,), t, device=image.device, dtype=torch.long)
                x0_hat, p = self.predict_x0(image_n, x, tt, self.draw_z(b * n, image.device, generator))
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                x = self.process.step(x0_hat.to(x.dtype), x, t, t_prev, self.eta, generator)
            chains.add(p.reshape(b, n, *p.shape[1:]))
        return (chains.mean(), chains.map(uncertainty)) if return_uncertainty else chains.mean()
