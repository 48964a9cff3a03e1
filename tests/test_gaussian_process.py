import math

import pytest
import torch

from diffnnunet.processes import GaussianProcess, make_beta_schedule
from diffnnunet.utils import expand_to


def test_linear_schedule_matches_diff_unet():
    betas = make_beta_schedule("linear", 1000, 1e-4, 0.02)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert torch.all(betas[1:] > betas[:-1])


def test_cosine_schedule_alpha_bar():
    betas = make_beta_schedule("cosine", 100)
    abar = torch.cumprod(1 - betas, 0)
    s = 0.008
    expected = math.cos((50 / 100 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert abar[49].item() == pytest.approx(expected, rel=1e-6)


def test_schedules_are_buffers():
    p = GaussianProcess(10)
    names = dict(p.named_buffers())
    assert {"betas", "alphas_cumprod", "sqrt_alphas_cumprod"} <= set(names)
    assert p.state_dict() == {}  # derived from the plans, not stored in checkpoints


def test_expand_to_broadcasts_any_dim(dim, spatial):
    x = torch.zeros(3, 2, *spatial)
    assert expand_to(torch.arange(3.0), x).shape == (3, 1, *[1] * dim)
    assert expand_to(torch.ones(3, 2), x).shape == (3, 2, *[1] * dim)


def test_q_sample_is_eq1(dim, spatial):
    p = GaussianProcess(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, *spatial, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    out = p.q_sample(x0, t, noise)
    for i in range(4):
        ref = abar[t[i]].sqrt() * x0[i] + (1 - abar[t[i]]).sqrt() * noise[i]
        torch.testing.assert_close(out[i], ref.float(), rtol=1e-5, atol=1e-5)


def test_predict_x0_and_eps_are_inverse(dim, spatial):
    p = GaussianProcess(1000, prediction="eps")
    x0, eps = torch.randn(2, 2, *spatial), torch.randn(2, 2, *spatial)
    t = torch.tensor([3, 700])
    xt = p.q_sample(x0, t, eps)
    torch.testing.assert_close(p.predict_x0(eps, xt, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.predict_eps(x0, xt, t), eps, rtol=1e-4, atol=1e-4)
    assert p.training_target(x0, eps, t) is eps
    assert GaussianProcess(10, prediction="x0").training_target(x0, eps, t) is x0


def test_set_timesteps_respacing():
    p = GaussianProcess(1000)
    ts = p.set_timesteps(10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert p.set_timesteps(1) == [999]
    assert len(p.set_timesteps(5000)) == 1000


def test_ddim_step_eta0_matches_song_eq12(dim, spatial):
    p = GaussianProcess(1000)
    g = torch.Generator().manual_seed(1)
    x0_hat, xt = torch.randn(2, 2, *spatial, generator=g), torch.randn(2, 2, *spatial, generator=g)
    t, t_prev = 700, 400
    ab_t, ab_prev = p.alphas_cumprod[t], p.alphas_cumprod[t_prev]
    eps = (xt - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    ref = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(p.step(x0_hat, xt, t, t_prev), ref)
    # the last step (t_prev = -1, abar = 1) lands exactly on the x0 estimate
    torch.testing.assert_close(p.step(x0_hat, xt, 0, -1), x0_hat)


def test_ddim_step_with_eta_adds_the_right_variance():
    p = GaussianProcess(1000)
    x0_hat, xt = torch.zeros(20000, 1), torch.zeros(20000, 1)
    t, t_prev, eta = 600, 300, 1.0
    ab_t, ab_prev = p.alphas_cumprod[t], p.alphas_cumprod[t_prev]
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    out = p.step(x0_hat, xt, t, t_prev, eta=eta, generator=torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(sigma.item(), rel=0.03)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="schedule"):
        GaussianProcess(10, schedule="quadraticish")
    with pytest.raises(ValueError, match="prediction"):
        GaussianProcess(10, prediction="v")
