"""Exponential moving average (EMA) of the weights: the weights diffusion models are sampled with.

Training updates the raw weights; after every optimizer step the EMA follows them,

    theta_ema <- d_n theta_ema + (1 - d_n) theta,   d_n = min(d, (1 + n) / (10 + n)),

with n the number of updates so far (the warm-up keeps the first, random weights from dominating) and the target
decay d derived from the run's length, so the same plans work for a 250-iteration demo and nnU-Net's 250,000:
d = 1 - 1 / (h N) for N = epochs x iterations per epoch and ``horizon_fraction`` h (the EMA averages over roughly
the last h N updates), clipped to ``[0, max_decay]``.

The EMA weights are what validation samples with, what ``checkpoint_*.pth`` stores as ``network_weights`` (so the
predictor, the tuner and nnU-Net's own tools read them unchanged) and what the final validation predicts with; the
raw weights travel in the same checkpoint as ``raw_network_weights`` so that ``--continue`` resumes the optimisation
exactly. Plans: ``diffusion.ema = {"enabled": bool, "horizon_fraction": h, "max_decay": d_max}``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def ema_decay(total_updates: int, horizon_fraction: float, max_decay: float = 0.9999) -> float:
    """Target decay d = 1 - 1 / (h N), clipped to [0, max_decay] (``N`` = total optimizer steps of the run)."""
    horizon = max(1.0, float(horizon_fraction) * max(1, int(total_updates)))
    return float(min(max_decay, max(0.0, 1.0 - 1.0 / horizon)))


class WeightEMA:
    """Shadow copies of a module's floating-point state (parameters and float buffers; others are copied)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def step_decay(self) -> float:
        """d_n = min(d, (1 + n) / (10 + n)) for the n-th update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """theta_ema <- theta_ema + (1 - d_n) (theta - theta_ema), one fused call over all float tensors."""
        d = self.step_decay()
        shadows, values = [], []
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                shadows.append(s)
                values.append(v.detach().to(s.dtype))
            else:
                s.copy_(v)
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - d)
        self.updates += 1

    def load(self, weights: dict, updates: int) -> None:
        self.shadow = {k: v.detach().clone() for k, v in weights.items()}
        self.updates = int(updates)

    @contextmanager
    def applied(self, module: nn.Module):
        """Temporarily load the EMA weights into ``module``; the raw weights come back on exit."""
        raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield raw
        finally:
            module.load_state_dict(raw)


class EMAMixin:
    """Trainer mixin (before nnU-Net's trainer in the bases; no ``__init__``, see checkpointing.py): keeps
    ``self.ema`` when the plans' ``diffusion.ema.enabled`` is true and uses it for validation, checkpoints and
    the final validation. Needs ``self.diffusion`` and ``self.method`` (DiffusionTrainer)."""

    ema: WeightEMA | None = None
    _ema_active = False

    def _ema_settings(self) -> dict:
        return self.diffusion.get("ema") or {}

    def initialize(self):
        super().initialize()
        settings = self._ema_settings()
        if settings.get("enabled", False):
            self.ema = WeightEMA(self.method, self._target_ema_decay())

    def _target_ema_decay(self) -> float:
        s = self._ema_settings()
        return ema_decay(self.num_epochs * self.num_iterations_per_epoch, s.get("horizon_fraction", 0.1),
                         s.get("max_decay", 0.9999))

    def on_train_start(self):
        super().on_train_start()
        if self.ema is not None:  # the run's length is final now (a CLI or the demo may have changed it)
            self.ema.decay = self._target_ema_decay()
            self.print_to_log_file(f"EMA of the weights: decay {self.ema.decay:.5f} (horizon "
                                   f"{self._ema_settings().get('horizon_fraction', 0.1)} of "
                                   f"{self.num_epochs * self.num_iterations_per_epoch} updates)")

    def update_ema(self) -> None:
        """Call after every optimizer step (the trainer's ``train_step`` does)."""
        if self.ema is not None:
            self.ema.update(self.method)

    @contextmanager
    def ema_weights(self):
        """The EMA weights loaded into the method for the duration (re-entrant; a no-op without EMA)."""
        if self.ema is None or self._ema_active:
            yield
            return
        self._ema_active = True
        try:
            with self.ema.applied(self.method) as raw:
                self._raw_weights = raw
                yield
        finally:
            self._ema_active = False
            self._raw_weights = None

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_ctx = self.ema_weights()
        self._val_ctx.__enter__()

    def on_validation_epoch_end(self, val_outputs):
        try:
            super().on_validation_epoch_end(val_outputs)
        finally:
            ctx, self._val_ctx = getattr(self, "_val_ctx", None), None
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self.ema_weights():
            return super().perform_actual_validation(save_probabilities)

    def save_checkpoint(self, filename: str) -> None:
        """``network_weights`` = the EMA weights (what every predictor loads), ``raw_network_weights`` = the
        optimised ones and ``ema_updates`` (what ``--continue`` resumes from)."""
        if self.ema is None:
            return super().save_checkpoint(filename)
        import diffnnunet.trainers.checkpointing as checkpointing
        with self.ema_weights():
            extra = {"raw_network_weights": self._raw_weights, "ema_updates": self.ema.updates}
            with checkpointing.extra_checkpoint_entries(extra):
                return super().save_checkpoint(filename)

    def _restore_ema(self, stored: dict, ckpt: dict) -> None:
        """After the trainer loaded ``stored`` (``ckpt['network_weights']`` without DDP prefixes) into the method:
        put the raw weights back for training and keep the stored ones as the EMA (a checkpoint without EMA starts
        it from its weights)."""
        if self.ema is None:
            return
        raw = ckpt.get("raw_network_weights")
        if raw is not None:
            self.method.load_state_dict(raw)
        self.ema.load({k: v.to(self.device) for k, v in stored.items()}, ckpt.get("ema_updates", 0))
