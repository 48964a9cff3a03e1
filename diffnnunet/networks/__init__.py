"""Networks shared by all methods: a time-conditioned U-Net and a plain encoder, both built from a plans topology."""
from diffnnunet.networks.time_unet import TimeEmbedding, TimeUNet, UNetEncoder, resolve_arch_kwargs

__all__ = ["TimeEmbedding", "TimeUNet", "UNetEncoder", "resolve_arch_kwargs"]
