"""DiffusionTrainer: nnU-Net's trainer with the network, the loss and the validation sampling swapped.

Everything else is nnU-Net's own: data loading, augmentation, foreground oversampling, 5-fold splits, logging,
progress.png, checkpoints (latest/best/final) and ``--continue``. Method variants only set ``method_name``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from diffnnunet.config import SAMPLING_FILE, resolve_diffusion
from diffnnunet.methods import METHODS, build_method, diffusion_section, encode_target
from diffnnunet.trainers.checkpointing import SafeCheckpointMixin
from diffnnunet.trainers.distributed import DistributedMixin
from diffnnunet.trainers.ema import EMAMixin
from diffnnunet.trainers.optimizers import MultiOptimizerMixin, optimizer_settings
from diffnnunet.utils import swapped


class DiffusionTrainer(EMAMixin, SafeCheckpointMixin, MultiOptimizerMixin, DistributedMixin, nnUNetTrainer):
    """Trains ``METHODS[plans.diffusion.method]``; a subclass that sets ``method_name`` insists on that method.

    The training recipe comes from the plans' diffusion section (planner.md, "The training recipe"): the optimizer
    and its warm-up + cosine schedule (``optimizer``; a method's extra networks get their own,
    trainers/optimizers.py), an EMA of the weights for sampling (``ema``, trainers/ema.py).
    """

    method_name: str | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: the plans' diffusion section with every missing key resolved (diffnnunet.config), as the method reads it
        self.diffusion = resolve_diffusion(diffusion_section(self.configuration_manager,
                                                             self.plans_manager.plans_name))
        if self.method_name is not None and self.diffusion["method"] != self.method_name:
            raise RuntimeError(f"{self.__class__.__name__} trains '{self.method_name}' but the plans' diffusion "
                               f"section says '{self.diffusion['method']}' (use plans "
                               f"{METHODS[self.method_name].plans_name})")
        optim = self.diffusion["optimizer"]
        if optim["name"] != "AdamW":
            raise RuntimeError(f"plans optimizer '{optim['name']}' is not supported (AdamW)")
        self.initial_lr = optim["initial_lr"]
        self.weight_decay = optim["weight_decay"]
        self.warmup_fraction = optim["warmup_fraction"]
        self.enable_deep_supervision = False
        self.save_every = 1  # checkpoint_latest every epoch (atomic): a killed run resumes with --continue

    # -- network -------------------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """The method module (networks + noise process) from the plans; inference reuses this exact function."""
        return build_method(plans_manager, configuration_manager, num_input_channels, num_output_channels)

    @property
    def method(self):
        """The method module being trained (the network without its DDP / compile wrappers)."""
        return self.trained_module

    def _do_i_compile(self):
        return False  # training_loss/sample are not forward(); compiling forward alone gains nothing here

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # the denoiser has one full-resolution output

    def _build_loss(self):
        return None  # the method owns its loss (training_loss)

    def configure_optimizers(self):
        """AdamW (fused where supported) with a warm-up cosine schedule over every parameter but those of the
        method's extra networks, which get their own (:class:`MultiOptimizerMixin`)."""
        return self.build_optimizer(self.main_parameters(), optimizer_settings(self.diffusion["optimizer"]))

    def on_train_start(self):
        """A new training (not ``--continue``) makes the model folder's tuned sampling.json stale: it was chosen
        for other weights, so it is removed (the default tuning after this run, or diffnnunet_tune_sampling,
        writes a new one)."""
        super().on_train_start()
        stale = os.path.join(os.path.dirname(self.output_folder), SAMPLING_FILE)
        if self.current_epoch == 0 and self.local_rank == 0 and os.path.isfile(stale):
            os.remove(stale)
            self.print_to_log_file(f"removed {stale}: tuned for the previous weights")

    # -- steps ---------------------------------------------------------------------------------------------------
    def _encode(self, target):
        target = target[0] if isinstance(target, list) else target
        return encode_target(target.to(self.device, non_blocking=True), self.label_manager.num_segmentation_heads,
                             self.label_manager.has_regions, self.label_manager.ignore_label)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        x0, mask = self._encode(batch["target"])
        extra_terms = self.step_extra_optimizers(data, x0, mask)  # e.g. a discriminator steps first
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():  # through the (DDP-wrapped) network's forward: gradients are all-reduced under DDP
            terms = self.network(data, x0, mask, mode="loss")
        self.optimizer_step(terms["loss"], self.optimizer, self.grad_scaler, self.network.parameters())
        self.update_ema()
        return {k: v.detach().float().cpu().numpy() for k, v in {**extra_terms, **terms}.items()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        terms = {k: float(np.mean([o[k] for o in train_outputs])) for k in train_outputs[0] if k != "loss"}
        self.print_to_log_file("train loss terms", {k: round(v, 4) for k, v in terms.items()})

    def validation_step(self, batch: dict) -> dict:
        """Loss on the validation patch plus a real few-step sample, so pseudo Dice and checkpoint_best mean
        what they mean for nnU-Net (``validation_sampling_steps`` / ``validation_samples`` in the plans)."""
        data = batch["data"].to(self.device, non_blocking=True)
        x0, mask = self._encode(batch["target"])
        generator = torch.Generator(device=self.device).manual_seed(
            int(self.diffusion["seed"]) + self.current_epoch)
        with self._autocast():
            loss = self.sampling_module.training_loss(data, x0, mask, generator=generator)["loss"]
            probs = self.sampling_module.sample(data, self.diffusion["validation_sampling_steps"],
                                       self.diffusion["validation_samples"], generator=generator)
        if self.label_manager.has_regions:
            pred = (probs > 0.5).float()
        else:
            pred = torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(pred, x0, axes=[0] + list(range(2, pred.ndim)), mask=mask)
        tp, fp, fn = (v.detach().cpu().numpy() for v in (tp, fp, fn))
        if not self.label_manager.has_regions:  # background Dice is not reported (as in nnU-Net)
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    # -- final validation through the diffusion predictor ------------------------------------------------------------
    def _make_validation_predictor(self, *args, save_uncertainty: bool = False, **kwargs):
        from diffnnunet.inference import DiffusionPredictor
        kwargs["use_mirroring"] = False  # the samples already ensemble (documentation/inference.md)
        return DiffusionPredictor(*args, save_uncertainty=save_uncertainty, **kwargs)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's fold validation with the stock predictor swapped for the diffusion predictor and nnU-Net's
        metrics for diffnnunet's (the same Dice/IoU, plus HD95 and NSD). With ``save_probabilities`` (``--npz``)
        each case's native uncertainty map (the raw chains' map in the plans' measure, at the plans' budget) is
        written beside its ``.npz`` as ``CASE_uncertainty`` when the method gives one (none with one sample per
        step), for diffnnunet_find_best_configuration's error maps; not for a configuration with a next stage,
        whose export nnU-Net's validation does outside the swapped function."""
        import functools

        from diffnnunet.evaluation.metrics import compute_metrics_on_folder_with_surfaces
        from diffnnunet.inference.export import export_prediction_atomically
        maps = bool(save_probabilities) and not self.configuration_manager.next_stage_names
        predictor = functools.partial(self._make_validation_predictor, save_uncertainty=maps)
        export = functools.partial(export_prediction_atomically, save_uncertainty=maps, native_only=True)
        with swapped(trainer_module, "nnUNetPredictor", predictor), \
                swapped(trainer_module, "export_prediction_from_logits", export), \
                swapped(trainer_module, "compute_metrics_on_folder", compute_metrics_on_folder_with_surfaces):
            super().perform_actual_validation(save_probabilities)
