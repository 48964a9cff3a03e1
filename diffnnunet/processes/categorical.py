"""Categorical (multinomial) generalisation of BerDiff for mutually exclusive labels, dimension-agnostic.

A voxel's label is one of K classes, held one-hot along channel dim 1: ``(B, K, *spatial)``. The Bernoulli
equations of the paper become (Hoogeboom et al. 2021, multinomial diffusion; K = 2 gives Eqs. 2-9 exactly):

    q(y_t | y_{t-1}) = Cat((1 - beta_t) y_{t-1} + beta_t / K),   q(y_t | y_0) = Cat(abar_t y_0 + (1 - abar_t) / K)

The flip noise of y_t = y_0 XOR eps becomes a cyclic shift: label(y_t) = (label(y_0) + e) mod K with
e = 0 with probability abar_t + (1 - abar_t)/K and each e in {1, ..., K-1} with probability (1 - abar_t)/K; for
K = 2 the shift is the XOR. The network predicts the distribution of e (softmax over K channels), and
y0_hat[c] = e_hat[(label(y_t) - c) mod K] generalises |y_t - eps_hat|.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffnnunet.processes.bernoulli import _EPS, BernoulliProcess, _coef, _log


def one_hot(labels: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """Labels ``(B, *spatial)`` -> one-hot ``(B, K, *spatial)``."""
    return F.one_hot(labels.long(), k).movedim(-1, 1).to(dtype)


class CategoricalProcess(BernoulliProcess):
    """BerDiff's process on K mutually exclusive classes. Probability tensors are class distributions along dim 1
    (they sum to one); losses are per voxel ``(B, 1, *spatial)`` (summed over classes).

    Args:
        categories: K >= 2. The other arguments as :class:`BernoulliProcess`.
    """

    def __init__(self, categories: int, timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        super().__init__(timesteps, schedule, beta_start, beta_end)
        if categories < 2:
            raise ValueError(f"a categorical process needs at least 2 classes, got {categories}")
        self.categories = int(categories)

    # -- forward process -------------------------------------------------------------------------------------
    def marginal(self, y0: torch.Tensor, t) -> torch.Tensor:
        """q(y_t | y_0) = abar_t y_0 + (1 - abar_t)/K, ``(B, K, *spatial)``."""
        ab = _coef(self.alpha_bar(t), y0)
        return ab * y0 + (1 - ab) / self.categories

    def sample_noise(self, y0: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """One-hot shift e ``(B, K, *spatial)``: u ~ U[0, 1) per voxel, e = k for u in [(k-1) r, k r) with
        r = (1 - abar_t)/K, k = 1..K-1, else e = 0. For K = 2 this is the Bernoulli draw u < (1 - abar_t)/2."""
        k = self.categories
        u = torch.rand((y0.shape[0], 1, *y0.shape[2:]), generator=generator, device=y0.device, dtype=y0.dtype)
        r = (1 - _coef(self.alpha_bar(t), u)) / k
        shift = torch.where(u < (k - 1) * r, torch.floor(u / r.clamp(min=_EPS)) + 1, torch.zeros_like(u))
        return one_hot(shift[:, 0].clamp(max=k - 1), k, y0.dtype)

    def q_sample(self, y0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """label(y_t) = (label(y_0) + label(e)) mod K, one-hot."""
        labels = (y0.argmax(1) + noise.argmax(1)) % self.categories
        return one_hot(labels, self.categories, y0.dtype)

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """y_T ~ Cat(1/K) (uniform), one-hot ``shape`` = ``(B, K, *spatial)``."""
        probs = torch.full(shape, 1.0 / self.categories, device=device, dtype=dtype)
        return self.draw(probs, generator)

    # -- posterior and calibration ---------------------------------------------------------------------------
    def posterior(self, y_t: torch.Tensor, y0: torch.Tensor, t, t_prev=None) -> torch.Tensor:
        """theta_post = Norm((a y_t + (1 - a)/K) * (abar_prev y_0 + (1 - abar_prev)/K)) over the K classes, a = alpha_t
        (or abar_t / abar_prev for a skip). ``y0`` may be a soft class distribution."""
        k = self.categories
        ab_prev = self.alpha_bar(self._prev(t, t_prev))
        a = _coef(self.alpha_bar(t) / ab_prev, y_t)
        ab_prev = _coef(ab_prev, y_t)
        unnorm = (a * y_t + (1 - a) / k) * (ab_prev * y0 + (1 - ab_prev) / k)
        return unnorm / unnorm.sum(1, keepdim=True).clamp(min=_EPS)

    def noise_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """e_hat = softmax(logits) over the K channels."""
        return torch.softmax(logits.float(), dim=1)

    def predict_x0(self, eps_hat: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """y0_hat[c] = e_hat[(label(y_t) - c) mod K]: the class distribution of y_0 implied by the shift estimate."""
        k = self.categories
        classes = torch.arange(k, device=y_t.device).reshape(1, k, *([1] * (y_t.ndim - 2)))
        index = (y_t.argmax(1, keepdim=True) - classes) % k
        return torch.gather(eps_hat, 1, index)

    # -- losses ------------------------------------------------------------------------------------------------
    def kl(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """KL(Cat(q) || Cat(p)) per voxel, ``(B, 1, *spatial)``, in nats."""
        return (torch.xlogy(q, q) - q * _log(p)).sum(1, keepdim=True)

    def decoder_nll(self, y0: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """-log Cat(y_0; p) per voxel, ``(B, 1, *spatial)``."""
        return -(y0 * _log(p)).sum(1, keepdim=True)

    def noise_nll(self, noise: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the shift estimate softmax(logits) against e, per voxel ``(B, 1, *spatial)``."""
        return -(noise * torch.log_softmax(logits.float(), dim=1)).sum(1, keepdim=True)

    # -- reverse steps -----------------------------------------------------------------------------------------
    def draw(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A one-hot sample of Cat(probs) along dim 1, one uniform u per voxel: label = the largest k with
        u < sum_{j >= k} p_j (so for K = 2, label 1 iff u < p_1: the same draw as the Bernoulli process)."""
        u = torch.rand((probs.shape[0], 1, *probs.shape[2:]), generator=generator, device=probs.device,
                       dtype=probs.dtype)
        tails = probs.flip(1).cumsum(1).flip(1)
        labels = (u * tails[:, :1] < tails[:, 1:]).sum(1)
        return one_hot(labels, self.categories, probs.dtype)
