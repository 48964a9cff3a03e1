"""LDSeg: latent layout from the plans, latent shapes, standardisation, the loss terms of Eqs. 14-18, the DDIM sampler
(Algorithm 2) with its uncertainty map, and the CLIs end to end on tiny 2D and 3D multi-class data."""
import math

import pytest
import torch

from diffnnunet.config import DEFAULT_DIFFUSION
from diffnnunet.methods import LDSeg, encode_target
from diffnnunet.methods.ldseg import ce_loss, latent_mask
from diffnnunet.networks.latent import LatentStandardize, latent_layout, total_stride
from tests.conftest import ARCH_2D as ARCH_2D_TINY
from tests.helpers import CONFIG, STANDARD_IDS, dataset_names, module_cli_env

NNUNET_2D = dict(n_stages=7, features_per_stage=[32, 64, 128, 256, 512, 512, 512],
                 conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * 7,
                 strides=[[1, 1]] + [[2, 2]] * 6, n_conv_per_stage=[2] * 7, n_conv_per_stage_decoder=[2] * 6,
                 conv_bias=True, norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                 norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                 nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
# thick slices: the first axis is downsampled only from stage 3 on, as nnU-Net plans it
NNUNET_3D_ANISO = dict(NNUNET_2D, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320],
                       conv_op="torch.nn.modules.conv.Conv3d",
                       kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                       strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                       n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5,
                       norm_op="torch.nn.modules.instancenorm.InstanceNorm3d")


def _model(arch, spatial, channels=2, classes=3, **diffusion):
    torch.manual_seed(0)
    latent, denoiser = latent_layout(arch, spatial)
    settings = {"latent_strides": latent, "denoiser_strides": denoiser, **diffusion}
    return LDSeg(arch, channels, classes, settings).eval()


def _onehot(spatial, classes=3, batch=2, seed=0):
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=torch.Generator().manual_seed(seed))
    return encode_target(labels.float(), classes, has_regions=False, ignore_label=None)[0]


# -- latent layout -------------------------------------------------------------------------------------------------
def test_latent_layout_takes_plans_strides_until_16():
    strides, denoiser = latent_layout(NNUNET_2D, [256, 256])
    assert strides == [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]] and total_stride(strides) == [16, 16]
    assert denoiser == [[1, 1], [2, 2]]  # 16 x 16 latent: the denoiser downsamples once


def test_latent_layout_anisotropic_axis_downsamples_less():
    strides, _ = latent_layout(NNUNET_3D_ANISO, [32, 256, 256])
    assert total_stride(strides) == [4, 16, 16]  # the thick-slice axis has only two stride-2 stages before 16
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]  # trailing no-op stage dropped


def test_latent_layout_respects_the_patch():
    strides, denoiser = latent_layout(NNUNET_3D_ANISO, [4, 32, 48])
    assert total_stride(strides) == [2, 16, 16]  # >= 2 latent positions per axis: 4 -> 2, 32 -> 2, 48 -> 3
    assert denoiser == [[1, 1, 1], [1, 1, 1]]  # latent (2, 2, 3) is too small to downsample
    assert total_stride(latent_layout(NNUNET_2D, [40, 64])[0]) == [8, 16]  # 40 = 8 * 5: 16 does not divide


def test_configure_plans_stores_the_layout():
    plan = {"patch_size": [32, 256, 256], "architecture": {"arch_kwargs": NNUNET_3D_ANISO}}
    settings = LDSeg.configure_plans(dict(DEFAULT_DIFFUSION["ldseg"], min_latent_size=2), plan)  # the paper's
    assert total_stride(settings["latent_strides"]) == [4, 16, 16]
    assert settings["latent_size"] == [8, 16, 16] and settings["denoiser_strides"] == [[1, 1, 1], [2, 2, 2]]
    recipe = LDSeg.configure_plans(dict(DEFAULT_DIFFUSION["ldseg"]), plan)  # >= 16 latent positions per axis
    assert total_stride(recipe["latent_strides"]) == [2, 16, 16] and recipe["latent_size"] == [16, 16, 16]
    m = LDSeg(NNUNET_3D_ANISO, 1, 2, settings)
    assert m.latent_strides == settings["latent_strides"]


def test_defaults_follow_the_paper_plus_the_recipe():
    d = DEFAULT_DIFFUSION["ldseg"]
    paper = _model(ARCH_2D_TINY, (16, 16))
    assert (paper.process.prediction, paper.latent_stop_gradient, paper.w_ae) == ("eps", False, 0.0)
    assert not paper.image_skips and not paper.label_decoder.image_skips
    assert isinstance(paper.label_encoder.standardize, LatentStandardize)
    plan = {"patch_size": [80, 80], "architecture": {"arch_kwargs": NNUNET_2D}}
    # the recipe's departures (documentation/ldseg.md), as the module built from the defaults has them: x0
    # prediction, image skips into the label decoder, no self-attention in the image encoder; joint training as in
    # the paper (the stop-gradient and auto-encoder levers stay plans keys, off)
    recipe = LDSeg(NNUNET_2D, 1, 3, LDSeg.configure_plans(dict(d), plan))
    assert (recipe.process.prediction, recipe.latent_stop_gradient, recipe.w_ae) == ("x0", False, 0.0)
    assert recipe.image_skips and recipe.label_decoder.image_skips
    assert not any(isinstance(x, torch.nn.MultiheadAttention) for x in recipe.image_encoder.modules())
    recipe_paper = {**d, **d["paper_recipe"]}  # what recipe "paper" writes
    m = LDSeg(NNUNET_2D, 1, 3, LDSeg.configure_plans(recipe_paper, plan))
    assert (m.process.prediction, m.latent_stop_gradient, m.w_ae, total_stride(m.latent_strides)) == (
        "eps", False, 0.0, [16, 16])
    assert not m.image_skips
    assert any(isinstance(x, torch.nn.MultiheadAttention) for x in m.image_encoder.modules())  # the paper's


# -- networks --------------------------------------------------------------------------------------------------------
def test_latent_shapes(arch, spatial, dim):
    m = _model(arch, spatial)
    factor = total_stride(m.latent_strides)
    latent = tuple(s // f for s, f in zip(spatial, factor))
    assert factor == ([4, 4] if dim == 2 else [2, 4, 4])  # ARCH_3D's first axis is strided once only
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    assert m.encode_label(x0).shape == (2, 4, *latent)
    assert m.encode_image(image).shape == (2, 4, *latent)
    assert m.decode(m.encode_label(x0)).shape == (2, 3, *spatial)
    assert m(image).shape == (2, 3, *spatial)
    assert m.benchmark_forward(image[:1])().shape == (1, 3, *spatial)


def test_label_latent_is_standardised_per_sample_and_channel(arch, spatial):
    m = _model(arch, spatial)
    x0 = _onehot(spatial, batch=3)
    z = m.encode_label(x0)
    axes = tuple(range(2, z.ndim))
    torch.testing.assert_close(z.mean(axes), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(axes, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(m.encode_label(x0[1:2]), z[1:2], atol=1e-5, rtol=0)  # not batch statistics
    raw = torch.randn(2, 4, *spatial) * 5 + 3
    ref = (raw - raw.mean(axes, keepdim=True)) / torch.sqrt(raw.var(axes, keepdim=True, unbiased=False) + 1e-5)
    torch.testing.assert_close(LatentStandardize()(raw), ref)


def test_image_encoder_attends_in_its_last_two_downsampling_stages():
    m = _model(NNUNET_2D, [64, 64])
    has_attention = [any(isinstance(x, torch.nn.MultiheadAttention) for x in s.modules())
                     for s in m.image_encoder.stages]
    assert has_attention == [False, False, False, True, True]
    off = _model(NNUNET_2D, [64, 64], image_attention=False)
    assert not any(isinstance(x, torch.nn.MultiheadAttention) for x in off.image_encoder.modules())
    assert not any(isinstance(x, torch.nn.MultiheadAttention) for x in m.label_encoder.modules())


def test_feature_map_size_counts_every_network(dim):
    arch = NNUNET_2D if dim == 2 else NNUNET_3D_ANISO
    small, big = ([64, 64], [128, 128]) if dim == 2 else ([8, 64, 64], [16, 128, 128])
    a = LDSeg.feature_map_size(arch, 1, 3, small)
    assert a > 3 * 32 * math.prod(small)  # at least the three full-resolution paths (2 encoders + decoder)
    assert LDSeg.feature_map_size(arch, 1, 3, big) >= 0.9 * 2 ** dim * a  # scales with the patch volume


# -- loss (Algorithm 1, Eqs. 11-18) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "x0"])
def test_training_loss_is_eq18(arch, spatial, variant):
    m = _model(arch, spatial, denoised_latent=variant)
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    terms = m.training_loss(image, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    z_l, z_i = m.encode_label(x0), m.encode_image(image)
    t = torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(z_l.shape, generator=g)
    ab = m.process.alphas_cumprod[t].reshape(2, *[1] * (z_l.ndim - 1))
    z_t = ab.sqrt() * z_l + (1 - ab).sqrt() * eps  # Eq. 11
    eps_hat = m.denoiser(torch.cat([z_t, z_i], 1), t)
    z_dn = z_t - eps_hat if variant == "paper" else ((z_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()).clamp(-5, 5)
    p = torch.softmax(m.label_decoder(z_dn), 1)
    ce = -(x0 * torch.log(p)).sum(1).mean()  # Eq. 14, mean over voxels
    axes = [0] + list(range(2, p.ndim))
    dice = 1 - (2 * (p * x0).sum(axes) / (p.sum(axes) + x0.sum(axes))).mean()  # Eq. 15, mean over classes
    mse = ((eps_hat - eps) ** 2).mean()  # Eq. 17
    for key, ref in (("ce", ce), ("dice", dice), ("mse", mse), ("loss", ce + 2 * dice + mse)):
        torch.testing.assert_close(terms[key], ref, rtol=1e-4, atol=1e-5, msg=key)
    terms["loss"].backward()
    for net in (m.label_encoder, m.image_encoder, m.denoiser, m.label_decoder):  # trained end to end
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_ignored_voxels_do_not_change_the_loss():
    from tests.conftest import ARCH_2D
    m = _model(ARCH_2D, (16, 16))
    image, x0 = torch.randn(2, 2, 16, 16), _onehot((16, 16))
    mask = torch.ones(2, 1, 16, 16)
    mask[..., :4] = 0
    other = x0.clone()
    other[..., :4] = torch.nn.functional.one_hot(torch.full((2, 16, 4), 2), 3).movedim(-1, 1).float()
    a = m.training_loss(image, x0, mask, generator=torch.Generator().manual_seed(1))
    b = m.training_loss(image, other, mask, generator=torch.Generator().manual_seed(1))
    for key in ("ce", "dice", "mse", "loss"):
        torch.testing.assert_close(a[key], b[key])
    assert ce_loss(torch.zeros(2, 3, 16, 16), x0, mask).item() == pytest.approx(math.log(3), rel=1e-6)
    weights = latent_mask(mask, (4, 4))  # each latent cell covers 4 x 4 voxels; the first column is ignored
    assert weights[0, 0, :, 0].tolist() == [0.0] * 4 and weights[0, 0, :, 1:].eq(1).all()


def test_regions_use_per_channel_sigmoids():
    from tests.conftest import ARCH_2D
    regions = torch.zeros(2, 2, 16, 16)
    regions[:, 0, 2:12, 2:12] = 1
    regions[:, 1, 4:8, 4:8] = 1  # nested (overlapping) regions, not one-hot
    image = torch.randn(2, 2, 16, 16)
    with pytest.raises(ValueError, match="mutually exclusive"):
        _model(ARCH_2D, (16, 16), classes=2).training_loss(image, regions)
    m = _model(ARCH_2D, (16, 16), classes=2, multiclass="per_channel")
    assert m.probabilities == "per_channel" and LDSeg.probabilities == "categorical"
    terms = m.training_loss(image, regions, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    z_l, z_i = m.encode_label(regions), m.encode_image(image)
    t = torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(z_l.shape, generator=g)
    z_t = m.process.q_sample(z_l, t, eps)
    logits = m.decode(m.estimate_x0(m.predict_noise(z_t, z_i, t), z_t, t))
    p = torch.sigmoid(logits)
    bce = -(regions * torch.log(p) + (1 - regions) * torch.log(1 - p)).mean()
    torch.testing.assert_close(terms["ce"], bce, rtol=1e-4, atol=1e-5)
    probs = m.sample(image, 2, 2, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (2, 2, 16, 16) and not torch.allclose(probs.sum(1), torch.ones(2, 16, 16))


# -- sampling (Algorithm 2 with DDIM) -------------------------------------------------------------------------------
def test_sample_mean_and_std_over_independent_chains(arch, spatial):
    m = _model(arch, spatial)
    image = torch.randn(2, 2, *spatial, generator=torch.Generator().manual_seed(5))
    probs, unc = m.sample(image, steps=2, samples=3, generator=torch.Generator().manual_seed(1), chunk=2,
                          return_uncertainty=True, uncertainty="std")
    # by hand: all S initial latents drawn first, each chain: eps -> clipped x0 -> DDIM step, decode, softmax
    z_i = m.encode_image(image)
    noise = torch.randn((2, 3, *z_i.shape[1:]), generator=torch.Generator().manual_seed(1))
    chains = []
    for k in range(3):
        z = noise[:, k]
        for t, t_prev in ((999, 0), (0, -1)):
            tt = torch.full((2,), t)
            eps = m.denoiser(torch.cat([z, z_i], 1), tt)
            ab, ab_prev = m.process.alpha_bar(t), m.process.alpha_bar(t_prev)
            x0 = ((z - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-5, 5)
            z = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * (z - ab.sqrt() * x0) / (1 - ab).sqrt()
        chains.append(torch.softmax(m.label_decoder(z), 1))
    chains = torch.stack(chains)
    torch.testing.assert_close(probs, chains.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unc, chains.std(0, unbiased=False).mean(1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert probs.shape == (2, 3, *spatial) and unc.shape == (2, 1, *spatial)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *spatial))


def test_chunking_does_not_change_the_samples(arch, spatial):
    m = _model(arch, spatial)
    image = torch.randn(1, 2, *spatial)
    ref = m.sample(image, 2, 4, generator=torch.Generator().manual_seed(7), chunk=4, return_uncertainty=True)
    for chunk in (1, 3):
        got = m.sample(image, 2, 4, generator=torch.Generator().manual_seed(7), chunk=chunk, return_uncertainty=True)
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])


def test_image_encoder_runs_once_per_window(arch, spatial):
    m = _model(arch, spatial)
    calls = []
    m.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    _, unc = m.sample(torch.randn(1, 2, *spatial), steps=4, samples=3, chunk=2, return_uncertainty=True)
    assert len(calls) == 1
    one = m.sample(torch.randn(1, 2, *spatial), 2, 1, return_uncertainty=True, uncertainty="std")[1]
    assert torch.count_nonzero(one) == 0  # no spread from one chain


#: pinned outputs of the sampler test below: the paper's latent-only decoder and the recipe's image skips
REGRESSION = {False: [0.3889, 0.3578, 0.0704], True: [0.4251, 0.28, 0.0153]}


@pytest.mark.parametrize("image_skips", [False, True], ids=["latent_only", "image_skips"])
def test_sampler_seeded_regression(image_skips):
    """Pinned output of the 2-step DDIM sampler with 3 chains (guards process, clipping, decoder with or without
    the skip path, aggregation)."""
    from tests.conftest import ARCH_2D
    m = _model(ARCH_2D, (16, 16), channels=1, classes=3, image_skips=image_skips)
    x = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    probs, unc = m.sample(x, steps=2, samples=3, generator=torch.Generator().manual_seed(0),
                          return_uncertainty=True, uncertainty="std")
    got = [probs[0, 0, 3, 5].item(), probs[0, 2, 12, 9].item(), unc.mean().item()]
    assert got == pytest.approx(REGRESSION[image_skips], abs=2e-4)  # pinned to 4 decimals


# -- image skips into the label decoder (the recipe; documentation/ldseg.md, "Image skips") -------------------------
def test_image_skips_feed_every_decoder_stage_the_encoders_output(arch, spatial):
    m = _model(arch, spatial, image_skips=True)
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    z_i, skips = m.condition(image)
    features = arch["features_per_stage"]
    assert [f.shape[1] for f in skips] == features and skips[0].shape[2:] == spatial  # stage 0 has stride 1
    # the first decoder stage (the deepest) takes the latent's C_l = 4 channels plus that stage's image features
    first = m.label_decoder.blocks[0].blocks[0].conv1.conv
    assert first.in_channels == 4 + features[-1]
    z = m.encode_label(x0)
    logits = m.decode(z, skips)
    assert logits.shape == (2, 3, *spatial)
    other = m.condition(torch.randn(2, 2, *spatial))[1]
    assert not torch.allclose(m.decode(z, other), logits)  # the image reaches the decoder beside the latent
    with pytest.raises(ValueError, match="image_skips"):
        m.decode(z)
    plain = _model(arch, spatial)
    assert plain.condition(image)[1] is None and plain.label_decoder.blocks[0].blocks[0].conv1.conv.in_channels == 4


def test_image_skips_sample_training_and_plain_forward(arch, spatial):
    m = _model(arch, spatial, image_skips=True, prediction="x0", loss_weights={"autoencoder": 1.0})
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    calls = []
    m.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    ref = m.sample(image, 2, 3, generator=torch.Generator().manual_seed(1), chunk=3, return_uncertainty=True)
    got = m.sample(image, 2, 3, generator=torch.Generator().manual_seed(1), chunk=1, return_uncertainty=True)
    assert len(calls) == 2  # once per call, not per chain
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert ref[0].shape == (2, 3, *spatial) and m(image).shape == (2, 3, *spatial)
    out = m.train().training_loss(image, x0, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and "autoencoder" in out
    assert m.image_encoder.stages[0][0].blocks[0].conv1.conv.weight.grad.abs().sum() > 0


def test_default_recipe_trains_every_parameter():
    """The recipe's joint training reaches all four networks (label encoder through z_t and the MSE target): no
    parameter without a gradient, which DistributedDataParallel (find_unused_parameters False) requires."""
    plan = {"patch_size": [32, 32], "architecture": {"arch_kwargs": ARCH_2D_TINY}}
    settings = LDSeg.configure_plans({k: v for k, v in DEFAULT_DIFFUSION["ldseg"].items() if k != "paper_recipe"},
                                     plan)
    m = LDSeg(ARCH_2D_TINY, 1, 3, settings).train()
    out = m.training_loss(torch.randn(2, 1, 32, 32), _onehot((32, 32)), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing and not LDSeg.ddp_find_unused_parameters


# -- CLIs end to end -------------------------------------------------------------------------------------------------
IDS = STANDARD_IDS
NAMES = dataset_names(IDS)


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    # a cheap sampling keeps the final validation fast on CPU
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet_ldseg"), "LDSegPlans", samples_per_step=2)


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_cli_plan_train_predict(env, dim, tmp_path):
    import json
    import os

    import numpy as np
    import SimpleITK as sitk

    from diffnnunet.cli import predict, train
    plans = json.load(open(os.path.join(env["nnUNet_preprocessed"], NAMES[dim], "LDSegPlans.json")))
    cfg = plans["configurations"][CONFIG[dim]]
    section = cfg["diffusion"]
    assert section["method"] == "ldseg" and section["sampling_steps"] == 2
    assert section["multiclass"] == "categorical"  # resolved from dataset.json: exclusive labels -> softmax
    assert section["latent_strides"] == latent_layout(cfg["architecture"]["arch_kwargs"], cfg["patch_size"],
                                                      section["latent_downsampling"], section["min_latent_size"])[0]
    factor = total_stride(section["latent_strides"])
    assert all(p % f == 0 and p // f >= 2 for p, f in zip(cfg["patch_size"], factor))
    train.main([str(IDS[dim]), "LDSegTrainer", "0", "-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--no-tune"])
    fold = os.path.join(env["nnUNet_results"], NAMES[dim], f"LDSegTrainer__LDSegPlans__{CONFIG[dim]}", "fold_0")
    for f in ("checkpoint_final.pth", "validation/summary.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    out = str(tmp_path / "pred")
    images = os.path.join(env["nnUNet_raw"], NAMES[dim], "imagesTs")
    predict.main(["-i", images, "-o", out, "-d", str(IDS[dim]), "-tr", "LDSegTrainer", "-f", "0", "-device", "cpu",
                  "-npp", "0", "--save_uncertainty", "--save_probabilities", "--samples", "3", "--uncertainty", "std"])
    for case in sorted({f[:-12] for f in os.listdir(images)}):
        src = sitk.ReadImage(os.path.join(images, case + "_0000.nii.gz"))
        for path in (os.path.join(out, case + ".nii.gz"), os.path.join(out, case + "_uncertainty.nii.gz")):
            img = sitk.ReadImage(path)
            assert img.GetSize() == src.GetSize()
            for a, b in ((img.GetSpacing(), src.GetSpacing()), (img.GetOrigin(), src.GetOrigin()),
                         (img.GetDirection(), src.GetDirection())):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, case + ".nii.gz")))
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
        unc = sitk.ReadImage(os.path.join(out, case + "_uncertainty.nii.gz"))
        arr = sitk.GetArrayFromImage(unc)
        assert unc.GetPixelID() == sitk.sitkFloat32 and arr.min() >= 0 and arr.max() <= 0.5 + 1e-3  # a std of p
        assert arr.max() > 0  # three chains of an untrained model disagree somewhere
        probs = np.load(os.path.join(out, case + ".npz"))["probabilities"]
        assert probs.shape[0] == 3
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-3)


# -- recipe switches (documentation/ldseg.md, "Why LDSeg lagged") ----------------------------------------------------
def _cosine_alpha_bar(t: int, T: int = 1000, s: float = 0.008) -> float:
    """abar_t of Nichol & Dhariwal's cosine schedule with betas clipped at 0.999 (only the last one is)."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    out = 1.0
    for i in range(t + 1):
        out *= 1 - min(1 - f(i + 1) / f(i), 0.999)
    return out


def test_x0_gain_at_the_last_step_eps_vs_x0_prediction(arch, spatial):
    """eps-prediction turns an output error delta into an x0 error delta * sqrt(1-abar)/sqrt(abar) (~2e4 at
    t = 999); x0-prediction passes it through with gain 1."""
    z_t = torch.zeros(1, 4, *[2] * len(spatial))
    delta = torch.full_like(z_t, 1e-4)
    t = torch.tensor([999])
    ab = _cosine_alpha_bar(999)
    gain = math.sqrt(1 - ab) / math.sqrt(ab)
    assert 1.5e4 < gain < 3e4
    eps_model, x0_model = _model(arch, spatial), _model(arch, spatial, prediction="x0")
    assert eps_model.estimate_x0(delta, z_t, t).abs().max().item() == pytest.approx(min(gain * 1e-4, 5.0), rel=1e-3)
    torch.testing.assert_close(x0_model.estimate_x0(delta, z_t, t), delta)
    with pytest.raises(ValueError, match="prediction 'v'"):
        _model(arch, spatial, prediction="v")


@pytest.mark.parametrize("variant", ["paper", "x0"])
def test_training_loss_with_x0_prediction(arch, spatial, variant):
    m = _model(arch, spatial, prediction="x0", denoised_latent=variant,
               loss_weights={"ce": 1.0, "dice": 2.0, "mse": 1.0, "autoencoder": 0.5})
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    terms = m.training_loss(image, x0, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    z_l, z_i = m.encode_label(x0), m.encode_image(image)
    t = torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(z_l.shape, generator=g)
    ab = torch.tensor([_cosine_alpha_bar(int(v)) for v in t]).float().reshape(2, *[1] * (z_l.ndim - 1))
    z_t = ab.sqrt() * z_l + (1 - ab).sqrt() * eps  # Eq. 11
    x0_hat = m.denoiser(torch.cat([z_t, z_i], 1), t)  # the denoiser outputs the clean latent
    eps_hat = (z_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    z_dn = z_t - eps_hat if variant == "paper" else x0_hat.clamp(-5, 5)

    def seg(logits):
        p = torch.softmax(logits, 1)
        axes = [0] + list(range(2, p.ndim))
        return (-(x0 * torch.log(p)).sum(1).mean()
                + 2 * (1 - (2 * (p * x0).sum(axes) / (p.sum(axes) + x0.sum(axes))).mean()))

    mse = ((x0_hat - z_l) ** 2).mean()  # Eq. 17 with the clean latent as the target
    ae = seg(m.label_decoder(z_l))  # the auxiliary term: decode the clean label latent
    ref = seg(m.label_decoder(z_dn)) + mse + 0.5 * ae
    for key, value in (("mse", mse), ("autoencoder", ae), ("loss", ref)):
        torch.testing.assert_close(terms[key], value, rtol=2e-4, atol=1e-4, msg=key)
    assert "autoencoder" not in _model(arch, spatial).training_loss(image, x0)  # off by default (the paper)


def test_latent_norm_variants(arch, spatial):
    x0 = _onehot(spatial, batch=3)
    batch = _model(arch, spatial, latent_norm="batch").train()
    z = batch.encode_label(x0)
    axes = [0] + list(range(2, z.ndim))
    torch.testing.assert_close(z.mean(axes), torch.zeros(4), atol=1e-5, rtol=0)  # over batch and positions
    torch.testing.assert_close(z.var(axes, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    raw = _model(arch, spatial, latent_norm="none")
    torch.testing.assert_close(raw.encode_label(x0), raw.label_encoder.out(raw.label_encoder.stages(x0)))
    with pytest.raises(ValueError, match="latent_norm 'tanh'"):
        _model(arch, spatial, latent_norm="tanh")


def test_latent_downsampling_key_sets_the_latent_size():
    plan = {"patch_size": [32, 256, 256], "architecture": {"arch_kwargs": NNUNET_3D_ANISO}}
    settings = LDSeg.configure_plans(dict(DEFAULT_DIFFUSION["ldseg"], latent_downsampling=4), plan)
    assert total_stride(settings["latent_strides"]) == [2, 4, 4] and settings["latent_size"] == [16, 64, 64]


def test_min_latent_size_key_keeps_small_patches_from_collapsing_to_a_few_latent_cells():
    recipe = dict(DEFAULT_DIFFUSION["ldseg"])
    small = LDSeg.configure_plans(dict(recipe), {"patch_size": [80, 80], "architecture": {"arch_kwargs": NNUNET_2D}})
    assert total_stride(small["latent_strides"]) == [4, 4] and small["latent_size"] == [20, 20]  # 8x would leave 10
    paper = LDSeg.configure_plans(dict(recipe, min_latent_size=2),
                                  {"patch_size": [80, 80], "architecture": {"arch_kwargs": NNUNET_2D}})
    assert paper["latent_size"] == [5, 5]
    big = LDSeg.configure_plans(dict(recipe), {"patch_size": [256, 256], "architecture": {"arch_kwargs": NNUNET_2D}})
    assert big["latent_size"] == [16, 16]  # large patches keep the paper's 16x


# -- recipe "paper": Eq. 12 and the 1-channel latent ------------------------------------------------------------------
def test_paper_eq12_decodes_z_t_minus_eps_hat_unclamped_with_a_one_channel_latent(arch, spatial):
    """Eq. 12, z_dn = z_l(t) - f_denoiser(z_l(t), z_i, t), on a stub output: no clip (values far beyond x0_clip pass)
    and the segmentation gradient reaches eps_hat at t = T - 1, where the clipped x0 estimate passes none."""
    paper = _model(arch, spatial, prediction="eps", denoised_latent="paper", latent_channels=1)
    z_t = torch.tensor([-40.0, -1.0, 0.5, 60.0]).reshape(1, 1, 2, 2)
    eps_hat = torch.tensor([3.0, -2.0, 0.25, -7.0]).reshape(1, 1, 2, 2).requires_grad_()
    t = torch.tensor([paper.process.timesteps - 1])
    z_dn = paper.denoise(z_t, eps_hat, t)
    torch.testing.assert_close(z_dn, torch.tensor([-43.0, 1.0, 0.25, 67.0]).reshape(1, 1, 2, 2))
    z_dn.sum().backward()
    torch.testing.assert_close(eps_hat.grad, -torch.ones_like(eps_hat))  # d(z_t - eps_hat)/d eps_hat = -1
    paper.denoised_latent, eps_hat.grad = "x0", None  # the recipe's form: the x0 estimate, clipped to +-5
    paper.denoise(z_t, eps_hat, t).sum().backward()  # x0 = (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar): clamped
    assert eps_hat.grad.abs().max() == 0
    paper.denoised_latent = "paper"
    # the paper's denoiser input has two channels: a 1-channel latent next to a 1-channel image embedding
    x0 = _onehot(spatial)
    assert paper.denoiser.encoder.stages[0].first.convs[0].conv.in_channels == 2
    image = torch.randn(2, 2, *spatial, generator=torch.Generator().manual_seed(9))
    seen = []
    paper.label_decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    tt = torch.tensor([paper.process.timesteps - 1, 500])
    with torch.no_grad():
        z_l = paper.encode_label(x0)
        assert z_l.shape[1] == 1
        noise = torch.randn(z_l.shape, generator=torch.Generator().manual_seed(3))
        paper.training_loss(image, x0, t=tt, noise=noise)
        z_tt = paper.process.q_sample(z_l, tt, noise)
        expected = z_tt - paper.predict_noise(z_tt, paper.encode_image(image), tt)  # Algorithm 1, line 8
    torch.testing.assert_close(seen[-1], expected)
