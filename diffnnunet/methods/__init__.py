"""One small module per paper; ``METHODS`` maps the plans' ``diffusion.method`` to its class (explicit, no scan)."""
from diffnnunet.methods.base import DiffusionMethod, encode_target
from diffnnunet.methods.berdiff import BerDiff
from diffnnunet.methods.build import METHODS, build_method, diffusion_section
from diffnnunet.methods.cdal import CDAL
from diffnnunet.methods.diff_unet import DiffUNet
from diffnnunet.methods.ldseg import LDSeg
from diffnnunet.methods.medsegdiff_v2 import MedSegDiffV2

__all__ = ["BerDiff", "CDAL", "DiffusionMethod", "DiffUNet", "LDSeg", "MedSegDiffV2", "METHODS", "build_method",
           "diffusion_section", "encode_target"]
