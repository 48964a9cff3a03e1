"""The one place for every default: the diffusion section each method's plans get, the training recipes, and what
a missing plans key means.

A leaf module (it imports nothing of diffnnunet but :mod:`diffnnunet.utils`): the planner writes these values into
the plans; the methods, the trainer and the predictor read a plans section only through :func:`resolve_diffusion`,
so a key missing from a plans file means the same value to the network, the training loop and the sampler.
"""
from __future__ import annotations

from copy import deepcopy

from diffnnunet.utils import merge_nested

#: LDSeg's recipe: the smallest latent size per axis where the patch allows (documentation/ldseg.md, "Why LDSeg
#: lagged"): the paper's latents are 8-48 per axis, a 16x downsampling of an 80-voxel patch leaves 5 and the label
#: auto-encoder cannot represent thin structures; the paper's recipe has ``min_latent_size: 2``
RECIPE_MIN_LATENT_SIZE = 16
#: file-name suffix of the exported uncertainty maps (CASE_uncertainty.nii.gz)
UNCERTAINTY_SUFFIX = "_uncertainty"
#: file name of the tuned sampling budget and calibration in a model folder (next to plans.json)
SAMPLING_FILE = "sampling.json"
#: the end-of-training tuning's grid of sampling steps x samples per step (inference.md, "The sampling budget")
DEFAULT_STEPS = (1, 2, 5, 10)
DEFAULT_SAMPLES = (1, 2, 4)

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
        "paper_recipe": {"optimizer": {"name": "AdamW", "initial_lr": 1e-4, "weight_decay": 1e-5,
                                       "warmup_fraction": 0.1}},
        "seed": 12345,
    },
    # BerDiff: T=1000, linear 1e-4..0.02, flip-noise estimate, KL + 1 x BCE, AdamW 1e-4 (BRATS), DDIM sub-sequence.
    # 10 steps x 8 samples: 80 forwards per window (2x Diff-UNet's default); the paper's 16 (for GED) doubles it.
    "berdiff": {
        "method": "berdiff", "process": "bernoulli", "multiclass": "auto", "timesteps": 1000,
        "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "sampler": "ddim", "eta": 0.0,
        # the native map: the chains' mutual information, as the Gaussian methods. One chain has none, so the tuner
        # no longer picks a one-chain budget, whose margin-only map swung from 0.911 to 0.938 test AUROC between
        # demo runs; four checkpoints: +0.019, -0.004, +0.025, +0.001 (berdiff.md, "Entropy or mutual information")
        "sampling_steps": 10, "samples_per_step": 8, "bce_weight": 1.0, "uncertainty": "mutual_information",
        # the recipe (documentation/berdiff.md, "Recipe"; not in the paper): logits of y_0 instead of the flip
        # noise, a soft Dice loss on the x0 estimate, the saliency map as the chains' expected (not drawn) last
        # sample
        "dice_weight": 1.0, "saliency": "expected", "prediction": "x0",
        "validation_sampling_steps": 2, "validation_samples": 1,
        "paper_recipe": {"optimizer": {"name": "AdamW", "initial_lr": 1e-4, "weight_decay": 1e-5,
                                       "warmup_fraction": 0.1}, "dice_weight": 0.0, "saliency": "samples",
                         "prediction": "eps", "samples_per_step": 16},
        "seed": 12345,
    },
    # LDSeg (Zaman et al. 2024): cosine T=1000, eps-prediction, DDIM 2 steps (Fig. 5 / Table IV), gamma=2, lambda=1
    # (Sec. IV.C); lr 1e-3 (the paper's lower initial lr; it names no optimizer, AdamW as Diff-UNet). The latent
    # downsampling (latent_strides, denoiser_strides) is added per configuration by LDSeg.configure_plans;
    # multiclass "auto" becomes "categorical" (softmax decoder, the paper) or "per_channel" (sigmoids) for regions.
    "ldseg": {
        "method": "ldseg", "process": "gaussian", "timesteps": 1000, "schedule": "cosine",
        "eta": 0.0, "sampling_steps": 2, "samples_per_step": 4, "latent_channels": 4,
        "denoised_latent": "x0", "x0_clip": 5.0, "multiclass": "auto",
        # the chains' mutual information, as for every Gaussian-chain method: on the demo's test slices 0.926
        # AUROC with the error map against 0.897 for their total entropy (ldseg.md, "Inference", step 4)
        "uncertainty": "mutual_information",
        # the recipe (documentation/ldseg.md, "Why LDSeg lagged" and "Image skips"); the paper's values are in
        # paper_recipe: x0-prediction, a latent of >= 16 per axis, the label decoder also sees the image encoder's
        # stage outputs (a U-Net path), no self-attention in the image encoder (it over-fitted the demo's training
        # slab). The four networks train jointly as in the paper (no stop-gradient, no auto-encoder term: with the
        # skips those two cost 6 Dice points on the demo's test slab)
        "prediction": "x0", "latent_norm": "instance", "latent_stop_gradient": False,
        "latent_downsampling": 16, "min_latent_size": RECIPE_MIN_LATENT_SIZE,
        "image_skips": True, "image_attention": False,
        "loss_weights": {"ce": 1.0, "dice": 2.0, "mse": 1.0, "autoencoder": 0.0},
        "validation_sampling_steps": 2, "validation_samples": 1,
        # recipe "paper" (training_recipe writes these keys over the ones above): the paper's LDSeg
        # Eq. 12's z_t - eps_hat decoded in training (no clamp: the clipped x0 estimate stops the segmentation
        # gradient at large t), a 1-channel latent (the denoiser's "two channel input", Sec. IV.B), one sample
        # (Algorithm 2 decodes one chain; Fig. 10's maps used 100 runs)
        "paper_recipe": {"optimizer": {"name": "AdamW", "initial_lr": 1e-3, "weight_decay": 1e-5,
                                       "warmup_fraction": 0.1},
                         "prediction": "eps", "denoised_latent": "paper", "latent_channels": 1,
                         "samples_per_step": 1, "latent_stop_gradient": False, "min_latent_size": 2,
                         "image_skips": False, "image_attention": True,
                         "loss_weights": {"ce": 1.0, "dice": 2.0, "mse": 1.0, "autoencoder": 0.0}},
        "seed": 12345,
    },
    # cDAL (Hejrati et al. 2024): x0-prediction, T=2 (CXR, Hippocampus; T=4 for MoNuSeg), the few-step
    # variance-preserving schedule of denoising diffusion GANs (beta rates 0.1..20), posterior sampling (eta=1),
    # 5 samples averaged; latent z of L=100 dims (DDGAN's; the paper gives none) and discriminator attention from the
    # map at 1/8 of the patch (Table 1's 32 x 32; attention_stage is added per configuration); loss Eq. 4 (MSE
    # only). The paper gives no optimizer: its "paper" recipe is AdamW 1e-3 for both networks ("discriminator"
    # overrides its own keys); the default recipe gives the discriminator the shared keys.
    "cdal": {
        "method": "cdal", "process": "gaussian", "prediction": "x0", "timesteps": 2, "schedule": "vp",
        "beta_start": 0.1, "beta_end": 20.0, "eta": 1.0, "sampling_steps": 2, "samples_per_step": 5,
        "latent": True, "latent_dim": 100, "attention": True, "attn_scale": 8, "multiclass": "auto",
        "uncertainty": "mutual_information", "loss_weights": {"mse": 1.0, "dice": 0.0},
        "validation_sampling_steps": 2, "validation_samples": 1,
        # the configured recipe (today's measured behaviour): A_D multiplies the diffused 2 x0 - 1 ("signed"), one
        # discriminator step on the summed real + fake loss, nnU-Net's plain conv stages. The paper (Sec. 2.2, 3.2):
        # x0_att = x0 * A_D on the {0, 1} label ("label"), D updated on the real pair, then again on the fake
        # pair (2 steps), and residual blocks in the generator and the discriminator
        "attention_on": "signed", "discriminator_steps": 1, "residual_blocks": False,
        "paper_recipe": {"optimizer": {"name": "AdamW", "initial_lr": 1e-3, "weight_decay": 1e-5,
                                       "warmup_fraction": 0.1, "discriminator": {"initial_lr": 1e-3}},
                         "attention_on": "label", "discriminator_steps": 2, "residual_blocks": True},
        "seed": 12345,
    },
    # MedSegDiff-V2 (Wu et al. 2024): linear T=1000, eps-prediction, anchor loss every alpha=5 timesteps with
    # beta=10 (Eq. 3), SS-Former N=4 blocks, NBP-Filter R=6, STAPLE over the samples. The paper samples 100 DDIM
    # steps x 10; the default budget is the measured trade-off at the demo budget (documentation/medsegdiff_v2.md).
    # max_tokens caps the SS-Former's token grid (the N x N Fourier affinity maps), ss_dim its token width (the
    # bottleneck's 320-512 channels projected down: 17M -> 1.7M parameters for 512); u_sa / ss_former / nbp_filter
    # switch the parts off for the paper's Table 4 ablation.
    "medsegdiff_v2": {
        # x0-prediction is the recipe (the eps Diffusion Model samples poorly after short runs, medsegdiff_v2.md);
        # the paper's eps is in paper_recipe
        # x0_output sigmoid: x0_theta = 2 sigmoid(z) - 1, bounded like the target, where the linear output had to
        # sit exactly at -1 over the background: on the demo, two runs each, test Dice 0.871 / 0.884 against
        # 0.859 / 0.838, uncertainty AUROC 0.9375 / 0.9377 against 0.9349 / 0.9321 (medsegdiff_v2.md)
        "method": "medsegdiff_v2", "process": "gaussian", "prediction": "x0", "x0_output": "sigmoid",
        "timesteps": 1000,
        "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "eta": 0.0,
        # fusion mean: the chains' mean p, not STAPLE (the paper's, in paper_recipe), whose nearly binary posteriors
        # the temperature cannot make rank errors: on the validation folds of skullstripped2d and nuclei2d (3 seeds
        # each) held-out error-map AUROC 0.819 / 0.888 against 0.785 / 0.864, ECE lower or tied, Dice tied
        # (benchmarks.md, "MedSegDiff-V2's fusion on validation folds")
        "sampling_steps": 10, "samples_per_step": 5, "fusion": "mean", "multiclass": "auto",
        # anchor_weight 0.5: the output is half the fused chains, half the Condition Model's anchor probabilities
        # (the paper: the chains alone, 0 in paper_recipe; the public code blends its anchor in). On fold 0's
        # validation cases of demo, skullstripped2d and nuclei2d, 3 seeds each, same checkpoints: pooled Dice
        # +0.010, +0.007, +0.022 over the chains alone, higher in 8 of 9 pairs (benchmarks.md, "MedSegDiff-V2's
        # anchor in the output")
        "anchor_weight": 0.5,
        "anchor_alpha": 5, "anchor_beta": 10.0, "u_sa": True, "ss_former": True, "nbp_filter": True,
        "ss_blocks": 4, "ss_dim": 128, "nbp_blocks": 6, "nbp_width": 16, "max_tokens": 64,
        # the recipe's deviations from the paper, each a switch (medsegdiff_v2.md, "Design decisions"): the image
        # also enters the Diffusion Model (cat(I, x_t); the paper's Fig. 1 feeds x_t alone), a softmax over the
        # keys in the spectral attention (the paper: F^-1(M')(c W^v) unnormalised); ss_dim and max_tokens above
        # (the paper: no projection down, null; no token pooling, null)
        "diffusion_image": True, "ss_softmax": True,
        # the native map: the S x0 chains' mutual information, as every Gaussian method's: 0 where they agree, also
        # over the demo's test background, which sits at another z-score than the training slices' and where the
        # chains agree on a soft probability that their total entropy ranks above most errors (medsegdiff_v2.md,
        # "The map")
        "uncertainty": "mutual_information",
        "validation_sampling_steps": 2, "validation_samples": 1,
        # the configured recipe without the weight EMA: on the demo (two runs each, same plans) the EMA weights gave
        # test Dice 0.863 and 0.866, the raw weights 0.897 and 0.890, uncertainty AUROC 0.925-0.931 against
        # 0.933-0.940 (benchmarks.md, "EMA ablation, 2026-12-02")
        "default_recipe": {"ema": {"enabled": False}},
        # the paper: AdamW, initial lr 1e-4, batch 32, 100 sampling steps x 10 samples fused by STAPLE
        # (Sec. "Implementation details"), eps-prediction, every deviation switched off
        "paper_recipe": {"optimizer": {"name": "AdamW", "initial_lr": 1e-4, "weight_decay": 1e-5,
                                       "warmup_fraction": 0.1}, "prediction": "eps",
                         "sampling_steps": 100, "samples_per_step": 10, "fusion": "staple", "anchor_weight": 0.0,
                         "diffusion_image": False,
                         "ss_softmax": False, "ss_dim": None, "max_tokens": None},
        "seed": 12345,
    },
}

#: the configured training recipe (``recipe: default``, planner.md "The training recipe"), measured on the demo
#: and a second brain set (documentation/benchmarks.md, "Training recipe"): AdamW at 1e-3 (10x the papers' 1e-4,
#: which needs far longer runs than a user's budget), linear warm-up over the first 10% of the epochs, then cosine
#: annealing to zero over the run the user asked for; an EMA of the weights for sampling whose horizon is a fixed
#: fraction of the run's updates (trainers/ema.py), so short and nnU-Net-length runs alike get a sensible decay.
#: ``recipe: paper`` writes each paper's ``paper_recipe`` instead (no EMA: none of the papers reports one).
DEFAULT_RECIPE = {
    "optimizer": {"name": "AdamW", "initial_lr": 1e-3, "weight_decay": 1e-5, "warmup_fraction": 0.1},
    "ema": {"enabled": True, "horizon_fraction": 0.1, "max_decay": 0.9999},
}
RECIPES = ("default", "paper")


def training_recipe(method_defaults: dict, recipe: str = "default") -> dict:
    """The recipe entries of a diffusion section: ``recipe``, ``optimizer`` and ``ema``. The default recipe is
    :data:`DEFAULT_RECIPE` with the method's measured exceptions (``default_recipe``, merged key by key) on top."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown training recipe '{recipe}' (known: {', '.join(RECIPES)})")
    if recipe == "default":
        chosen = merge_nested(DEFAULT_RECIPE, method_defaults.get("default_recipe", {}))
    else:
        chosen = deepcopy(method_defaults.get("paper_recipe", DEFAULT_RECIPE))
    out = {"recipe": recipe, "ema": {"enabled": False}}
    out.update(chosen)
    return out

#: inference keeps no activations for backward; a conservative factor of samples per training sample that fit
INFERENCE_SAMPLES_PER_TRAINING_SAMPLE = 2


#: keys of a method's defaults that describe recipes, not settings of the section itself
_RECIPE_BLOCKS = ("paper_recipe", "default_recipe")


def method_defaults(method: str) -> dict:
    """What a plans section of ``method`` holds for every key the planner writes without looking at the data: the
    method's entry of :data:`DEFAULT_DIFFUSION` with the default training recipe applied (a fresh copy)."""
    if method not in DEFAULT_DIFFUSION:
        raise ValueError(f"unknown diffusion method '{method}' (known: {', '.join(sorted(DEFAULT_DIFFUSION))})")
    settings = deepcopy(DEFAULT_DIFFUSION[method])
    settings.update(training_recipe(settings, "default"))
    for key in _RECIPE_BLOCKS:
        settings.pop(key, None)
    return settings


#: what a plans file written before a key existed was trained with, where the planner writes another value since
#: (older models keep loading as they were trained): the meaning of a missing key, for these keys
PLANS_WITHOUT_KEY = {
    "berdiff": {"prediction": "eps", "saliency": "samples", "dice_weight": 0.0},
    "ldseg": {"prediction": "eps", "image_skips": False, "image_attention": True, "min_latent_size": 2},
    "medsegdiff_v2": {"prediction": "eps", "x0_output": "linear", "ss_dim": None, "anchor_weight": 0.0},
}


def resolve_diffusion(section: dict | None, method: str | None = None) -> dict:
    """A plans ``diffusion`` section with every missing key (nested ones too) filled in: from
    :data:`PLANS_WITHOUT_KEY` where the key's meaning predates it, else from :func:`method_defaults`; the plans'
    values win. ``method`` is used when the section names none. The methods, the trainer and the predictor read
    the plans only through this, so a key deleted from a plans file means one value everywhere."""
    section = section or {}
    name = section.get("method") or method
    if name is None:
        raise ValueError("the diffusion section names no 'method'")
    base = merge_nested(method_defaults(name), PLANS_WITHOUT_KEY.get(name, {}))
    return merge_nested(base, {**section, "method": name})
