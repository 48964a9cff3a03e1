"""MedSegDiff-V2: U-SA against Eqs. 4-5 by hand, the NBP-Filter and SS-Former (2D and 3D), STAPLE against SimpleITK,
the anchor loss of Eq. 3, the DDIM + STAPLE sampler (hand check and seeded regression), the planner's memory
proxy against nnU-Net's budget rule, and the CLIs end to end on tiny 2D and 3D multi-class data."""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from diffnnunet.config import DEFAULT_DIFFUSION
from diffnnunet.methods import MedSegDiffV2, encode_target
from diffnnunet.methods.medsegdiff_v2 import USA
from diffnnunet.methods.staple import staple, staple_fuse
from diffnnunet.networks import TimeEmbedding
from diffnnunet.networks.ss_former import NBPFilter, SpectralCrossAttention, SSFormer, token_grid
from diffnnunet.trainers import default_plans_for
from tests.helpers import CONFIG, STANDARD_IDS, dataset_names, image_geometry, module_cli_env


def _model(arch, channels=2, classes=3, **diffusion):
    torch.manual_seed(0)
    return MedSegDiffV2(arch, channels, classes, {**DEFAULT_DIFFUSION["medsegdiff_v2"], **diffusion}).eval()


def _onehot(spatial, classes=3, batch=2, seed=0):
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=torch.Generator().manual_seed(seed))
    return encode_target(labels.float(), classes, has_regions=False, ignore_label=None)[0]


def test_trainer_plans_build_a_working_medsegdiff_v2(arch, spatial):
    """MedSegDiffV2Trainer's default plans are the plans file of the method it trains; a configuration whose
    diffusion section names that method builds, through the one builder training and inference share, a
    MedSegDiffV2 that samples M = 2 image channels into N = 3 label channels."""
    from types import SimpleNamespace

    from diffnnunet.methods import build_method
    from diffnnunet.trainers import get_trainer_class
    trainer = get_trainer_class("MedSegDiffV2Trainer")
    plans = SimpleNamespace(plans_name=default_plans_for(trainer))
    config = SimpleNamespace(configuration={"diffusion": {"method": trainer.method_name, "timesteps": 10}},
                             network_arch_init_kwargs=arch)
    net = build_method(plans, config, 2, 3).eval()
    assert isinstance(net, MedSegDiffV2) and net.plans_name == plans.plans_name
    probs = net.sample(torch.randn(1, 2, *spatial), 1, 1, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (1, 3, *spatial)


# -- U-SA ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_usa_is_eqs_4_and_5_by_hand(dim):
    """f_c: channel 0 a unit impulse, channel 1 constant -1; sigma = 1, a 5-wide kernel per in-plane axis (3D: the
    first axis has a 1-wide kernel, as for nnU-Net's in-plane-only first stage); 1x1 conv weights (0.7, -0.3), bias
    0.1. Then k_Gauss(dx, dy) = exp(-(dx^2 + dy^2) / 2) / Z, f_anc0 = max(k, impulse), f_anc1 = -1 inside, and
    f_d' = sigmoid(0.7 f_anc0 + 0.3 + 0.1) f_d + f_d."""
    spatial = (12, 12) if dim == 2 else (3, 12, 12)
    size = [5, 5] if dim == 2 else [1, 5, 5]
    usa = USA(2, dim, size)
    with torch.no_grad():
        usa.smooth.log_sigma.zero_()
        usa.proj.weight.copy_(torch.tensor([0.7, -0.3]).reshape(1, 2, *([1] * dim)))
        usa.proj.bias.fill_(0.1)
    centre = tuple(s // 2 for s in spatial)
    f_c = torch.zeros(1, 2, *spatial)
    f_c[(0, 0) + centre] = 1.0
    f_c[:, 1] = -1.0
    f_d = torch.randn(1, 3, *spatial, generator=torch.Generator().manual_seed(0))
    got = usa(f_c, f_d)
    z = sum(math.exp(-x * x / 2) for x in range(-2, 3)) ** 2
    expected_anc0 = np.zeros(spatial)
    for dx in range(-2, 3):
        for dy in range(-2, 3):
            idx = centre[:-2] + (centre[-2] + dx, centre[-1] + dy)
            expected_anc0[idx] = math.exp(-(dx * dx + dy * dy) / 2) / z
    expected_anc0[centre] = 1.0  # max(k(0, 0) = 0.16, impulse 1)
    gate = 1 / (1 + np.exp(-(0.7 * expected_anc0 + 0.3 + 0.1)))
    expected = gate[None, None] * f_d.numpy() + f_d.numpy()
    inner = (..., slice(2, -2), slice(2, -2))  # channel 1's smoothing sees the zero padding near the border
    np.testing.assert_allclose(got.detach().numpy()[inner], expected[inner], rtol=1e-5, atol=1e-6)


# -- NBP-Filter and SS-Former ----------------------------------------------------------------------------------------
def test_nbp_filter_in_unit_interval_and_depends_on_t():
    torch.manual_seed(0)
    temb = TimeEmbedding(16)
    nbp = NBPFilter(2, 16, width=8, blocks=6)
    out = nbp((3, 4), temb(torch.tensor([0, 500, 999])))
    assert out.shape == (3, 12, 12)
    assert out.min() > 0 and out.max() < 1
    assert (out[0] - out[2]).abs().max() > 1e-4 and (out[1] - out[2]).abs().max() > 1e-4
    with torch.no_grad():  # the timestep enters only through the per-block scale and shift
        for film in nbp.film:
            film[-1].weight.zero_()
    flat = nbp((3, 4), temb(torch.tensor([0, 999])))
    torch.testing.assert_close(flat[0], flat[1])


def test_pass_all_spectral_affinity_is_the_spatial_one():
    """With no filter (or a filter of ones) A = Re(F^H M F) = (q W^q)(k W^k)^T / sqrt(d) exactly."""
    torch.manual_seed(0)
    attn = SpectralCrossAttention(8, 3, 16, nbp_filter=False)
    q, k = torch.randn(2, 2 * 3 * 2, 8), torch.randn(2, 12, 8)
    got = attn.affinity(q, k, (2, 3, 2), None)
    expected = (q @ attn.wq.weight.T) @ (k @ attn.wk.weight.T).transpose(1, 2) / math.sqrt(8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_ss_former_shapes_and_token_pooling(dim):
    torch.manual_seed(0)
    spatial = (6, 10) if dim == 2 else (3, 4, 6)
    ss = SSFormer(8, dim, 16, blocks=2, max_tokens=16)
    torch.nn.init.normal_(ss.out.weight)  # zero-initialised: make the update visible
    e, c = torch.randn(2, 8, *spatial), torch.randn(2, 8, *spatial)
    out = ss(e, c, torch.randn(2, 16))
    assert out.shape == e.shape and not torch.allclose(out, e)
    assert math.prod(token_grid(spatial, 16)) <= 16
    assert token_grid((4, 4), 16) == [4, 4] and token_grid((3, 4, 6), 16) == [2, 2, 3]


# -- STAPLE ----------------------------------------------------------------------------------------------------------
def test_staple_matches_simpleitk():
    g = torch.Generator().manual_seed(0)
    truth = (torch.rand(3, 12, 14, generator=g) < 0.4).float()
    raters = [(truth + (torch.rand(3, 12, 14, generator=g) < flip).float()) % 2 for flip in (0.05, 0.1, 0.3)]
    decisions = torch.stack(raters)  # (S, *spatial)
    w, p, q = staple(decisions.reshape(1, 3, -1), max_iterations=200, tolerance=1e-12)
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    ref = f.Execute([sitk.GetImageFromArray(r.numpy().astype(np.uint8)) for r in raters])
    np.testing.assert_allclose(w.reshape(3, 12, 14).numpy(), sitk.GetArrayFromImage(ref), atol=1e-4)
    np.testing.assert_allclose(p[0].numpy(), f.GetSensitivity(), atol=1e-4)
    np.testing.assert_allclose(q[0].numpy(), f.GetSpecificity(), atol=1e-4)
    # batched per window and channel: (B, S, C, *sp); the second channel is the first one inverted
    both = torch.stack([decisions, 1 - decisions], 1)[None].repeat(2, 1, 1, 1, 1, 1)
    fused = staple_fuse(both, max_iterations=200, tolerance=1e-12)
    assert fused.shape == (2, 2, 3, 12, 14)
    torch.testing.assert_close(fused[1, 0], w.reshape(3, 12, 14).float(), atol=1e-4, rtol=0)


# -- loss and sampler ------------------------------------------------------------------------------------------------
def test_anchor_loss_only_where_t_is_on_the_alpha_grid(arch, spatial):
    """Eq. 3: L = MSE(eps, eps_theta) + (1/B) sum_b [t_b % 5 == 0] (Dice + 10 CE) of the Condition Model."""
    m = _model(arch, prediction="eps").train()
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    noise = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1))
    seen = {}
    m.condition.register_forward_hook(lambda mod, inp, out: seen.update(logits=out[0]))
    m.diffusion.register_forward_hook(lambda mod, inp, out: seen.update(eps=out))
    off = m.training_loss(image, x0, t=torch.tensor([3, 7]), noise=noise)
    torch.testing.assert_close(off["loss"], ((seen["eps"] - noise) ** 2).mean())
    on = m.training_loss(image, x0, t=torch.tensor([10, 7]), noise=noise)
    probs, target = torch.softmax(seen["logits"][:1], 1), x0[:1]
    axes = [0] + list(range(2, probs.ndim))
    dice = 1 - ((2 * (probs * target).sum(axes) + 1e-5) / (probs.sum(axes) + target.sum(axes) + 1e-5)).mean()
    ce = -(target * torch.log_softmax(seen["logits"][:1], 1)).sum(1).mean()
    mse = ((seen["eps"] - noise) ** 2).mean()
    torch.testing.assert_close(on["loss"], mse + 0.5 * (dice + 10 * ce), rtol=1e-5, atol=1e-6)
    on["loss"].backward()
    assert all(p.grad is not None for p in m.condition.parameters())
    assert m(image).shape == (2, 3, *spatial)  # nnU-Net's bare network(x): the anchor logits


def test_one_step_sample_by_hand(arch, spatial):
    """1 step, 1 sample, fusion 'mean': p = (clip(x0_hat, -1, 1) + 1) / 2 with x0_hat = (x_T - sqrt(1 - abar)
    eps_theta) / sqrt(abar) at t = 999 of DDPM's linear schedule; STAPLE of one sample returns its decision."""
    m = _model(arch, fusion="mean", u_sa=False, prediction="eps", anchor_weight=0.0)
    image = torch.randn(1, 2, *spatial)
    x_t = torch.randn((1, 3, *spatial), generator=torch.Generator().manual_seed(3))
    abar = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    eps = m(image, x_t, torch.tensor([999]))
    expected = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1) / 2 + 0.5
    got = m.sample(image, steps=1, samples=1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    m.fusion = "staple"
    fused = m.sample(image, steps=1, samples=1, generator=torch.Generator().manual_seed(3))
    onehot = F.one_hot(expected.argmax(1), 3).movedim(-1, 1).float()
    torch.testing.assert_close(fused, onehot, atol=1e-3, rtol=0)


def test_x0_prediction_loss_and_two_step_sample_by_hand(arch, spatial):
    """The default recipe's x0-prediction: L_n = ||(2 x0 - 1) - x0_theta||^2 off the anchor grid; two DDIM steps
    (t = 999 -> 0 -> x_0) by hand: x_0' = sqrt(abar_0) x0_hat + sqrt(1 - abar_0) (x_T - sqrt(abar_999) x0_hat) /
    sqrt(1 - abar_999), then p = (clip(x0_theta(x_0', 0), -1, 1) + 1) / 2."""
    m = _model(arch, fusion="mean", prediction="x0", anchor_weight=0.0)
    image, x0 = torch.randn(2, 2, *spatial), _onehot(spatial)
    noise = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1))
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t = torch.tensor([3, 999])
    x_t = torch.stack([math.sqrt(abar[k]) * (2 * x0[i] - 1) + math.sqrt(1 - abar[k]) * noise[i]
                       for i, k in enumerate(t.tolist())])
    out = m(image, x_t, t)
    loss = m.training_loss(image, x0, t=t, noise=noise)["loss"]
    torch.testing.assert_close(loss, ((out - (2 * x0 - 1)) ** 2).mean(), rtol=1e-5, atol=1e-6)
    image = image[:1]
    x_T = torch.randn((1, 3, *spatial), generator=torch.Generator().manual_seed(3))
    x0_hat = m(image, x_T, torch.tensor([999])).clamp(-1, 1)
    eps_hat = (x_T - math.sqrt(abar[999]) * x0_hat) / math.sqrt(1 - abar[999])
    x_1 = math.sqrt(abar[0]) * x0_hat + math.sqrt(1 - abar[0]) * eps_hat
    expected = (m(image, x_1, torch.tensor([0])).clamp(-1, 1) + 1) / 2
    got = m.sample(image, steps=2, samples=1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_seeded_sampler_regression(arch, spatial, dim):
    """Pinned numbers of DDIM 3 steps x 3 samples + STAPLE, then + the mean (the default fusion), and the chains'
    uncertainty map (the SS-Former's zero-initialised output projection is filled so that its path is pinned too);
    the paper's eps-prediction. The default output then mixes the pinned mean with the anchor: (1 - w) mean +
    w softmax(anchor logits), w = 1/2, the anchor logits being the bare ``network(x)``."""
    m = _model(arch, prediction="eps", fusion="staple", anchor_weight=0.0)
    with torch.no_grad():
        m.ss_former.out.weight.copy_(torch.randn(m.ss_former.out.weight.shape,
                                                 generator=torch.Generator().manual_seed(7)))
    image = torch.linspace(-1, 1, 2 * math.prod(spatial)).reshape(1, 2, *spatial)
    probs, unc = m.sample(image, steps=3, samples=3, chunk=2, generator=torch.Generator().manual_seed(42),
                          return_uncertainty=True)
    assert probs.shape == (1, 3, *spatial) and unc.shape == (1, 1, *spatial)
    assert probs.min() >= 0 and probs.max() <= 1 and unc.min() >= 0 and unc.max() <= 1
    got = [float(v) for v in (probs[0, 0].mean(), probs[0, 1].mean(), unc.mean())]
    assert got == pytest.approx(REGRESSION[dim], abs=2e-4)  # pinned to 4 decimals
    # the default fusion (mean p of the same seeded chains): same map, other probabilities
    m.fusion = "mean"
    probs, unc_mean = m.sample(image, steps=3, samples=3, chunk=2, generator=torch.Generator().manual_seed(42),
                               return_uncertainty=True)
    torch.testing.assert_close(unc_mean, unc)
    got = [float(v) for v in (probs[0, 0].mean(), probs[0, 1].mean())]
    assert got == pytest.approx(REGRESSION_MEAN[dim], abs=2e-4)
    m.anchor_weight = 0.5
    mixed = m.sample(image, steps=3, samples=3, chunk=2, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(mixed, 0.5 * probs + 0.5 * torch.softmax(m(image), 1), atol=1e-6, rtol=0)


REGRESSION = {2: [0.5625, 0.233, 0.8202], 3: [0.5576, 0.2383, 0.795]}
REGRESSION_MEAN = {2: [0.5397, 0.4966], 3: [0.3738, 0.3685]}


def test_x0_through_a_sigmoid_by_hand(arch, spatial):
    """``x0_output: sigmoid`` (the default plans): x0_theta = 2 sigmoid(z) - 1. With the U-Net's 1x1 head zeroed and
    its bias set to z = ln 3 for channel 0 and -ln 3 for the others, sigmoid(z) = 3/4 and 1/4: x0_theta = 1/2 and
    -1/2 at every voxel, whatever the input. ``linear`` returns z itself; eps-prediction ignores the key; an unknown
    value is refused."""
    m = _model(arch, prediction="x0")
    assert m.x0_output == "sigmoid"
    with torch.no_grad():
        m.diffusion.head.weight.zero_()
        m.diffusion.head.bias.copy_(torch.tensor([math.log(3), -math.log(3), -math.log(3)]))
    image, x_t = torch.randn(2, 2, *spatial), 5 * torch.randn(2, 3, *spatial)
    out = m(image, x_t, torch.tensor([0, 999]))
    expected = torch.tensor([0.5, -0.5, -0.5]).reshape(1, 3, *([1] * len(spatial))).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    for kind, prediction in (("linear", "x0"), ("sigmoid", "eps")):
        m.x0_output, m.process.prediction = kind, prediction
        torch.testing.assert_close(m(image, x_t, torch.tensor([0, 999]))[:, 0], torch.full_like(out[:, 0], math.log(3)))
    with pytest.raises(ValueError, match="x0_output 'tanh'"):
        _model(arch, x0_output="tanh")


def test_chains_map_by_hand(arch, spatial):
    """The map is the S chains'. Both U-Nets' 1x1 heads zeroed; the Diffusion Model's bias z = (ln 4, -ln 4) gives
    x0_theta = 2 sigmoid(z) - 1 = (0.6, -0.6) at every step, so every chain ends at p = (0.8, 0.2). Exclusive
    labels, S = 2: chain class probabilities from the odds 4 and 1/4, (16/17, 1/17); the chains agree: entropy
    h(16/17) = 0.322757 bits, mutual information 0. Regions: mean binary entropy of (0.8, 0.2), h(0.8) = 0.721928.
    The chains' mean p is 0.8 on channel 0 and STAPLE of two agreeing decisions is 1; the Condition Model's head is
    zeroed too, so its anchor probabilities are 1/2 (softmax of equal logits; sigmoid(0) for regions) and the
    default output (anchor_weight 1/2) is (0.8 + 0.5) / 2 = 0.65 and (1 + 0.5) / 2 = 0.75; without the anchor 0.8
    and 1. An anchor_weight outside [0, 1] is refused."""
    m = _model(arch, classes=2, prediction="x0")
    with torch.no_grad():
        m.diffusion.head.weight.zero_()
        m.diffusion.head.bias.copy_(torch.tensor([math.log(4), -math.log(4)]))
        m.condition.head.weight.zero_()
        m.condition.head.bias.zero_()
    image = torch.randn(1, 2, *spatial)
    for measure, expected in (("entropy", 0.322757), ("mutual_information", 0.0)):
        seg, unc = m.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(0),
                            return_uncertainty=True, uncertainty=measure)
        torch.testing.assert_close(unc, torch.full_like(unc, expected), atol=2e-6, rtol=0)
        torch.testing.assert_close(seg[:, 0], torch.full_like(seg[:, 0], 0.65), atol=1e-5, rtol=0)
    m.fusion = "staple"
    seg = m.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seg[:, 0], torch.full_like(seg[:, 0], 0.75), atol=1e-3, rtol=0)
    m.anchor_weight = 0.0
    seg = m.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seg[:, 0], torch.ones_like(seg[:, 0]), atol=1e-3, rtol=0)
    m.fusion = "mean"
    seg = m.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seg[:, 0], torch.full_like(seg[:, 0], 0.8), atol=1e-5, rtol=0)
    m.multiclass, m.anchor_weight = "per_channel", 0.5
    seg = m.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seg[:, 0], torch.full_like(seg[:, 0], 0.65), atol=1e-5, rtol=0)
    unc = m.sample(image, steps=1, samples=2, return_uncertainty=True, uncertainty="entropy")[1]
    torch.testing.assert_close(unc, torch.full_like(unc, 0.721928), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="anchor_weight 1.5 is not in"):
        _model(arch, anchor_weight=1.5)


def test_ablation_switches_remove_the_parts(arch):
    m = _model(arch, u_sa=False, ss_former=False)
    assert m.u_sa is None and m.ss_former is None
    m = _model(arch, nbp_filter=False)
    assert all(a.filter is None for a in m.ss_former.to_semantic)


# -- planner and CLIs end to end -------------------------------------------------------------------------------------
IDS = STANDARD_IDS
NAMES = dataset_names(IDS)


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet_medsegdiff_v2"), "MedSegDiffV2Plans",
                              sampling_steps=2, samples_per_step=2)


def test_planned_patch_and_batch_fit_the_memory_budget(env):
    """A fingerprint of large volumes: the planner shrinks the patch until nnU-Net's budget rule holds for the
    method's proxy (both U-Nets, U-SA, SS-Former), i.e. proxy(patch) x (batch - 1/2) <= reference x ref_bs (the
    batch size is round(reference / proxy x ref_bs), at least 2)."""
    from diffnnunet.networks import TimeUNet, resolve_arch_kwargs
    from diffnnunet.planners import DiffusionPlanner
    planner = DiffusionPlanner(NAMES[3], 4, plans_name="MedSegDiffV2BudgetPlans", method="medsegdiff_v2")
    fingerprint = planner.dataset_fingerprint
    fingerprint["shapes_after_crop"] = [[120, 300, 280]] * len(fingerprint["shapes_after_crop"])
    fingerprint["spacings"] = [[1.0, 1.0, 1.0]] * len(fingerprint["spacings"])
    plans = planner.plan_experiment()
    for name in ("2d", "3d_fullres"):
        cfg = plans["configurations"][name]
        arch = resolve_arch_kwargs(cfg["architecture"]["arch_kwargs"])
        patch = cfg["patch_size"]
        proxy = MedSegDiffV2.feature_map_size(arch, 2, 3, patch)
        three_d = len(patch) == 3
        reference = ((planner.UNet_reference_val_3d if three_d else planner.UNet_reference_val_2d)
                     * 4 / planner.UNet_reference_val_corresp_GB)
        ref_bs = planner.UNet_reference_val_corresp_bs_3d if three_d else planner.UNet_reference_val_corresp_bs_2d
        assert proxy * (cfg["batch_size"] - 0.5) <= reference * ref_bs, name
        assert cfg["diffusion"]["method"] == "medsegdiff_v2" and cfg["diffusion"]["multiclass"] == "categorical"
        # the proxy counts the second U-Net and the attention on top of the Diffusion Model
        assert proxy > 2 * TimeUNet(2, 3, **arch, time_embedding=False).compute_conv_feature_map_size(patch)
    assert math.prod(plans["configurations"]["3d_fullres"]["patch_size"]) < 120 * 300 * 280  # the budget bites


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_cli_train_predict_with_uncertainty(env, dim, tmp_path):
    from diffnnunet.cli import predict, train
    plans = json.load(open(os.path.join(env["nnUNet_preprocessed"], NAMES[dim], "MedSegDiffV2Plans.json")))
    assert plans["configurations"][CONFIG[dim]]["diffusion"]["method"] == "medsegdiff_v2"
    train.main([str(IDS[dim]), "MedSegDiffV2Trainer", "0", "-device", "cpu", "--epochs", "1",
                "--iterations-per-epoch", "2", "--val-iterations", "1", "--no-tune"])
    fold = os.path.join(env["nnUNet_results"], NAMES[dim], f"MedSegDiffV2Trainer__MedSegDiffV2Plans__{CONFIG[dim]}",
                        "fold_0")
    for f in ("checkpoint_final.pth", "validation/summary.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    out = str(tmp_path / "pred")
    images = os.path.join(env["nnUNet_raw"], NAMES[dim], "imagesTs")
    predict.main(["-npp", "0", "-i", images, "-o", out, "-d", str(IDS[dim]), "-tr", "MedSegDiffV2Trainer", "-f", "0",
                  "-device", "cpu", "--save_uncertainty", "--save_probabilities", "--steps", "2", "--samples", "3"])
    for case in sorted({f[:-12] for f in os.listdir(images)}):
        src = image_geometry(os.path.join(images, case + "_0000.nii.gz"))
        for name in (case + ".nii.gz", case + "_uncertainty.nii.gz"):
            got = image_geometry(os.path.join(out, name))
            assert got[0] == src[0], name
            for a, b in zip(got[1:], src[1:]):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, case + ".nii.gz")))
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
        unc = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, case + "_uncertainty.nii.gz")))
        assert unc.min() >= 0 and unc.max() <= 1 + 1e-3
        probs = np.load(os.path.join(out, case + ".npz"))["probabilities"]
        assert probs.shape[0] == 3
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-3)


# -- recipe "paper": one switch per deviation, Table 4's SA row --------------------------------------------------
def test_paper_switches_change_the_structure(arch, spatial):
    """diffusion_image: the Diffusion Model sees x_t alone (the paper's Fig. 1: N input channels, not M + N, and the
    image reaches it only through the conditions); ss_dim null: tokens keep the bottleneck's width; max_tokens
    null: the token grid is never pooled; u_sa "sa": the plain spatial attention of Table 4."""
    small = {"ss_blocks": 1, "nbp_blocks": 1}
    recipe = _model(arch, **small)
    paper = _model(arch, diffusion_image=False, ss_dim=None, max_tokens=None, u_sa="sa", ss_softmax=False, **small)
    assert recipe.diffusion.encoder.stages[0].first.convs[0].conv.in_channels == 2 + 3
    assert paper.diffusion.encoder.stages[0].first.convs[0].conv.in_channels == 3
    width = paper.diffusion.encoder.features[-1]
    assert paper.ss_former.embed_e.out_features == width and paper.ss_former.max_tokens is None
    assert token_grid((9, 10, 11), None) == [9, 10, 11] and token_grid((9, 10, 11), 64) != [9, 10, 11]
    assert paper.u_sa.smooth is None and recipe.u_sa.smooth is not None
    assert not paper.ss_former.to_semantic[0].softmax and recipe.ss_former.to_semantic[0].softmax
    x_t, t = torch.randn(1, 3, *spatial), torch.tensor([7])
    cond = paper.condition_forward(torch.randn(1, 2, *spatial))[1:]
    with torch.no_grad():  # the image enters only through (f_c, c): another image, the same conditions, same output
        torch.testing.assert_close(paper(torch.randn(1, 2, *spatial), x_t, t, cond),
                                   paper(torch.zeros(1, 2, *spatial), x_t, t, cond))
    with pytest.raises(ValueError, match="u_sa"):
        _model(arch, u_sa="usa")
    # the planner's memory proxy counts the network the plans build: 64 unpooled tokens, not 4 pooled ones
    pooled = MedSegDiffV2.feature_map_size(arch, 2, 3, (4, 32, 32)[-len(spatial):], {**small, "max_tokens": 4})
    assert MedSegDiffV2.feature_map_size(arch, 2, 3, (4, 32, 32)[-len(spatial):], {**small, "max_tokens": None}) \
        > pooled


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_plain_spatial_attention_and_unnormalised_spectral_attention_by_hand(dim):
    """Table 4's SA row: f_d' = sigmoid(f_c * k_1x1) f_d + f_d (no Gaussian, no max). ss_softmax false: the paper's
    f = F^-1(M') (c W^v) = A V, without the softmax over keys."""
    torch.manual_seed(0)
    spatial = (6, 6) if dim == 2 else (2, 6, 6)
    sa = USA(2, dim, [5] * dim, uncertain=False)
    f_c, f_d = torch.randn(1, 2, *spatial), torch.randn(1, 3, *spatial)
    gate = torch.sigmoid(torch.einsum("bc...,c->b...", f_c, sa.proj.weight.flatten()) + sa.proj.bias)[:, None]
    torch.testing.assert_close(sa(f_c, f_d), gate * f_d + f_d)
    attn = SpectralCrossAttention(8, dim, 16, nbp_filter=False, softmax=False)
    grid = (2, 3) if dim == 2 else (2, 1, 3)
    q, kv = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    a = attn.affinity(attn.norm_q(q), attn.norm_kv(kv), grid, None)
    out = q + attn.wo(a @ attn.wv(attn.norm_kv(kv)))
    torch.testing.assert_close(attn(q, kv, grid, None), out + attn.mlp(attn.norm_mlp(out)))
    attn.softmax = True
    assert not torch.allclose(attn(q, kv, grid, None), out + attn.mlp(attn.norm_mlp(out)))
