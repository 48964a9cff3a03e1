"""Trainer variants: each only picks a method or sets attributes (like nnUNetTrainerNoDeepSupervision)."""
from diffnnunet.trainers.diffusion_trainer import DiffusionTrainer


class DiffUNetTrainer(DiffusionTrainer):
    """Diff-UNet (Xing et al. 2023); settings come from the plans' diffusion section."""

    method_name = "diff_unet"


class BerDiffTrainer(DiffusionTrainer):
    """BerDiff (Chen et al. 2023); settings come from the plans' diffusion section (BerDiffPlans)."""

    method_name = "berdiff"


class LDSegTrainer(DiffusionTrainer):
    """LDSeg (Zaman et al. 2024): latent diffusion; settings come from the plans' diffusion section."""

    method_name = "ldseg"


class MedSegDiffV2Trainer(DiffusionTrainer):
    """MedSegDiff-V2 (Wu et al. 2024): Condition + Diffusion Model, U-SA, SS-Former; settings from MedSegDiffV2Plans."""

    method_name = "medsegdiff_v2"


class cDALTrainer(DiffusionTrainer):
    """cDAL (Hejrati et al. 2024): generator + discriminator, each with its own optimizer (trainers/optimizers.py);
    settings come from the plans' diffusion section (cDALPlans)."""

    method_name = "cdal"
