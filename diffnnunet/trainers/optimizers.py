"""More than one optimizer per trainer: a method's extra networks (e.g. cDAL's discriminator) get their own.

A method declares them with :meth:`DiffusionMethod.extra_optimised` (name -> submodule) and a forward mode
``"<name>_loss"`` in ``forward_modes``. :class:`MultiOptimizerMixin` then

- builds the main optimizer over the remaining parameters and one optimizer + LR schedule per name, with the plans'
  ``optimizer`` block, overridden by its ``optimizer[<name>]`` sub-block (e.g. ``{"initial_lr": 1e-4}``);
- steps each extra optimizer before the main one in every training iteration, through the (DDP-wrapped) network's
  ``forward(mode="<name>_loss")`` so DDP all-reduces its gradients, with its own CUDA AMP grad scaler and its own
  gradient clipping (only its parameters), and clears its gradients afterwards (the main step's clipping never
  sees them);
- steps the extra LR schedules once per epoch like nnU-Net's, and saves / restores every extra optimizer's state
  and grad scaler in the checkpoint (key ``extra_optimizers``), so ``--continue`` resumes them.

Without extra networks nothing changes (the checkpoint has no extra key).
"""
from __future__ import annotations

import torch
from torch.amp import GradScaler

from diffnnunet.trainers.checkpointing import CheckpointState
from diffnnunet.trainers.lr_schedule import WarmupCosineLR

#: the gradient-norm clip of every optimizer (nnU-Net's value)
CLIP_NORM = 12.0


def make_adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where torch supports it on this device: the per-parameter loop
    of the unfused CPU AdamW costs a noticeable share of a small training step."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused AdamW on this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_settings(block: dict, name: str | None = None) -> dict:
    """The plans' ``optimizer`` block for the main optimizer (``name`` None) or the extra one ``name``: the shared
    scalar keys overridden by the sub-block ``block[name]``."""
    shared = {k: v for k, v in block.items() if not isinstance(v, dict)}
    return {**shared, **block.get(name, {})} if name else shared


class MultiOptimizerMixin(CheckpointState):
    """Before nnU-Net's trainer in a DiffusionTrainer's bases (module docstring). Needs the trainer's ``diffusion``
    (its ``optimizer`` block), ``initial_lr``, ``weight_decay``, ``warmup_fraction`` and a ``network`` whose
    (unwrapped) module may define ``extra_optimised`` and the ``"<name>_loss"`` forward modes."""

    @property
    def extra_optimizers(self) -> dict:
        """name -> optimizer of the method's extra networks (empty before ``initialize`` and for most methods)."""
        return self.__dict__.setdefault("_extra_optimizers", {})

    def extra_parameter_groups(self) -> dict:
        """name -> trainable parameters of each extra network (:meth:`DiffusionMethod.extra_optimised`). Works
        before and after the DDP / compile wrapping (nnU-Net builds the optimizer before wrapping)."""
        net = getattr(self.network, "module", self.network)
        extra = getattr(getattr(net, "_orig_mod", net), "extra_optimised", dict)()
        return {name: [p for p in module.parameters() if p.requires_grad] for name, module in extra.items()}

    def main_parameters(self) -> list:
        """The trainable parameters the main optimizer steps: all but the extra networks'."""
        excluded = {id(p) for params in self.extra_parameter_groups().values() for p in params}
        return [p for p in self.network.parameters() if p.requires_grad and id(p) not in excluded]

    def build_optimizer(self, params, settings: dict):
        """AdamW + warm-up cosine schedule over ``num_epochs`` from ``settings`` (an ``optimizer`` block)."""
        lr = float(settings.get("initial_lr", self.initial_lr))
        optimizer = make_adamw(params, lr, float(settings.get("weight_decay", self.weight_decay)), self.device)
        schedule = WarmupCosineLR(optimizer, lr, self.num_epochs,
                                  float(settings.get("warmup_fraction", self.warmup_fraction)))
        return optimizer, schedule

    def initialize(self):
        super().initialize()
        block = self.diffusion.get("optimizer", {})
        self.extra_lr_schedulers, self.extra_grad_scalers = {}, {}
        for name, params in self.extra_parameter_groups().items():
            self.extra_optimizers[name], self.extra_lr_schedulers[name] = self.build_optimizer(
                params, optimizer_settings(block, name))
            self.extra_grad_scalers[name] = GradScaler("cuda") if self.grad_scaler is not None else None

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for name, schedule in self.extra_lr_schedulers.items():
            schedule.step(self.current_epoch)
            lr = self.extra_optimizers[name].param_groups[0]["lr"]
            self.print_to_log_file(f"Current {name} learning rate: {lr:.5g}")

    # -- steps -------------------------------------------------------------------------------------------------------
    def optimizer_step(self, loss: torch.Tensor, optimizer, scaler, params) -> None:
        """backward, (unscale,) clip ``params`` to :data:`CLIP_NORM`, step."""
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()

    def step_extra_optimizers(self, data: torch.Tensor, x0: torch.Tensor, mask) -> dict:
        """The steps of every extra network (before the main step, the other networks frozen by the method's
        loss): one per part of the method's ``extra_steps`` (default one, e.g. cDAL's paper recipe two: its real
        and its fake pair), each ``network(data, x0, mask, mode="<name>_loss"[, part=part])``. Returns the
        detached terms, ``loss`` renamed ``<name>_loss`` and summed over the steps."""
        terms = {}
        groups = self.extra_parameter_groups() if self.extra_optimizers else {}
        net = getattr(self.network, "module", self.network)
        parts = getattr(getattr(net, "_orig_mod", net), "extra_steps", dict)()
        for name, optimizer in self.extra_optimizers.items():
            for part in parts.get(name, (None,)):
                optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    kwargs = {} if part is None else {"part": part}
                    out = self.network(data, x0, mask, mode=f"{name}_loss", **kwargs)
                self.optimizer_step(out["loss"], optimizer, self.extra_grad_scalers[name], groups[name])
                optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    key = f"{name}_loss" if k == "loss" else k
                    terms[key] = terms[key] + v.detach() if key in terms else v.detach()
        return terms

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def extra_optimizer_states(self) -> dict:
        return {name: {"optimizer_state": opt.state_dict(),
                       "grad_scaler_state": (self.extra_grad_scalers[name].state_dict()
                                             if self.extra_grad_scalers[name] is not None else None)}
                for name, opt in self.extra_optimizers.items()}

    def checkpoint_dict(self) -> dict:
        """nnU-Net's checkpoint plus ``extra_optimizers`` (name -> optimizer and grad scaler states)."""
        checkpoint = super().checkpoint_dict()
        if self.extra_optimizers:
            checkpoint["extra_optimizers"] = self.extra_optimizer_states()
        return checkpoint

    def restore_checkpoint(self, checkpoint: dict) -> None:
        """Restore every extra optimizer (and grad scaler) from a checkpoint written by :meth:`checkpoint_dict`."""
        super().restore_checkpoint(checkpoint)
        saved = checkpoint.get("extra_optimizers", {})
        for name, optimizer in self.extra_optimizers.items():
            if name not in saved:
                self.print_to_log_file(f"WARNING: the checkpoint has no state of the '{name}' optimizer; it "
                                       "starts afresh")
                continue
            optimizer.load_state_dict(saved[name]["optimizer_state"])
            scaler = self.extra_grad_scalers[name]
            if scaler is not None and saved[name].get("grad_scaler_state") is not None:
                scaler.load_state_dict(saved[name]["grad_scaler_state"])
