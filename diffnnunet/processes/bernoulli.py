"""Bernoulli diffusion (BerDiff, Chen et al. MICCAI 2023), dimension-agnostic, one independent Bernoulli per channel.

Timestep convention (as :class:`GaussianProcess`): index ``t`` in {0, ..., T-1} is the paper's t+1, and
``alpha_bar(-1) = 1`` is the paper's abar_0 (the clean mask). Probability tensors hold P(y = 1) per channel,
shape ``(B, C, *spatial)``. See documentation/berdiff.md for the equation -> code map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnnunet.processes.gaussian import GaussianProcess, make_beta_schedule
from diffnnunet.utils import expand_to

_EPS = 1e-12
_LOG_FLOOR = 1e-7  # probabilities are floored here inside logs (representable in float32, also next to 1 - p)


def _log(p: torch.Tensor) -> torch.Tensor:
    """log(p) with p floored at 1e-7: a bounded loss and gradient where an estimate is exactly 0 or 1."""
    return torch.log(p.clamp(min=_LOG_FLOOR))


def _coef(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A schedule value: a scalar (int timestep) or ``(B,)`` (one timestep per sample), broadcast against ``x``."""
    return values.to(x.dtype) if values.ndim == 0 else expand_to(values, x)


class BernoulliProcess(nn.Module):
    """q(y_t | y_{t-1}) = B((1 - beta_t) y_{t-1} + beta_t / 2)  (Eq. 2), so
    q(y_t | y_0) = B(abar_t y_0 + (1 - abar_t)/2)  (Eq. 3).
    The network predicts the flip noise eps of y_t = y_0 XOR eps.

    Args:
        timesteps: T (paper: 1000). schedule: ``linear`` (paper) or ``cosine`` (see :func:`make_beta_schedule`).
    """

    #: number of states per variable (2: a Bernoulli); the categorical generalisation overrides it
    categories = 2

    def __init__(self, timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        super().__init__()
        self.timesteps = int(timesteps)
        betas = make_beta_schedule(schedule, self.timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # abar with abar_{-1} = 1 prepended: index t + 1 serves t in {-1, ..., T-1}, for ints and tensors alike
        self.register_buffer("alphas_cumprod_padded", torch.cat([betas.new_ones(1), alphas_cumprod]).float(),
                             persistent=False)

    # -- schedule ----------------------------------------------------------------------------------------------
    sample_timesteps = GaussianProcess.sample_timesteps
    set_timesteps = GaussianProcess.set_timesteps

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """abar_t for t in {-1, ..., T-1} (int -> 0-dim tensor, ``(B,)`` -> ``(B,)``), abar_{-1} = 1."""
        return self.alphas_cumprod_padded[t + 1]

    def _prev(self, t, t_prev):
        return t - 1 if t_prev is None else t_prev

    # -- forward process -------------------------------------------------------------------------------------
    def marginal(self, y0: torch.Tensor, t) -> torch.Tensor:
        """Eq. 3: P(y_t = 1 | y_0) = abar_t y_0 + (1 - abar_t)/2, shape of ``y0``."""
        ab = _coef(self.alpha_bar(t), y0)
        return ab * y0 + (1 - ab) / 2

    def sample_noise(self, y0: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """eps ~ B((1 - abar_t)/2), shape of ``y0`` (Algorithm 1). Drawn as u < (1 - abar_t)/2, u ~ U[0, 1)."""
        u = torch.rand(y0.shape, generator=generator, device=y0.device, dtype=y0.dtype)
        return (u < (1 - _coef(self.alpha_bar(t), y0)) / 2).to(y0.dtype)

    def q_sample(self, y0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """y_t = y_0 XOR eps (the reparameterisation of Eq. 3), values in {0, 1}."""
        return (y0 - noise).abs()

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """y_T ~ B(1/2) (Algorithm 2, first line), ``shape`` = ``(B, C, *spatial)``."""
        return (torch.rand(shape, generator=generator, device=device, dtype=dtype) < 0.5).to(dtype)

    # -- posterior and calibration ---------------------------------------------------------------------------
    def posterior(self, y_t: torch.Tensor, y0: torch.Tensor, t, t_prev=None) -> torch.Tensor:
        """Eq. 4: theta_post = Norm([a (1 - y_t), a y_t] + (1 - a)/2) * [abar_prev (1 - y_0), abar_prev y_0]
        + (1 - abar_prev)/2), second entry, with a = alpha_t (t_prev = t - 1, the default).

        ``y0`` may be soft (a probability, as in the calibration, Eq. 7). For a skip t -> t_prev < t - 1 the
        one-step alpha_t becomes abar_t / abar_prev, which makes this the exact posterior q(y_prev | y_t, y_0)
        of the sub-sequence (for t_prev = t - 1 the two agree). Returns P(y_prev = 1), shape of ``y_t``.
        """
        ab_prev = self.alpha_bar(self._prev(t, t_prev))
        a = _coef(self.alpha_bar(t) / ab_prev, y_t)
        ab_prev = _coef(ab_prev, y_t)
        one = (a * y_t + (1 - a) / 2) * (ab_prev * y0 + (1 - ab_prev) / 2)
        zero = (a * (1 - y_t) + (1 - a) / 2) * (ab_prev * (1 - y0) + (1 - ab_prev) / 2)
        return one / (one + zero).clamp(min=_EPS)

    def noise_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The network's estimate eps_hat = sigmoid(logits) (a flip probability per channel)."""
        return torch.sigmoid(logits.float())

    def predict_x0(self, eps_hat: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """y0_hat = |y_t - eps_hat| (Eq. 7, step 1): P(y_0 = 1)."""
        return (y_t - eps_hat).abs()

    def calibrate(self, y_t: torch.Tensor, eps_hat: torch.Tensor, t, t_prev=None) -> torch.Tensor:
        """Eq. 7: mu_hat = F_C(y_t, eps_hat) = theta_post(y_t, |y_t - eps_hat|), the reverse-step parameter."""
        return self.posterior(y_t, self.predict_x0(eps_hat, y_t), t, t_prev)

    # -- losses ------------------------------------------------------------------------------------------------
    def kl(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Eq. 8 (per voxel and channel): KL(B(q) || B(p)) = q log(q/p) + (1-q) log((1-q)/(1-p)), in nats."""
        return (torch.xlogy(q, q) - q * _log(p) + torch.xlogy(1 - q, 1 - q) - (1 - q) * _log(1 - p))

    def decoder_nll(self, y0: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """-log B(y_0; p), the t = 1 term of the bound (``p`` = mu_hat at t = 1), per voxel and channel."""
        return -(y0 * _log(p) + (1 - y0) * _log(1 - p))

    def noise_nll(self, noise: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Eq. 9 per voxel and channel: BCE(eps_hat = sigmoid(logits), eps)."""
        return F.binary_cross_entropy_with_logits(logits.float(), noise.float(), reduction="none")

    # -- reverse steps (Algorithm 2) -----------------------------------------------------------------------------
    def draw(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A binary sample of B(probs)."""
        u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
        return (u < probs).to(probs.dtype)

    def step_ddpm(self, x0_hat: torch.Tensor, y_t: torch.Tensor, t: int, t_prev: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Algorithm 2, DDPM: y_prev ~ B(theta_post(y_t, x0_hat)) (Eq. 6 with Eq. 7; exact sub-sequence posterior
        when t_prev < t - 1)."""
        return self.draw(self.posterior(y_t, x0_hat, t, t_prev), generator)

    def ddim_sigma(self, t: int, t_prev: int, eta: float = 0.0) -> torch.Tensor:
        """sigma_t of Algorithm 2 (the paper leaves it free): the probability of keeping y_t. Every sigma in
        [0, (1 - abar_prev)/(1 - abar_t)] keeps q(y_prev | y_0) = Eq. 3; eta = 0 takes the largest (no fresh coin,
        the analogue of deterministic DDIM), eta = 1 takes 0 (y_prev drawn afresh around x0_hat)."""
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        return (1 - eta) * (1 - ab_prev) / (1 - ab_t)

    def ddim_probs(self, x0_hat: torch.Tensor, y_t: torch.Tensor, t: int, t_prev: int,
                   eta: float = 0.0) -> torch.Tensor:
        """Algorithm 2, DDIM: sigma y_t + (abar_prev - sigma abar_t) x0_hat + ((1 - abar_prev) - (1 - abar_t) sigma)/K
        (K = 2), with x0_hat = |y_t - eps_hat|."""
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        sigma = self.ddim_sigma(t, t_prev, eta)
        return (sigma * y_t + (ab_prev - sigma * ab_t) * x0_hat
                + ((1 - ab_prev) - (1 - ab_t) * sigma) / self.categories)

    def step(self, x0_hat: torch.Tensor, y_t: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM-style reverse step of Algorithm 2 from y_t to y_{t_prev} (a binary sample)."""
        return self.draw(self.ddim_probs(x0_hat, y_t, t, t_prev, eta), generator)
