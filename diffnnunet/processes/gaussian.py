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
    """
    if name == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    raise ValueError(f"unknown beta schedule '{name}' (known: linear, cosine)")


class GaussianProcess(nn.Module):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (Diff-UNet Eq. 1, DDPM Eq. 4).

    Args:
        timesteps: T, the length of the forward chain.
        schedule: ``linear`` or ``cosine`` (see :func:`make_beta_schedule`).
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

    # -- forward process -------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform t in {0, ..., T-1}, shape ``(B,)``."""
        return torch.randint(0, self.timesteps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Eq. 1). ``x0``, ``noise``: ``(B, C, *spatial)``."""
        return (expand_to(self.sqrt_alphas_cumprod[t], x0) * x0
                + expand_to(self.sqrt_one_minus_alphas_cumprod[t], x0) * noise)

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
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev). eta=0 is deterministic.
        """
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        eps_hat = (x_t - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + sigma * z
        return x_prev
