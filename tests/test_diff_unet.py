import math

import pytest
import torch

from diffnnunet.methods import DiffUNet, encode_target
from diffnnunet.methods.base import soft_dice_loss
from diffnnunet.methods.diff_unet import fusion_weight, logits_to_x0, step_uncertainty


def _model(arch, channels=2, classes=3, **diffusion):
    torch.manual_seed(0)
    return DiffUNet(arch, channels, classes, {"timesteps": 1000, **diffusion}).eval()


def test_logits_map_to_x0_in_range():
    """The network output is a logit; x0 = 2 sigmoid(logit) - 1 (not the logit clipped to [-1, 1])."""
    logits = torch.tensor([-20.0, -1.0, 0.0, 0.5, 3.0, 20.0])
    x0 = logits_to_x0(logits)
    assert torch.all(x0 >= -1) and torch.all(x0 <= 1)
    torch.testing.assert_close(x0, 2 * torch.sigmoid(logits) - 1)
    assert x0[3].item() == pytest.approx(2 / (1 + math.exp(-0.5)) - 1)  # clipping would give 0.5
    assert x0[4].item() != pytest.approx(1.0)  # clipping would give 1.0


def test_uncertainty_and_fusion_weight_formulas():
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    u = step_uncertainty(p)
    torch.testing.assert_close(u, torch.tensor([0.0, -0.25 * math.log(0.25), -0.5 * math.log(0.5), 0.0]))
    w = fusion_weight(p, step=3, scale=10)
    sig = 1 / (1 + math.exp(-0.3))
    torch.testing.assert_close(w, torch.exp(sig * (1 - u)))


def test_fusion_rules(arch, spatial):
    """Three steps, channel 0 at p = 0.2, 0.6, 0.9, channel 1 the reverse, channel 2 at 0.5 throughout. SUF by hand,
    w_i = exp(sigmoid(i / 3) (1 - u_i)), u_i = -p_i ln p_i, sigmoid(1/3, 2/3, 1) = 0.582570, 0.660756, 0.731059;
    u(0.2, 0.6, 0.9) = 0.321888, 0.306495, 0.094824.
    Channel 0: w = exp(0.582570 x 0.678112), exp(0.660756 x 0.693505), exp(0.731059 x 0.905176)
                 = 1.484456, 1.581285, 1.938155; sum w p = 2.990001, sum w = 5.003895, SUF = 0.5975348.
    Channel 1: w = exp(0.582570 x 0.905176), exp(0.660756 x 0.693505), exp(0.731059 x 0.678112)
                 = 1.694399, 1.581285, 1.641712; sum w p = 2.802073, sum w = 4.917396, SUF = 0.5698285.
    The later step weighs more at the same p (0.9: 1.938 as step 3, 1.694 as step 1), so the two differ."""
    m = _model(arch)
    steps = [(0.2, 0.9, 0.5), (0.6, 0.6, 0.5), (0.9, 0.2, 0.5)]
    per_step = [torch.tensor(v).reshape(1, 3, *[1] * len(spatial)).expand(1, 3, *spatial) for v in steps]
    m.fusion = "last"
    torch.testing.assert_close(m.fuse(per_step), per_step[-1])
    m.fusion = "mean"
    expected = torch.tensor([(0.2 + 0.6 + 0.9) / 3] * 2 + [0.5]).reshape(3, *[1] * len(spatial))
    torch.testing.assert_close(m.fuse(per_step)[0], expected.expand(3, *spatial))
    m.fusion = "step_uncertainty"
    expected = torch.tensor([0.5975348, 0.5698285, 0.5]).reshape(3, *[1] * len(spatial))
    torch.testing.assert_close(m.fuse(per_step)[0], expected.expand(3, *spatial), rtol=0, atol=2e-7)


def test_sample_shapes_and_range(arch, spatial):
    m = _model(arch)
    probs, per_step = m.sample(torch.randn(2, 2, *spatial), steps=3, samples=2,
                               generator=torch.Generator().manual_seed(0), return_steps=True)
    assert probs.shape == (2, 3, *spatial) and len(per_step) == 3
    assert probs.min() >= 0 and probs.max() <= 1


def test_feature_encoder_runs_once_per_window(arch, spatial):
    m = _model(arch)
    calls = []
    m.feature_encoder.register_forward_hook(lambda *a: calls.append(1))
    m.sample(torch.randn(1, 2, *spatial), steps=4, samples=3, chunk=2)
    assert len(calls) == 1


def test_sample_is_seeded_and_chunking_keeps_single_chain(arch, spatial):
    m = _model(arch)
    x = torch.randn(1, 2, *spatial, generator=torch.Generator().manual_seed(5))
    a = m.sample(x, 3, 2, generator=torch.Generator().manual_seed(1))
    b = m.sample(x, 3, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    # with batch 1, chunks of 1 draw the same noise as one chunk of 2
    c = m.sample(x, 3, 2, generator=torch.Generator().manual_seed(1), chunk=1)
    torch.testing.assert_close(a, c)


def test_sampler_seeded_regression():
    """Pinned output of the whole DDIM + SUF sampler (guards the process, the fusion and the x0 mapping)."""
    from tests.conftest import ARCH_2D
    m = _model(ARCH_2D, channels=1, classes=2)
    x = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    probs = m.sample(x, steps=3, samples=2, generator=torch.Generator().manual_seed(0))
    got = [probs.mean().item(), probs[0, 0, 3, 5].item(), probs[0, 1, 12, 9].item()]
    assert got == pytest.approx(REGRESSION, abs=2e-4)  # pinned to 4 decimals


REGRESSION = [0.5512, 0.6808, 0.4284]


def test_two_step_suf_sample_by_hand(monkeypatch):
    """The whole sampler on a stub network with a known output, logit = 2 x_t + t / 10, T = 10 (linear betas
    1e-4 .. 0.02): DDIM (eta 0) from x_9 = z to x_0 in the steps [9, 0], then Step-Uncertainty Fusion of the two
    steps' sigmoids, computed here with scalar arithmetic per voxel and channel."""
    from tests.conftest import ARCH_2D
    m = _model(ARCH_2D, channels=1, classes=2, timesteps=10)
    monkeypatch.setattr(m, "network_forward", lambda image, x_t, t, features=None: 2 * x_t + t.view(-1, 1, 1, 1) / 10)
    image = torch.zeros(1, 1, 8, 8)
    got = m.sample(image, steps=2, samples=1, generator=torch.Generator().manual_seed(3))
    z = torch.randn((1, 2, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float32)

    betas = [1e-4 + (0.02 - 1e-4) * i / 9 for i in range(10)]
    abar9 = math.prod(1 - b for b in betas)
    abar0 = 1 - betas[0]

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def weight(p, i):  # w_i = exp(sigmoid(i / 2) (1 - u_i)), u_i = -p log p, two steps
        return math.exp(sig(i / 2) * (1 + p * math.log(p)))

    for c in range(2):
        for (y, x) in [(0, 0), (5, 3)]:
            x9 = z[0, c, y, x].item()
            p1 = sig(2 * x9 + 0.9)
            x0_hat = 2 * p1 - 1
            eps = (x9 - math.sqrt(abar9) * x0_hat) / math.sqrt(1 - abar9)
            x_0 = math.sqrt(abar0) * x0_hat + math.sqrt(1 - abar0) * eps
            p2 = sig(2 * x_0)
            w1, w2 = weight(p1, 1), weight(p2, 2)
            assert got[0, c, y, x].item() == pytest.approx((w1 * p1 + w2 * p2) / (w1 + w2), rel=1e-5)


def test_training_loss_is_eq3(arch, spatial):
    m = _model(arch)
    image = torch.randn(2, 2, *spatial)
    labels = torch.randint(0, 3, (2, 1, *spatial)).float()
    x0, mask = encode_target(labels, 3, has_regions=False, ignore_label=None)
    terms = m.training_loss(image, x0, mask, generator=torch.Generator().manual_seed(3))
    # recompute with the same t and noise
    g = torch.Generator().manual_seed(3)
    t = m.process.sample_timesteps(2, "cpu", g)
    noise = torch.randn(x0.shape, generator=g)
    logits = m(image, m.process.q_sample(2 * x0 - 1, t, noise), t)
    p = torch.sigmoid(logits)
    dice = soft_dice_loss(p, x0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x0)
    mse = ((2 * p - 1 - (2 * x0 - 1)) ** 2).mean()
    torch.testing.assert_close(terms["loss"], dice + bce + mse, rtol=1e-5, atol=1e-5)
    terms["loss"].backward()
    assert m.feature_encoder.stages[0].first.convs[0].conv.weight.grad is not None


def test_a_few_steps_of_training_reduce_the_loss():
    from tests.conftest import ARCH_2D
    torch.manual_seed(0)
    m = DiffUNet(ARCH_2D, 1, 2, {"timesteps": 100})
    image = torch.zeros(4, 1, 16, 16)
    image[:, :, 4:12, 4:12] = 1
    x0, _ = encode_target(image.clone(), 2, False, None)
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    losses = []
    for i in range(60):
        opt.zero_grad()
        loss = m.training_loss(image, x0, generator=torch.Generator().manual_seed(i))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_encode_target_labels_regions_and_ignore(dim, spatial):
    labels = torch.zeros(1, 1, *spatial)
    labels.view(-1)[:3] = torch.tensor([1.0, 2.0, 3.0])  # 3 = ignore label
    x0, mask = encode_target(labels, 3, has_regions=False, ignore_label=3)
    assert x0.shape == (1, 3, *spatial)
    assert x0.sum(1).eq(1).all()  # one-hot, background included
    assert mask.view(-1)[2] == 0 and mask.sum() == mask.numel() - 1
    regions = torch.randint(0, 2, (1, 3, *spatial)).float()  # 2 regions + ignore channel
    r, rmask = encode_target(regions, 2, has_regions=True, ignore_label=9)
    assert r.shape == (1, 2, *spatial)
    torch.testing.assert_close(rmask, 1 - regions[:, -1:])


def test_masked_voxels_do_not_change_the_loss_terms():
    from diffnnunet.methods.base import masked_mean
    probs = torch.rand(2, 3, 8, 8)
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[..., :2] = 1
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :2] = 0
    torch.testing.assert_close(soft_dice_loss(probs, a, mask), soft_dice_loss(probs, b, mask))
    torch.testing.assert_close(masked_mean((probs - a) ** 2, mask), masked_mean((probs - b) ** 2, mask))
    torch.testing.assert_close(masked_mean((probs - a) ** 2, mask), ((probs - a) ** 2)[..., 2:].mean())
