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

import copy
from contextlib import contextmanager

import torch
from torch import nn

from diffnnunet.trainers.checkpointing import CheckpointState


def ema_decay(total_updates: int, horizon_fraction: float, max_decay: float = 0.9999) -> float:
    """Target decay d = 1 - 1 / (h N), clipped to [0, max_decay] (``N`` = total optimizer steps of the run)."""
    horizon = max(1.0, float(horizon_fraction) * max(1, int(total_updates)))
    return float(min(max_decay, max(0.0, 1.0 - 1.0 / horizon)))


class WeightEMA:
    """A shadow copy of a module whose floating-point state (parameters and float buffers) follows the module's as
    an EMA; other buffers are copied. The copy is a whole module (:attr:`module`, in eval mode, no gradients), so
    validation samples with it directly instead of swapping weights in and out of the trained module."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @property
    def shadow(self) -> dict:
        """The EMA state (name -> tensor), the storage of :attr:`module`."""
        return self.module.state_dict()

    def step_decay(self) -> float:
        """d_n = min(d, (1 + n) / (10 + n)) for the n-th update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """theta_ema <- theta_ema + (1 - d_n) (theta - theta_ema), one fused call over all float tensors."""
        d = self.step_decay()
        shadows, values = [], []
        shadow = self.shadow
        for k, v in module.state_dict().items():
            s = shadow[k]
            if s.is_floating_point():
                shadows.append(s)
                values.append(v.detach().to(s.dtype))
            else:
                s.copy_(v)
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - d)
        self.updates += 1

    def load(self, weights: dict, updates: int) -> None:
        self.module.load_state_dict(weights)
        self.updates = int(updates)

    @contextmanager
    def applied(self, module: nn.Module):
        """Temporarily load the EMA weights into ``module`` (for code that only takes the trained module, e.g.
        nnU-Net's final validation); the raw weights come back on exit, also after an exception."""
        raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield raw
        finally:
            module.load_state_dict(raw)


class EMAMixin(CheckpointState):
    """Trainer mixin (before nnU-Net's trainer in the bases; no ``__init__``, see checkpointing.py): keeps
    ``self.ema`` when :meth:`ema_settings` say ``enabled`` and uses it for validation (:attr:`sampling_module`),
    checkpoints and the final validation. Needs ``self.diffusion`` (its ``ema`` block, read by
    :meth:`ema_settings`), ``num_epochs`` and ``num_iterations_per_epoch``; the EMA follows
    :attr:`~CheckpointState.trained_module`."""

    ema: WeightEMA | None = None

    def ema_settings(self) -> dict:
        """The plans' ``ema`` block, every key present (the trainer's diffusion section is resolved in
        :mod:`diffnnunet.config`: a missing block means the default recipe's)."""
        return self.diffusion["ema"]

    def initialize(self):
        super().initialize()
        if self.ema_settings()["enabled"]:
            self.ema = WeightEMA(self.trained_module, self._target_ema_decay())

    def _target_ema_decay(self) -> float:
        s = self.ema_settings()
        return ema_decay(self.num_epochs * self.num_iterations_per_epoch, s["horizon_fraction"], s["max_decay"])

    def on_train_start(self):
        super().on_train_start()
        if self.ema is not None:  # the run's length is final now (a CLI or the demo may have changed it)
            self.ema.decay = self._target_ema_decay()
            self.print_to_log_file(f"EMA of the weights: decay {self.ema.decay:.5f} (horizon "
                                   f"{self.ema_settings()['horizon_fraction']} of "
                                   f"{self.num_epochs * self.num_iterations_per_epoch} updates)")

    @property
    def sampling_module(self) -> torch.nn.Module:
        """What validation samples with: the EMA copy, or the trained module without EMA."""
        return self.ema.module if self.ema is not None else self.trained_module

    def update_ema(self) -> None:
        """Call after every optimizer step (the trainer's ``train_step`` does)."""
        if self.ema is not None:
            self.ema.update(self.trained_module)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation predicts with ``self.network``: the EMA weights are loaded into it for the
        duration (``with``: restored also when it raises)."""
        if self.ema is None:
            return super().perform_actual_validation(save_probabilities)
        with self.ema.applied(self.trained_module):
            return super().perform_actual_validation(save_probabilities)

    def checkpoint_dict(self) -> dict:
        """``network_weights`` = the EMA weights (what every predictor loads), ``raw_network_weights`` = the
        optimised ones and ``ema_updates`` (what ``--continue`` resumes from)."""
        checkpoint = super().checkpoint_dict()
        if self.ema is not None:
            checkpoint["raw_network_weights"] = checkpoint["network_weights"]
            checkpoint["network_weights"] = self.ema.shadow
            checkpoint["ema_updates"] = self.ema.updates
        return checkpoint

    def restore_checkpoint(self, checkpoint: dict) -> None:
        """The raw weights back into the trained module, the stored (EMA) ones into the EMA (a checkpoint without
        EMA starts it from its weights)."""
        super().restore_checkpoint(checkpoint)
        if self.ema is None:
            return
        raw = checkpoint.get("raw_network_weights")
        if raw is not None:
            self.trained_module.load_state_dict(raw)
        stored = self.stored_weights(checkpoint)
        self.ema.load({k: v.to(self.device) for k, v in stored.items()}, checkpoint.get("ema_updates", 0))
