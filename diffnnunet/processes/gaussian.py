"""Gaussian diffusion (Ho et al. 2020) with DDIM sampling (Song et al. 2021), dimension-agnostic."""
from __future__ import annotations

import math

import torch
from torch import nn

from diffnnunet.utils import expand_to


def make_beta_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return ``betas`` of shape ``(T,)`` in float64.

    ``linear``: DDPM's schedule, betas evenly spaced in [beta_start, beta_end] (Diff-UNet: 1e-4 .. 0.02, T=1000).
    ``cosine``: Nichol & Dhariwal 2021, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at 0.999.
    ``vp``: the variance-preserving SDE discretised into few large steps (denoising diffusion GANs, Xiao et al.
    2022, used by cDAL with T <= 4): beta(s) = b0 + s (b1 - b0) on s in [0, 1] with b0 = ``beta_start`` and
    b1 = ``beta_end`` (rates, e.g. 0.1 and 20), alpha_bar(s) = exp(-b0 s - (b1 - b0) s^2 / 2) at s_i = i / T,
    beta_i = 1 - alpha_bar(s_i) / alpha_bar(s_{i-1}).
    """
    if name == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    if name == "vp":
        s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.exp(-beta_start * s - 0.5 * (beta_end - beta_start) * s ** 2)
        return 1 - alpha_bar[1:] / alpha_bar[:-1]
    raise ValueError(f"unknown beta schedule '{name}' (known: linear, cosine, vp)")


class GaussianProcess(nn.Module):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (Diff-UNet Eq. 1, DDPM Eq. 4).

    Args:
        timesteps: T, the length of the forward chain.
        schedule: ``linear``, ``cosine`` or ``vp`` (see :func:`make_beta_schedule`).
        prediction: what the network outputs: ``x0`` (Diff-UNet, cDAL) or ``eps`` (MedSegDiff-V2, LDSeg).
    """

    def __init__(self, timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction: str = "x0"):
        super().__init__()
        if prediction not in ("x0", "eps"):
            raise ValueError(f"unknown prediction type '{prediction}' (known: x0, eps)")
        self.timesteps = int(timesteps)
        self.prediction = prediction
        betas = make_beta_schedule(schedule, self.timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt().float(),
                             persistent=False)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])  # abar_{t-1}, abar_{-1} = 1
        # q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var) (DDPM Eqs. 6-7), computed in float64
        self.register_buffer("posterior_coef_x0", (prev.sqrt() * betas / (1 - alphas_cumprod)).float(),
                             persistent=False)
        self.register_buffer("posterior_coef_xt", ((1 - betas).sqrt() * (1 - prev) / (1 - alphas_cumprod)).float(),
                             persistent=False)
        self.register_buffer("posterior_variance", (betas * (1 - prev) / (1 - alphas_cumprod)).float(),
                             persistent=False)

    # -- forward process -------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps t ~ U{0, ..., T-1}, shape ``(B,)`` (DDPM Algorithm 1)."""
        return torch.randint(0, self.timesteps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Eq. 1). ``x0``, ``noise``: ``(B, C, *spatial)``."""
        return (expand_to(self.sqrt_alphas_cumprod[t], x0) * x0
                + expand_to(self.sqrt_one_minus_alphas_cumprod[t], x0) * noise)

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I): ``x_prev`` ``(B, C, *sp)``."""
        beta = expand_to(self.betas[t], x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def q_sample_pair(self, x0: torch.Tensor, t: torch.Tensor, noise_prev: torch.Tensor,
                      noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A real adjacent pair (x_{t-1} ~ q(x_{t-1} | x_0), x_t ~ q(x_t | x_{t-1})); at t = 0, x_{t-1} = x_0."""
        prev = self.q_sample(x0, (t - 1).clamp(min=0), noise_prev)
        prev = torch.where(expand_to(t == 0, x0) > 0, x0, prev)
        return prev, self.q_step(prev, t, noise)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the network: x_0 or eps."""
        return x0 if self.prediction == "x0" else noise

    # -- reverse process -------------------------------------------------------------------------------------
    def predict_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 estimate from a network output; for eps-prediction x_0 = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)."""
        if self.prediction == "x0":
            return output
        return ((x_t - expand_to(self.sqrt_one_minus_alphas_cumprod[t], x_t) * output)
                / expand_to(self.sqrt_alphas_cumprod[t], x_t))

    def predict_eps(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return ((x_t - expand_to(self.sqrt_alphas_cumprod[t], x_t) * x0_hat)
                / expand_to(self.sqrt_one_minus_alphas_cumprod[t], x_t))

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (cDAL Eq. 2 with x_0 = x0_hat): mean
        sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t, variance
        beta_t (1 - abar_{t-1}) / (1 - abar_t) (0 at t = 0). ``t`` ``(B,)``; mean ``(B, C, *sp)``, var ``(B, 1...)``."""
        mean = expand_to(self.posterior_coef_x0[t], x0) * x0 + expand_to(self.posterior_coef_xt[t], x_t) * x_t
        return mean, expand_to(self.posterior_variance[t], x_t)

    def posterior_sample(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} = mean + sqrt(var) noise from :meth:`posterior` (differentiable in ``x0``)."""
        mean, var = self.posterior(x0, x_t, t)
        return mean + var.sqrt() * noise

    def set_timesteps(self, num_steps: int) -> list[int]:
        """Descending respaced timesteps ``[T-1, ..., 0]`` of length ``num_steps`` (evenly spaced, both ends kept)."""
        num_steps = max(1, min(int(num_steps), self.timesteps))
        if num_steps == 1:
            return [self.timesteps - 1]
        grid = torch.linspace(self.timesteps - 1, 0, num_steps, dtype=torch.float64).round().long()
        return [int(i) for i in grid]

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """abar_t, with the convention abar_{-1} = 1 (the step after t=0 lands on x_0)."""
        if isinstance(t, int) and t < 0:
            return self.alphas_cumprod.new_tensor(1.0)
        return self.alphas_cumprod[t]

    def step(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM update (Song et al. 2021, Eq. 12) from x_t to x_{t_prev}, shapes ``(B, C, *spatial)``.

        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev). eta=0 is deterministic;
        eta=1 samples the posterior q(x_{t_prev} | x_t, x0_hat) (:meth:`posterior` when t_prev = t - 1).
        """
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        eps_hat = (x_t - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + sigma * z
        return x_prev
