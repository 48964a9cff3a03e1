"""Plans -> method module: the one network builder that training (``build_network_architecture``) and inference
share, so neither needs the other's package."""
from __future__ import annotations

from diffnnunet.methods.berdiff import BerDiff
from diffnnunet.methods.cdal import CDAL
from diffnnunet.methods.diff_unet import DiffUNet
from diffnnunet.methods.ldseg import LDSeg
from diffnnunet.methods.medsegdiff_v2 import MedSegDiffV2
from diffnnunet.networks import resolve_arch_kwargs

#: the plans' ``diffusion.method`` -> its class (explicit, no scan)
METHODS = {cls.name: cls for cls in (DiffUNet, BerDiff, LDSeg, MedSegDiffV2, CDAL)}


def diffusion_section(configuration_manager, plans_name: str = "") -> dict:
    """The configuration's raw ``diffusion`` section; a clear error for plans without one (nnU-Net's own plans)."""
    section = configuration_manager.configuration.get("diffusion")
    if section is None:
        raise RuntimeError(f"plans '{plans_name}' have no 'diffusion' section in this configuration: "
                           "plan the dataset with diffnnunet_plan_and_preprocess (one plans file per method)")
    return section


def build_method(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int):
    """The method module (networks + noise process) of a configuration: ``METHODS[diffusion.method]`` built from
    the configuration's topology and its diffusion section (missing keys resolved in :mod:`diffnnunet.config`)."""
    diffusion = diffusion_section(configuration_manager, plans_manager.plans_name)
    method = diffusion.get("method")
    if method not in METHODS:
        raise ValueError(f"plans '{plans_manager.plans_name}': unknown diffusion method '{method}' "
                         f"(known: {', '.join(sorted(METHODS))})")
    arch = resolve_arch_kwargs(configuration_manager.network_arch_init_kwargs)
    return METHODS[method](arch, num_input_channels, num_output_channels, diffusion)
