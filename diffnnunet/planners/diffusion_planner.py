"""DiffusionPlanner: nnU-Net's ExperimentPlanner with a memory model of the time-conditioned network and a
per-configuration ``diffusion`` section. See documentation/planner.md."""
from __future__ import annotations

from copy import deepcopy

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from diffnnunet.methods import METHODS
from diffnnunet.methods.ldseg import RECIPE_MIN_LATENT_SIZE
from diffnnunet.networks import TimeUNet, resolve_arch_kwargs

#: per-method defaults, from the papers (Diff-UNet: T=1000, linear 1e-4..0.02, x0, DDIM 10 steps, S=4, SUF)
DEFAULT_DIFFUSION = {
    "diff_unet": {
        "method": "diff_unet", "process": "gaussian", "prediction": "x0", "timesteps": 1000,
        "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "eta": 0.0,
        "sampling_steps": 10, "samples_per_step": 4, "fusion": "step_uncertainty",
        # the native map: on the demo the chains' mutual information finds the errors (AUROC 0.92), the total
        # entropy of their last-step sigmoids does not (0.56; documentation/inference.md)
        "uncertainty": "mutual_information",
        "loss_weights": {"dice": 1.0, "bce": 1.0, "mse": 1.0},
        "validation_sampling_steps": 2, "validation_samples": 1,
        "optimizer": {"name": "AdamW", "initial_lr": 1e-4, "weight_decay": 1e-5, "warmup_fraction": 0.1},
        "seed": 12345,
    },
    # BerDiff: T=1000, linear 1e-4..0.02, flip-noise estimate, KL + 1 x BCE, AdamW 1e-4 (BRATS), DDIM sub-sequence.
    # 10 steps x 8 samples: 80 forwards per window (2x Diff-UNet's default); the paper's 16 (for GED) doubles it.
    "berdiff": {
        "method": "berdiff", "process": "bernoulli", "multiclass": "auto", "timesteps": 1000,
        "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "sampler": "ddim", "eta": 0.0,
        "sampling_steps": 10, "samples_per_step": 8, "bce_weight": 1.0, "uncertainty": "entropy",
        "validation_sampling_steps": 2, "validation_samples": 1,
        "optimizer": {"name": "AdamW", "initial_lr": 1e-4, "weight_decay": 1e-5, "warmup_fraction": 0.1},
        "seed": 12345,
    },
    # LDSeg (Zaman et al. 2024): cosine T=1000, eps-prediction, DDIM 2 steps (Fig. 5 / Table IV), gamma=2, lambda=1
    # (Sec. IV.C); lr 1e-3 (the paper's lower initial lr; it names no optimizer, AdamW as Diff-UNet). The latent
    # downsampling (latent_strides, denoiser_strides) is added per configuration by LDSeg.configure_plans;
    # multiclass "auto" becomes "categorical" (softmax decoder, the paper) or "per_channel" (sigmoids) for regions.
    "ldseg": {
        "method": "ldseg", "process": "gaussian", "timesteps": 1000, "schedule": "cosine",
        "eta": 0.0, "sampling_steps": 2, "samples_per_step": 4, "latent_channels": 4,
        "denoised_latent": "x0", "x0_clip": 5.0, "multiclass": "auto", "uncertainty": "entropy",
        # the recipe (documentation/ldseg.md, "Why LDSeg lagged"); the paper's values are in paper_recipe
        "prediction": "x0", "latent_norm": "instance", "latent_stop_gradient": True,
        "latent_downsampling": 16, "min_latent_size": RECIPE_MIN_LATENT_SIZE,
        "loss_weights": {"ce": 1.0, "dice": 2.0, "mse": 1.0, "autoencoder": 1.0},
        "validation_sampling_steps": 2, "validation_samples": 1,
        "optimizer": {"name": "AdamW", "initial_lr": 1e-3, "weight_decay": 1e-5, "warmup_fraction": 0.1},
        # recipe "paper" (main's training_recipe writes these keys over the ones above): the paper's LDSeg
        "paper_recipe": {"optimizer": {"name": "AdamW", "initial_lr": 1e-3, "weight_decay": 1e-5,
                                       "warmup_fraction": 0.1},
                         "prediction": "eps", "latent_stop_gradient": False, "min_latent_size": 2,
                         "loss_weights": {"ce": 1.0, "dice": 2.0, "mse": 1.0}},
        "seed": 12345,
    },
}

#: inference keeps no activations for backward; a conservative factor of samples per training sample that fit
INFERENCE_SAMPLES_PER_TRAINING_SAMPLE = 2


class DiffusionPlanner(ExperimentPlanner):
    """Plans for a diffusion trainer. Spacing, transposition, normalisation and preprocessing are nnU-Net's
    (so ``2d`` and ``3d_fullres`` share nnU-Net's preprocessed data); topology, patch and batch size are fitted to
    the same VRAM target with the diffusion network's feature-map count (extra noisy-label input channels, time
    embedding sums, separate image encoder) instead of the plain U-Net's."""

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False, method: str = "diff_unet"):
        if method not in METHODS:
            raise ValueError(f"unknown diffusion method '{method}' (known: {', '.join(sorted(METHODS))})")
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or METHODS[method].plans_name, overwrite_target_spacing, suppress_transpose)
        self.method = method
        self.UNet_class = TimeUNet

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name,
                                   arch_kwargs, arch_kwargs_req_import):
        """Feature-map elements of the whole method network for one sample (replaces the plain U-Net count)."""
        return METHODS[self.method].feature_map_size(resolve_arch_kwargs(arch_kwargs), input_channels,
                                                     output_channels, tuple(patch_size))

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["diffusion"] = self.diffusion_settings(plan)
        return plan

    def diffusion_settings(self, plan: dict) -> dict:
        """The configuration's diffusion section: the paper's defaults plus what depends on this configuration:
        how many network inputs fit one inference forward pass (``inference_batch``: windows x samples) and how many
        sampling chains of one window run together (``samples_per_forward``) within the memory budget, and
        whatever the method's ``configure_plans`` hook derives from the configuration."""
        settings = deepcopy(DEFAULT_DIFFUSION[self.method])
        if settings.get("multiclass") == "auto":  # the dataset says whether its labels are exclusive or regions
            labels = LabelManager(self.dataset_json["labels"], self.dataset_json.get("regions_class_order"))
            settings["multiclass"] = "per_channel" if labels.has_regions else "categorical"
        settings["inference_batch"] = int(plan["batch_size"] * INFERENCE_SAMPLES_PER_TRAINING_SAMPLE)
        settings["samples_per_forward"] = int(max(1, min(settings["samples_per_step"], settings["inference_batch"])))
        return METHODS[self.method].configure_plans(settings, deepcopy(plan))

    def generate_data_identifier(self, configuration_name: str) -> str:
        """2d and 3d_fullres use nnU-Net's spacing unchanged, so they reuse nnUNetPlans' preprocessed data."""
        if configuration_name in ("2d", "3d_fullres") and self.overwrite_target_spacing is None:
            return "nnUNetPlans_" + configuration_name
        return self.plans_identifier + "_" + configuration_name
