"""Explicit trainer registry: names -> classes, with no directory scan (nnU-Net's scan imports timm).

A user trainer is reachable by its dotted path (``mypackage.trainers.MyTrainer``); to use ours with nnU-Net's own
CLIs, see documentation/getting_started.md (nnUNet_extTrainer).
"""
from __future__ import annotations

import pydoc

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as StocknnUNetTrainer

from diffnnunet.trainers.baseline import nnUNetTrainer
from diffnnunet.trainers.diffusion_trainer import DiffusionTrainer
from diffnnunet.trainers.variants import BerDiffTrainer, DiffUNetTrainer, LDSegTrainer, MedSegDiffV2Trainer, cDALTrainer

TRAINERS = {
    "nnUNetTrainer": nnUNetTrainer,  # nnU-Net's, with safe checkpoints and the DDP fixes (baseline.py)
    "DiffusionTrainer": DiffusionTrainer,
    "DiffUNetTrainer": DiffUNetTrainer,
    "BerDiffTrainer": BerDiffTrainer,
    "LDSegTrainer": LDSegTrainer,
    "MedSegDiffV2Trainer": MedSegDiffV2Trainer,
    "cDALTrainer": cDALTrainer,
}


def get_trainer_class(name: str):
    """Registry lookup; a dotted ``module.Class`` name is imported. Raises ValueError listing the known names."""
    cls = TRAINERS.get(name)
    if cls is None and "." in name:
        cls = pydoc.locate(name)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, StocknnUNetTrainer)):
        raise ValueError(f"unknown trainer '{name}' (known: {', '.join(TRAINERS)}, or a dotted path to an "
                         "nnUNetTrainer subclass)")
    return cls


def is_diffusion_trainer(cls) -> bool:
    return issubclass(cls, DiffusionTrainer)


def default_plans_for(cls) -> str:
    """The plans a trainer trains on by default: its method's plans file (``METHODS[m].plans_name``), nnU-Net's
    ``nnUNetPlans`` for stock trainers, ``DiffnnUNetPlans`` for the generic DiffusionTrainer."""
    from diffnnunet.methods import METHODS
    if not is_diffusion_trainer(cls):
        return "nnUNetPlans"
    return METHODS[cls.method_name].plans_name if cls.method_name else "DiffnnUNetPlans"


__all__ = ["TRAINERS", "get_trainer_class", "DiffusionTrainer", "DiffUNetTrainer", "BerDiffTrainer",
           "LDSegTrainer", "MedSegDiffV2Trainer", "cDALTrainer", "default_plans_for"]
