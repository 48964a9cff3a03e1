"""The one checkpoint path of every diffnnunet trainer (the nnU-Net baseline included): killed-run-safe writing and
``weights_only`` reading.

nnU-Net writes ``checkpoint_latest.pth`` in place with ``torch.save``: a SIGKILL (out-of-memory killer, a cluster's
time limit, a lost node) during the write leaves a truncated file that ``--continue`` cannot load, and the stock
trainer writes it only every 50 epochs. Here every checkpoint is written to a hidden temporary name in the same
folder, flushed to disk and renamed over the old one (a rename within a folder is atomic), so at any moment the
file under the real name is a whole checkpoint; and ``checkpoint_latest`` is written after every epoch. Reading
uses :func:`~diffnnunet.utils.load_checkpoint_safely` (tensors, containers and numpy scalars only).

The checkpoint holds exactly nnU-Net's entries (``nnUNetTrainer.save_checkpoint`` / ``load_checkpoint``, whose
dict is built inline around an unsafe ``torch.load`` and so cannot be called without patching torch), and every
trainer mixin adds its own through two cooperative hooks: :meth:`CheckpointState.checkpoint_dict` (what is
written) and :meth:`CheckpointState.restore_checkpoint` (what is read back), each mixin calling ``super()``.
"""
from __future__ import annotations

import os

import torch
from torch.nn.parallel import DistributedDataParallel

from diffnnunet.utils import load_checkpoint_safely, partial_path


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel and/or ``torch.compile`` wrapper."""
    net = network.module if isinstance(network, DistributedDataParallel) else network
    return getattr(net, "_orig_mod", net)


class CheckpointState:
    """Base of the checkpointing mixins (before nnU-Net's trainer in the bases). Needs nnU-Net's trainer
    attributes: ``network``, ``optimizer``, ``grad_scaler``, ``logger``, ``_best_ema``, ``current_epoch``,
    ``my_init_kwargs``, ``inference_allowed_mirroring_axes``."""

    @property
    def trained_module(self) -> torch.nn.Module:
        """The network being trained, without its DDP / compile wrappers (what the checkpoint's weights are)."""
        return unwrapped(self.network)

    def checkpoint_dict(self) -> dict:
        """nnU-Net's checkpoint entries; a mixin adds its own and calls ``super()``."""
        return {
            "network_weights": self.trained_module.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }

    @staticmethod
    def stored_weights(checkpoint: dict) -> dict:
        """``network_weights`` without the ``module.`` prefix of a DDP-wrapped save."""
        return {k[7:] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}

    def restore_checkpoint(self, checkpoint: dict) -> None:
        """nnU-Net's restore: weights, init arguments, epoch, log, pseudo-Dice EMA, mirroring axes, optimizer and
        grad scaler; a mixin restores its own entries and calls ``super()`` first."""
        self.trained_module.load_state_dict(self.stored_weights(checkpoint))
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


class SafeCheckpointMixin(CheckpointState):
    """Atomic ``save_checkpoint`` of :meth:`checkpoint_dict` (rank 0 only, nothing with ``disable_checkpointing``)
    and ``weights_only`` ``load_checkpoint`` through :meth:`restore_checkpoint`. The trainer's ``__init__`` also sets
    ``save_every = 1`` (a killed run then loses at most one epoch); the mixin has no ``__init__`` because nnU-Net
    records its init arguments by inspecting the outermost signature."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        tmp = partial_path(filename)
        torch.save(self.checkpoint_dict(), tmp)
        _fsync(tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """A checkpoint file (read with ``weights_only=True``; a damaged file raises an error naming it) or an
        already loaded checkpoint dict."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = load_checkpoint_safely(checkpoint, map_location=self.device)
        self.restore_checkpoint(checkpoint)
