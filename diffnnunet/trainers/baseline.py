"""The nnU-Net baseline as diffnnunet runs it: nnU-Net's own trainer, unchanged in what it learns, with the
checkpoints of :class:`SafeCheckpointMixin` (atomic, every epoch, safe loading).

The class keeps nnU-Net's name, so model folders (``nnUNetTrainer__nnUNetPlans__2d``) and checkpoints
(``trainer_name``) are exactly nnU-Net's and interchangeable with models trained by ``nnUNetv2_train``.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _stock

from diffnnunet.trainers.checkpointing import SafeCheckpointMixin
from diffnnunet.trainers.distributed import DistributedMixin


class nnUNetTrainer(SafeCheckpointMixin, DistributedMixin, _stock.nnUNetTrainer):  # noqa: N801 - nnU-Net's name
    """nnU-Net's ``nnUNetTrainer`` with killed-run-safe checkpoints (``checkpoint_latest`` after every epoch
    instead of every 50th: a few hundred milliseconds per epoch for a whole epoch's work kept) and the DDP fixes
    of :class:`DistributedMixin` (CPU/gloo, LOCAL_RANK devices on several nodes)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1
