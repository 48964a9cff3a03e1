"""Training-recipe levers of issue 12 (documentation/benchmarks.md, "Levers"): timestep sampling biased to the noisy
end (every method), recycling (Diff-UNet) and the LDSeg label decoder's image skips, against hand-computed values."""
import pytest
import torch

from diffnnunet.methods import METHODS, encode_target
from diffnnunet.methods.diff_unet import DiffUNet
from diffnnunet.planners.diffusion_planner import DEFAULT_DIFFUSION
from diffnnunet.processes import BernoulliProcess, GaussianProcess
from tests.conftest import ARCH_2D


@pytest.mark.parametrize("bias", [1.0, 3.0])
def test_biased_timesteps_follow_the_power_cdf(bias):
    """P(t <= k) = ((k + 1) / T)^(1 + g): for T = 10, g = 1 that is 0.01, 0.04, ..., 1 (hand values below)."""
    proc = GaussianProcess(10, "linear")
    t = proc.sample_timesteps(200_000, "cpu", torch.Generator().manual_seed(0), bias)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == 9
    cdf = torch.stack([(t <= k).double().mean() for k in range(10)])
    expected = torch.tensor([((k + 1) / 10) ** (1 + bias) for k in range(10)], dtype=torch.float64)
    if bias == 1.0:
        torch.testing.assert_close(expected[:3], torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64))
    torch.testing.assert_close(cdf, expected, atol=4e-3, rtol=0)
    assert t.double().mean() > 4.5  # uniform's mean; the bias moves training towards the noisy end


def test_zero_bias_is_the_uniform_draw():
    """bias 0 keeps the exact randint draw (the seeded regressions of every method stay valid)."""
    proc = BernoulliProcess(1000)
    got = proc.sample_timesteps(16, "cpu", torch.Generator().manual_seed(5), 0.0)
    torch.testing.assert_close(got, torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_with_the_plans_timestep_bias(name, monkeypatch):
    seen = []
    for cls in (GaussianProcess, BernoulliProcess):
        original = cls.sample_timesteps

        def recorder(self, batch, device, generator=None, bias=0.0, _orig=original):
            seen.append(bias)
            return _orig(self, batch, device, generator, bias)
        monkeypatch.setattr(cls, "sample_timesteps", recorder)
    settings = dict(DEFAULT_DIFFUSION[name], timestep_bias=2.0)
    settings.pop("paper_recipe")
    m = METHODS[name](ARCH_2D, 1, 2, settings)
    x0, mask = encode_target(torch.randint(0, 2, (2, 1, 16, 16)).float(), 2, has_regions=False, ignore_label=None)
    out = m.training_loss(torch.randn(2, 1, 16, 16), x0, mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and seen and all(b == 2.0 for b in seen)


def _diff_unet(arch, **diffusion):
    torch.manual_seed(0)
    return DiffUNet(arch, 2, 3, {"timesteps": 1000, **diffusion}).eval()


def test_recycling_starts_the_forward_process_from_the_models_first_guess(arch, spatial):
    """recycling = 1: x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps with x0_hat = 2 sigmoid(DU(I, x_T, T-1)) - 1,
    x_T the generator's draw after t, eps and the pick; the loss still targets the ground truth."""
    m = _diff_unet(arch, recycling=1.0)
    image = torch.randn(2, 2, *spatial)
    x0, _ = encode_target(torch.randint(0, 3, (2, 1, *spatial)).float(), 3, has_regions=False, ignore_label=None)
    t, noise = torch.tensor([10, 700]), torch.randn(2, 3, *spatial)
    calls = []
    m.denoiser.register_forward_hook(lambda _mod, args, out: calls.append((args[0].clone(), args[1].clone(), out)))
    g = torch.Generator().manual_seed(4)
    terms = m.training_loss(image, x0, None, generator=g, t=t, noise=noise)
    g = torch.Generator().manual_seed(4)
    torch.rand(2, generator=g)  # the per-sample pick (p = 1: both)
    x_T = torch.randn(2, 3, *spatial, generator=g)
    (first_in, first_t, first_out), (second_in, second_t, second_out) = calls
    torch.testing.assert_close(first_in[:, 2:], x_T)
    assert first_t.tolist() == [999, 999] and second_t.tolist() == [10, 700]
    x0_hat = 2 * torch.sigmoid(first_out) - 1
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()
    shape = (2,) + (1,) * (x0.ndim - 1)
    x_t = abar.sqrt().reshape(shape) * x0_hat + (1 - abar).sqrt().reshape(shape) * noise
    torch.testing.assert_close(second_in[:, 2:], x_t, atol=1e-5, rtol=1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(second_out, x0)
    torch.testing.assert_close(terms["bce"], bce)


def test_recycling_off_or_unpicked_keeps_the_ground_truth(arch, spatial):
    image = torch.randn(2, 2, *spatial)
    x0, _ = encode_target(torch.randint(0, 3, (2, 1, *spatial)).float(), 3, has_regions=False, ignore_label=None)
    t, noise = torch.tensor([10, 700]), torch.randn(2, 3, *spatial)
    ref = _diff_unet(arch).training_loss(image, x0, None, torch.Generator().manual_seed(1), t=t, noise=noise)
    m = _diff_unet(arch, recycling=0.5)
    x0s = 2 * x0 - 1
    # seed 0's two uniforms are 0.50 and 0.77 (hand-checked below): neither is below 0.3, so nothing is recycled
    u = torch.rand(2, generator=torch.Generator().manual_seed(0))
    m.recycling = 0.3
    assert bool((u >= 0.3).all())
    torch.testing.assert_close(m.recycled_start(image, x0s, torch.Generator().manual_seed(0)), x0s)
    m.recycling = 0.0
    got = m.training_loss(image, x0, None, torch.Generator().manual_seed(1), t=t, noise=noise)
    torch.testing.assert_close(got["loss"], ref["loss"])
    m.recycling = 0.6  # picks sample 0 only (0.50 < 0.6 <= 0.77): sample 1 keeps its ground truth exactly
    start = m.recycled_start(image, x0s, torch.Generator().manual_seed(0))
    torch.testing.assert_close(start[1], x0s[1])
    assert not torch.equal(start[0], x0s[0]) and float(start[0].abs().max()) <= 1.0


def test_aux_head_adds_bce_and_dice_of_the_feature_encoders_finest_stage(arch, spatial):
    """aux_head_weight w: L = L_dice + L_bce + L_mse (Eq. 3) + w (Dice + BCE) of a 1x1 head on FE(I)'s first stage."""
    image = torch.randn(2, 2, *spatial)
    x0, _ = encode_target(torch.randint(0, 3, (2, 1, *spatial)).float(), 3, has_regions=False, ignore_label=None)
    t, noise = torch.tensor([10, 700]), torch.randn(2, 3, *spatial)
    plain = _diff_unet(arch)
    m = _diff_unet(arch, aux_head_weight=0.5)
    assert not hasattr(plain, "aux_head") and m.aux_head.out_channels == 3
    m.load_state_dict({**plain.state_dict(), **{f"aux_head.{k}": v for k, v in m.aux_head.state_dict().items()}})
    ref = plain.training_loss(image, x0, None, t=t, noise=noise)
    got = m.training_loss(image, x0, None, t=t, noise=noise)
    aux_logits = m.aux_head(m.feature_encoder(image)[0])
    p = torch.sigmoid(aux_logits)
    axes = [0] + list(range(2, p.ndim))
    dice = 1 - ((2 * (p * x0).sum(axes) + 1e-5) / (p.sum(axes) + x0.sum(axes) + 1e-5)).mean()
    bce = -(x0 * torch.log(p) + (1 - x0) * torch.log(1 - p)).mean()
    torch.testing.assert_close(got["aux"], dice + bce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], ref["loss"] + 0.5 * (dice + bce), atol=1e-5, rtol=1e-5)
    got["loss"].backward()
    assert m.aux_head.weight.grad.abs().sum() > 0
