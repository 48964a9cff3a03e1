"""The training recipe: the EMA of the weights (trainers/ema.py) against hand-computed values, the configured and
the papers' recipes as literal values, `diffnnunet_plan_and_preprocess --recipe paper` checked against every
published value, and the end-of-training tuning keeping the published budget."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from diffnnunet.config import DEFAULT_DIFFUSION, DEFAULT_RECIPE, resolve_diffusion, training_recipe
from diffnnunet.trainers.ema import WeightEMA, ema_decay
from tests.helpers import STANDARD_IDS, dataset_names, module_cli_env


@pytest.mark.parametrize("total, fraction, expected", [
    (250, 0.1, 1 - 1 / 25),           # the demo: 10 epochs x 25 iterations, horizon 25 updates
    (250_000, 0.1, 0.9999),           # nnU-Net's 1000 x 250: 1 - 1/25000 clipped to max_decay
    (5, 0.1, 0.0),                    # shorter than one update of horizon: no averaging
])
def test_ema_decay_follows_the_run_length(total, fraction, expected):
    assert ema_decay(total, fraction) == pytest.approx(expected)


def test_weight_ema_update_by_hand():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightEMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # n = 0: d = min(0.5, 1/10) = 0.1 -> 0.1 * 1 + 0.9 * 3 = 2.8
    assert ema.shadow["weight"].item() == pytest.approx(2.8)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema.update(lin)  # n = 1: d = min(0.5, 2/11) -> 2.8 * 2/11
    assert ema.shadow["weight"].item() == pytest.approx(2.8 * 2 / 11)
    for _ in range(20):
        ema.update(lin)  # d reaches 0.5 once (1+n)/(10+n) > 0.5, i.e. from n = 9 on
    assert ema.step_decay() == 0.5
    with ema.applied(lin):
        assert lin.weight.item() == pytest.approx(ema.shadow["weight"].item())
    assert lin.weight.item() == 0.0  # the raw weights are back


def test_weight_ema_copies_integer_buffers(dim):
    norm = torch.nn.BatchNorm2d(2) if dim == 2 else torch.nn.BatchNorm3d(2)
    ema = WeightEMA(norm, decay=0.9)
    norm.train()(torch.randn(2, 2, *([4] * dim)))
    ema.update(norm)
    assert ema.shadow["num_batches_tracked"].item() == 1
    expected = 0.1 * 0 + 0.9 * norm.running_mean  # d_0 = 0.1; the shadow started at the initial zeros
    torch.testing.assert_close(ema.shadow["running_mean"], expected)


#: the configured recipe, literally (planner.md, "The training recipe")
DEFAULT = {"recipe": "default",
           "optimizer": {"name": "AdamW", "initial_lr": 1e-3, "weight_decay": 1e-5, "warmup_fraction": 0.1},
           "ema": {"enabled": True, "horizon_fraction": 0.1, "max_decay": 0.9999}}
ADAMW = {"name": "AdamW", "weight_decay": 1e-5, "warmup_fraction": 0.1}
#: what recipe "paper" writes over each method's defaults, literally (the papers' numbers; see PUBLISHED)
PAPER = {
    "diff_unet": {"recipe": "paper", "ema": {"enabled": False}, "optimizer": {**ADAMW, "initial_lr": 1e-4}},
    "berdiff": {"recipe": "paper", "ema": {"enabled": False}, "optimizer": {**ADAMW, "initial_lr": 1e-4},
                "dice_weight": 0.0, "saliency": "samples", "prediction": "eps", "samples_per_step": 16},
    "ldseg": {"recipe": "paper", "ema": {"enabled": False}, "optimizer": {**ADAMW, "initial_lr": 1e-3},
              "prediction": "eps", "denoised_latent": "paper", "latent_channels": 1, "samples_per_step": 1,
              "latent_stop_gradient": False, "min_latent_size": 2, "image_skips": False, "image_attention": True,
              "loss_weights": {"ce": 1.0, "dice": 2.0, "mse": 1.0, "autoencoder": 0.0}},
    "cdal": {"recipe": "paper", "ema": {"enabled": False},
             "optimizer": {**ADAMW, "initial_lr": 1e-3, "discriminator": {"initial_lr": 1e-3}},
             "attention_on": "label", "discriminator_steps": 2, "residual_blocks": True},
    "medsegdiff_v2": {"recipe": "paper", "ema": {"enabled": False}, "optimizer": {**ADAMW, "initial_lr": 1e-4},
                      "prediction": "eps", "sampling_steps": 100, "samples_per_step": 10,
                      "fusion": "staple", "anchor_weight": 0.0, "diffusion_image": False, "ss_softmax": False,
                      "ss_dim": None, "max_tokens": None},
}


@pytest.mark.parametrize("method", sorted(DEFAULT_DIFFUSION))
def test_recipes_literally(method):
    assert training_recipe(DEFAULT_DIFFUSION[method], "paper") == PAPER[method]
    default = training_recipe(DEFAULT_DIFFUSION[method])
    if method == "medsegdiff_v2":  # measured without the EMA (benchmarks.md, "EMA ablation")
        assert default == {**DEFAULT, "ema": {"enabled": False, "horizon_fraction": 0.1, "max_decay": 0.9999}}
    else:
        assert default == DEFAULT
    with pytest.raises(ValueError, match="unknown training recipe"):
        training_recipe(DEFAULT_DIFFUSION[method], "fast")


def test_a_methods_default_recipe_overrides_only_its_own_entries():
    """A method's measured exception (``default_recipe``) replaces only its own entries of the configured recipe."""
    recipe = training_recipe({"default_recipe": {"ema": {"enabled": False}}})
    assert recipe == {**DEFAULT, "ema": {"enabled": False, "horizon_fraction": 0.1, "max_decay": 0.9999}}
    assert DEFAULT_RECIPE == {k: v for k, v in DEFAULT.items() if k != "recipe"}  # the shared default is unchanged


#: every published value, by paper, as the planned 2d diffusion section must hold it (-methods all, --recipe paper)
PUBLISHED = {
    # Diff-UNet: T = 1000, linear 1e-4..0.02, x0, DDIM 10 steps x S = 4, SUF, Dice + BCE + MSE, AdamW 1e-4 (wd 1e-5,
    # warm-up 1/10, cosine)
    "diff_unet": {"timesteps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "prediction": "x0",
                  "sampling_steps": 10, "samples_per_step": 4, "fusion": "step_uncertainty",
                  "loss_weights": {"dice": 1.0, "bce": 1.0, "mse": 1.0}},
    # BerDiff: T = 1000 linear, the noise estimate, KL + BCE, DDIM sub-sequence, 16 samples, AdamW 1e-4 (BRATS)
    "berdiff": {"process": "bernoulli", "timesteps": 1000, "schedule": "linear", "beta_start": 1e-4,
                "beta_end": 0.02, "sampler": "ddim", "prediction": "eps", "bce_weight": 1.0, "dice_weight": 0.0,
                "samples_per_step": 16},
    # LDSeg: cosine T = 1000, eps, Eq. 12, a 1-channel latent (two denoiser input channels), 16x downsampling,
    # DDIM 2 steps, one chain, gamma = 2, lambda = 1, initial lr 1e-3, attention in the image encoder, no skips
    "ldseg": {"timesteps": 1000, "schedule": "cosine", "prediction": "eps", "denoised_latent": "paper",
              "latent_channels": 1, "latent_downsampling": 16, "sampling_steps": 2, "samples_per_step": 1,
              "eta": 0.0, "loss_weights": {"ce": 1.0, "dice": 2.0, "mse": 1.0, "autoencoder": 0.0},
              "image_skips": False, "image_attention": True, "latent_stop_gradient": False},
    # cDAL: x0, T = 2 (CXR, Hippocampus), posterior sampling over the T steps, 5 generations averaged, Eq. 4 alone,
    # latent z and D's attention on x0 in {0, 1}, D updated twice, residual blocks
    "cdal": {"prediction": "x0", "timesteps": 2, "schedule": "vp", "eta": 1.0, "sampling_steps": 2,
             "samples_per_step": 5, "latent": True, "attention": True, "attention_on": "label",
             "discriminator_steps": 2, "residual_blocks": True, "loss_weights": {"mse": 1.0, "dice": 0.0}},
    # MedSegDiff-V2: linear T = 1000, eps, alpha = 5, beta = 10, N = 4 SS-Former blocks, R = 6 NBP blocks,
    # 100 steps x 10 samples fused by STAPLE (the chains alone: no anchor in the output), AdamW 1e-4, x_t alone
    # into the Diffusion Model, no softmax, no projection down, no token pooling, U-SA + SS-Former + NBP-Filter
    "medsegdiff_v2": {"timesteps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                      "prediction": "eps", "anchor_alpha": 5, "anchor_beta": 10.0, "ss_blocks": 4, "nbp_blocks": 6,
                      "sampling_steps": 100, "samples_per_step": 10, "fusion": "staple", "anchor_weight": 0.0,
                      "u_sa": True, "ss_former": True, "nbp_filter": True, "diffusion_image": False,
                      "ss_softmax": False, "ss_dim": None, "max_tokens": None},
}
LR = {"diff_unet": 1e-4, "berdiff": 1e-4, "ldseg": 1e-3, "cdal": 1e-3, "medsegdiff_v2": 1e-4}
PLANS = {"diff_unet": "DiffnnUNetPlans", "berdiff": "BerDiffPlans", "ldseg": "LDSegPlans", "cdal": "cDALPlans",
         "medsegdiff_v2": "MedSegDiffV2Plans"}


@pytest.fixture(scope="module")
def paper_plans(planned, tmp_path_factory):
    """A copy of the session's 2D dataset re-planned (its fingerprint kept, not preprocessed again) with every
    method under --recipe paper."""
    from diffnnunet.cli import plan_and_preprocess
    for paths in module_cli_env(planned, tmp_path_factory.mktemp("recipe")):
        plan_and_preprocess.main(["-d", str(STANDARD_IDS[2]), "-c", "2d", "-np", "2", "--no_pp", "--no_baseline",
                                  "--recipe", "paper", "-methods", *sorted(PLANS)])
        yield paths


@pytest.mark.parametrize("method", sorted(PLANS))
def test_plan_with_recipe_paper_holds_every_published_value(paper_plans, method):
    folder = os.path.join(paper_plans["nnUNet_preprocessed"], dataset_names(STANDARD_IDS)[2])
    with open(os.path.join(folder, PLANS[method] + ".json")) as f:
        section = json.load(f)["configurations"]["2d"]["diffusion"]
    assert section["method"] == method and section["recipe"] == "paper"
    assert {k: section[k] for k in PUBLISHED[method]} == PUBLISHED[method]
    assert section["optimizer"]["name"] == "AdamW" and section["optimizer"]["initial_lr"] == LR[method]
    assert section["ema"] == {"enabled": False}  # none of the papers reports a weight EMA
    assert "paper_recipe" not in section and "default_recipe" not in section


def test_tuning_keeps_the_paper_budget(tmp_path, monkeypatch):
    """Under recipe "paper" the end-of-training tuning runs no budget grid: sampling.json keeps the plans'
    published steps x samples (MedSegDiff-V2's 100 x 10, outside the grid), which diffnnunet_predict then uses."""
    import diffnnunet.inference.predictor as predictor_module
    from diffnnunet.inference.calibration import load_tuned_sampling
    from diffnnunet.inference.tuning import tune_sampling

    class Predictor:  # the model folder's predictor, without weights: nothing is predicted when the budget is kept
        def __init__(self, **kwargs):
            self.diffusion = None

        def initialize_from_trained_model_folder(self, folder, folds, checkpoint):
            self.diffusion = resolve_diffusion({"method": "medsegdiff_v2", **PAPER["medsegdiff_v2"]})
            self.configuration_manager = SimpleNamespace(data_identifier="data")

    monkeypatch.setattr(predictor_module, "DiffusionPredictor", Predictor)
    monkeypatch.setattr("nnunetv2.training.dataloading.nnunet_dataset.infer_dataset_class",
                        lambda folder: lambda path: None)
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b", "c"]}]))
    summary = tune_sampling(str(tmp_path), str(tmp_path / "pre"), [0], calibration=False)
    assert (summary["sampling_steps"], summary["samples_per_step"], summary["budget"]) == (100, 10, "plans")
    assert "grid" not in summary and summary["cases"] == 2
    assert load_tuned_sampling(str(tmp_path)) == {"sampling_steps": 100, "samples_per_step": 10, "budget": "plans"}
