"""One small module per paper; ``METHODS`` maps the plans' ``diffusion.method`` to its class (explicit, no scan)."""
from diffnnunet.methods.base import DiffusionMethod, encode_target
from diffnnunet.methods.berdiff import BerDiff
from diffnnunet.methods.cdal import CDAL
from diffnnunet.methods.diff_unet import DiffUNet
from diffnnunet.methods.ldseg import LDSeg
from diffnnunet.methods.medsegdiff_v2 import MedSegDiffV2

METHODS = {"diff_unet": DiffUNet, "berdiff": BerDiff, "ldseg": LDSeg, "medsegdiff_v2": MedSegDiffV2,
           "cdal": CDAL}

__all__ = ["BerDiff", "CDAL", "DiffusionMethod", "DiffUNet", "LDSeg", "MedSegDiffV2", "METHODS", "encode_target"]
