"""Linear warm-up then cosine annealing, stepped once per epoch like nnU-Net's PolyLRScheduler."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import _LRScheduler


class WarmupCosineLR(_LRScheduler):
    """lr(e) = lr0 (e + 1) / W for e < W, then lr0 / 2 (1 + cos(pi (e - W) / (E - W))) (Diff-UNet: W = E / 10)."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_fraction: float = 0.1,
                 current_step: int | None = None):
        self.optimizer, self.initial_lr, self.max_steps = optimizer, initial_lr, max(1, int(max_steps))
        self.warmup_steps = int(round(warmup_fraction * self.max_steps))
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * self.initial_lr * (1 + math.cos(math.pi * progress))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
