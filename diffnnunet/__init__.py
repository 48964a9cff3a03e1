"""diffnnunet: diffusion-model segmentation on top of nnU-Net's self-configuring pipeline."""

__version__ = "0.1.0"
