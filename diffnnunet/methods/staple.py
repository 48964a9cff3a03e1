"""STAPLE (Warfield, Zou & Wells, IEEE TMI 2004): expectation-maximisation fusion of binary segmentations, in torch,
batched over windows and channels. MedSegDiff-V2 fuses its S samples with it (per channel / class here)."""
from __future__ import annotations

import torch


def _posterior(d: torch.Tensor, prior: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E-step: W = a / (a + b) ``(P, V)`` from decisions ``(P, S, V)``, prior ``(P, 1)``, p and q ``(P, S)``."""
    log = lambda x: torch.log(x.clamp(min=1e-300))[..., None]  # noqa: E731
    log_a = torch.log(prior) + (d * log(p) + (1 - d) * log(1 - p)).sum(1)
    log_b = torch.log(1 - prior) + ((1 - d) * log(q) + d * log(1 - q)).sum(1)
    return torch.sigmoid(log_a - log_b)


def staple(decisions: torch.Tensor, max_iterations: int = 50, tolerance: float = 1e-6,
           initial: float = 0.99999) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary STAPLE per independent problem. ``decisions`` ``(P, S, V)`` in {0, 1}: P problems (e.g. window x
    channel), S raters (samples), V voxels. Returns (W ``(P, V)``, the posterior probability that the true label is
    foreground; sensitivities p ``(P, S)``; specificities q ``(P, S)``).

    The prior f = the mean of all decisions of the problem (fixed, as ITK's STAPLEImageFilter); p and q start at
    ``initial``. E-step (Warfield Eq. 14-16): a = f prod_j p_j^D_ij (1 - p_j)^(1 - D_ij),
    b = (1 - f) prod_j q_j^(1 - D_ij) (1 - q_j)^D_ij, W_i = a / (a + b) (computed with logs).
    M-step (Eqs. 18-19): p_j = sum_i W_i D_ij / sum_i W_i, q_j = sum_i (1 - W_i)(1 - D_ij) / sum_i (1 - W_i).
    Stops when no p or q moves by more than ``tolerance`` or after ``max_iterations``.
    """
    d = decisions.double()
    prior = d.mean(dim=(1, 2)).clamp(1e-12, 1 - 1e-12)[:, None]  # (P, 1)
    p = torch.full(d.shape[:2], float(initial), dtype=d.dtype, device=d.device)
    q = p.clone()
    tiny = 1e-300
    for _ in range(int(max_iterations)):
        w = _posterior(d, prior, p, q)
        p_new = (w[:, None] * d).sum(-1) / w.sum(-1, keepdim=True).clamp(min=tiny)
        q_new = ((1 - w)[:, None] * (1 - d)).sum(-1) / (1 - w).sum(-1, keepdim=True).clamp(min=tiny)
        change = torch.maximum((p_new - p).abs().max(), (q_new - q).abs().max()) if p.numel() else 0.0
        p, q = p_new, q_new
        if float(change) < tolerance:
            break
    return _posterior(d, prior, p, q), p, q


def staple_fuse(samples: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-channel STAPLE of S binary samples ``(B, S, C, *spatial)`` -> foreground posteriors ``(B, C, *spatial)``
    (one STAPLE problem per window and channel, the samples as raters)."""
    b, s, c = samples.shape[:3]
    spatial = samples.shape[3:]
    problems = samples.reshape(b, s, c, -1).transpose(1, 2).reshape(b * c, s, -1)
    w, _, _ = staple(problems, **kwargs)
    return w.reshape(b, c, *spatial).float()
