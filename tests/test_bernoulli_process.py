"""The Bernoulli process (BerDiff Eqs. 2-9, Algorithm 2) and its categorical generalisation against the paper's
formulas, hand-computed values, brute-force Bayes, and the K = 2 equivalence."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from diffnnunet.processes import BernoulliProcess, CategoricalProcess


def _small(categories=None):
    """T = 3, betas 0.1, 0.2, 0.3: alphas 0.9, 0.8, 0.7, abar 0.9, 0.72, 0.504 (hand-computable)."""
    args = (3, "linear", 0.1, 0.3)
    return BernoulliProcess(*args) if categories is None else CategoricalProcess(categories, *args)


def _bern(p, y):
    """B(y; p)."""
    return p * y + (1 - p) * (1 - y)


def test_schedules():
    p = BernoulliProcess()
    assert p.timesteps == 1000
    torch.testing.assert_close(p.betas[[0, -1]], torch.tensor([1e-4, 0.02]))  # the paper's linear schedule
    assert p.alpha_bar(-1).item() == 1.0 and p.alpha_bar(0).item() == pytest.approx(1 - 1e-4)
    assert p.set_timesteps(4) == [999, 666, 333, 0]
    cos = BernoulliProcess(1000, "cosine")
    assert not torch.allclose(cos.alphas_cumprod, p.alphas_cumprod) and cos.alphas_cumprod[-1] < 1e-3
    assert set(dict(p.named_buffers())) and not p.state_dict()  # schedules are non-persistent buffers


def test_eq3_is_eq2_composed():
    """Eq. 3 = Eq. 2 applied t times: p_t = (1 - beta_t) p_{t-1} + beta_t/2 from p_0 = y_0."""
    proc = BernoulliProcess(1000, "linear")
    for y0 in (0.0, 1.0):
        p = torch.tensor(y0, dtype=torch.float64)
        for t in range(1000):
            p = (1 - proc.betas[t].double()) * p + proc.betas[t].double() / 2
            if t in (0, 10, 300, 999):
                assert proc.marginal(torch.tensor(y0), t).item() == pytest.approx(p.item(), abs=1e-5)


@pytest.mark.parametrize("t", [0, 150, 400, 999])
def test_forward_marginal_matches_eq3_empirically(t):
    """Mean of y_t = y_0 XOR eps over many draws = abar_t y_0 + (1 - abar_t)/2 (Eq. 3), for y_0 = 0 and 1."""
    proc = BernoulliProcess()
    n = 20000
    y0 = torch.tensor([0.0, 1.0]).repeat(n, 1, 1)  # (n, 1, 2): one voxel of each label
    tt = torch.full((n,), t)
    noise = proc.sample_noise(y0, tt, torch.Generator().manual_seed(t))
    y_t = proc.q_sample(y0, tt, noise)
    assert set(y_t.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(y_t, (y0 + noise) % 2)  # XOR
    ab = proc.alpha_bar(t).item()
    expected = torch.tensor([(1 - ab) / 2, ab + (1 - ab) / 2])
    tol = 4 * 0.5 / n ** 0.5
    torch.testing.assert_close(y_t.mean(0)[0], expected, atol=tol, rtol=0)


def test_forward_marginal_categorical_empirically():
    proc = CategoricalProcess(3)
    n, t = 20000, 300
    y0 = F.one_hot(torch.full((n, 1), 2), 3).movedim(-1, 1).float()  # (n, 3, 1), label 2
    y_t = proc.q_sample(y0, t, proc.sample_noise(y0, t, torch.Generator().manual_seed(1)))
    assert torch.all(y_t.sum(1) == 1)
    ab = proc.alpha_bar(t).item()
    expected = torch.tensor([(1 - ab) / 3, (1 - ab) / 3, ab + (1 - ab) / 3])
    torch.testing.assert_close(y_t.mean(0)[:, 0], expected, atol=4 * 0.5 / n ** 0.5, rtol=0)


def test_posterior_hand_computed_eq4():
    """t index 1 (paper t = 2): alpha = 0.8, abar_prev = 0.9. theta = a1 / (a0 + a1) with
    a1 = (0.8 y_t + 0.1)(0.9 y_0 + 0.05), a0 = (0.8 (1 - y_t) + 0.1)(0.9 (1 - y_0) + 0.05)."""
    proc = _small()
    y_t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    y0 = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = torch.tensor([0.855 / 0.86, 0.045 / 0.14, 0.095 / 0.14, 0.005 / 0.86])
    torch.testing.assert_close(proc.posterior(y_t, y0, 1), expected)
    # categorical K = 2 on one-hot [1 - y, y]: the same numbers, and the two entries sum to one
    cat = _small(2)
    post = cat.posterior(torch.stack([1 - y_t, y_t], 1), torch.stack([1 - y0, y0], 1), 1)
    torch.testing.assert_close(post.sum(1), torch.ones(4))
    torch.testing.assert_close(post[:, 1], expected)


@pytest.mark.parametrize("t,t_prev", [(1, 0), (2, 1), (2, 0), (0, -1), (2, -1)])
def test_posterior_is_bayes_of_forward(t, t_prev):
    """theta_post = q(y_t | y_prev) q(y_prev | y_0) / q(y_t | y_0), enumerated from Eqs. 2-3 (with
    abar_t / abar_prev as the skip's alpha); soft y_0 (Eq. 7) is linear in y_0 before normalisation."""
    proc = _small()
    ab_t, ab_p = proc.alpha_bar(t).item(), proc.alpha_bar(t_prev).item()
    a = ab_t / ab_p
    for yt, y0 in itertools.product((0.0, 1.0), repeat=2):
        joint = {yp: _bern(a * yp + (1 - a) / 2, yt) * _bern(ab_p * y0 + (1 - ab_p) / 2, yp) for yp in (0.0, 1.0)}
        expected = joint[1.0] / (joint[0.0] + joint[1.0])
        assert proc.posterior(torch.tensor(yt), torch.tensor(y0), t, t_prev).item() == pytest.approx(expected)


def test_categorical_posterior_is_bayes_and_sums_to_one():
    proc, k = _small(3), 3
    a, ab_p = 0.8, 0.9
    for lt, l0 in itertools.product(range(k), repeat=2):
        y_t = F.one_hot(torch.tensor([lt]), k).float()
        y0 = F.one_hot(torch.tensor([l0]), k).float()
        post = proc.posterior(y_t, y0, 1)[0]
        joint = torch.tensor([(a * (lt == c) + (1 - a) / k) * (ab_p * (l0 == c) + (1 - ab_p) / k) for c in range(k)])
        torch.testing.assert_close(post, joint / joint.sum())
        assert post.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("categories", [None, 4])
def test_kl_zero_when_noise_estimate_is_exact(dim, categories):
    """eps_hat = eps gives y0_hat = y_0 (Eq. 7 step 1), mu_hat = theta_post, KL (Eq. 8) = 0; a wrong estimate > 0.
    At t = 1 the decoder NLL equals that KL (theta_post(y_1, y_0) = y_0)."""
    proc = BernoulliProcess() if categories is None else CategoricalProcess(categories)
    shape = (3, 1 if categories is None else categories, *([5] * dim))
    g = torch.Generator().manual_seed(0)
    if categories is None:
        y0 = (torch.rand(shape, generator=g) < 0.5).float()
    else:
        y0 = F.one_hot(torch.randint(0, categories, (shape[0], *shape[2:]), generator=g), categories)
        y0 = y0.movedim(-1, 1).float()
    t = torch.tensor([0, 500, 999])
    noise = proc.sample_noise(y0, t, g)
    y_t = proc.q_sample(y0, t, noise)
    torch.testing.assert_close(proc.predict_x0(noise, y_t), y0)
    theta = proc.posterior(y_t, y0, t)
    kl = proc.kl(theta, proc.calibrate(y_t, noise, t))
    assert kl.shape[2:] == y0.shape[2:] and kl.abs().max() < 1e-5
    wrong = proc.calibrate(y_t, 1 - noise if categories is None else noise.roll(1, 1), t)  # every y0_hat wrong
    kl_wrong = proc.kl(theta, wrong).flatten(1).mean(1)
    assert kl_wrong[0] > 1 and kl_wrong[1] > 1e-5  # at large t the posterior hardly depends on y_0
    torch.testing.assert_close(theta[0], y0[0])  # t = 1: the posterior is y_0 itself
    torch.testing.assert_close(proc.decoder_nll(y0[:1], wrong[:1]), proc.kl(theta[:1], wrong[:1]))


def test_bernoulli_losses_against_formulas():
    proc = BernoulliProcess()
    q, p = torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0.2, 0.6, 0.7])
    expected = torch.tensor([torch.log(torch.tensor(1 / 0.8)).item(),
                             0.3 * torch.log(torch.tensor(0.3 / 0.6)).item()
                             + 0.7 * torch.log(torch.tensor(0.7 / 0.4)).item(),
                             torch.log(torch.tensor(1 / 0.7)).item()])
    torch.testing.assert_close(proc.kl(q, p), expected)
    logits, eps = torch.tensor([-1.0, 2.0]), torch.tensor([0.0, 1.0])
    e = torch.sigmoid(logits)
    torch.testing.assert_close(proc.noise_nll(eps, logits), -(eps * e.log() + (1 - eps) * (1 - e).log()))  # Eq. 9


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_keeps_eq3_marginal_and_valid(eta):
    """Algorithm 2's DDIM update with x0_hat = y_0: averaging over y_t ~ Eq. 3 gives Eq. 3 at t_prev (it is linear in
    y_t); every parameter lies in [0, 1]; the last step (t_prev = -1) draws from B(x0_hat)."""
    proc = BernoulliProcess()
    steps = proc.set_timesteps(10)
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        for y0 in (0.0, 1.0):
            y0_t = torch.tensor(y0)
            mean_yt = proc.marginal(y0_t, t)
            avg = proc.ddim_probs(y0_t, mean_yt, t, t_prev, eta)
            assert avg.item() == pytest.approx(proc.marginal(y0_t, t_prev).item(), abs=1e-5)
            for yt, x0_hat in itertools.product((0.0, 1.0), (0.0, 0.3, 1.0)):
                p = proc.ddim_probs(torch.tensor(x0_hat), torch.tensor(yt), t, t_prev, eta).item()
                assert -1e-6 <= p <= 1 + 1e-6
    x0_hat = torch.tensor([0.2, 0.9])
    torch.testing.assert_close(proc.ddim_probs(x0_hat, torch.tensor([1.0, 0.0]), 0, -1, eta), x0_hat)


def test_k2_categorical_equals_bernoulli():
    """The categorical process with K = 2 on one-hot [1 - y, y] is the paper's Bernoulli process on y: every verb,
    and the same random draws from the same generator."""
    bern, cat = BernoulliProcess(), CategoricalProcess(2)
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(4, 1, 6, 6, generator=g) < 0.4).float()
    y2 = torch.cat([1 - y, y], 1)
    t = torch.tensor([0, 10, 400, 999])
    logits = torch.randn(4, 2, 6, 6, generator=g)
    bern_logit = logits[:, 1:] - logits[:, :1]
    torch.testing.assert_close(cat.marginal(y2, t)[:, 1:], bern.marginal(y, t))
    n_b = bern.sample_noise(y, t, torch.Generator().manual_seed(7))
    n_c = cat.sample_noise(y2, t, torch.Generator().manual_seed(7))
    torch.testing.assert_close(n_c[:, 1:], n_b)
    yt_b, yt_c = bern.q_sample(y, t, n_b), cat.q_sample(y2, t, n_c)
    torch.testing.assert_close(yt_c[:, 1:], yt_b)
    e_b, e_c = bern.noise_probs(bern_logit), cat.noise_probs(logits)
    torch.testing.assert_close(e_c[:, 1:], e_b)
    torch.testing.assert_close(cat.predict_x0(e_c, yt_c)[:, 1:], bern.predict_x0(e_b, yt_b))
    mu_b, mu_c = bern.calibrate(yt_b, e_b, t), cat.calibrate(yt_c, e_c, t)
    torch.testing.assert_close(mu_c[:, 1:], mu_b)
    th_b, th_c = bern.posterior(yt_b, y, t), cat.posterior(yt_c, y2, t)
    torch.testing.assert_close(th_c[:, 1:], th_b)
    torch.testing.assert_close(cat.kl(th_c, mu_c), bern.kl(th_b, mu_b), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cat.decoder_nll(y2, mu_c), bern.decoder_nll(y, mu_b), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cat.noise_nll(n_c, logits), bern.noise_nll(n_b, bern_logit), atol=1e-6, rtol=1e-5)
    x0_b = bern.predict_x0(e_b, yt_b)
    for t_, tp in ((999, 500), (500, 0), (0, -1)):
        torch.testing.assert_close(cat.ddim_probs(torch.cat([1 - x0_b, x0_b], 1), yt_c, t_, tp, 0.3)[:, 1:],
                                   bern.ddim_probs(x0_b, yt_b, t_, tp, 0.3))
    draws_b = bern.step(x0_b, yt_b, 500, 0, 0.3, torch.Generator().manual_seed(9))
    draws_c = cat.step(torch.cat([1 - x0_b, x0_b], 1), yt_c, 500, 0, 0.3, torch.Generator().manual_seed(9))
    torch.testing.assert_close(draws_c[:, 1:], draws_b)
    torch.testing.assert_close(cat.prior_sample((4, 2, 6, 6), torch.Generator().manual_seed(1))[:, 1:],
                               bern.prior_sample((4, 1, 6, 6), torch.Generator().manual_seed(1)))


def test_categorical_draws_and_prior():
    cat = CategoricalProcess(3)
    probs = torch.tensor([0.2, 0.5, 0.3]).reshape(1, 3, 1).expand(1, 3, 30000).contiguous()
    draws = cat.draw(probs, torch.Generator().manual_seed(0))
    assert torch.all(draws.sum(1) == 1)
    torch.testing.assert_close(draws.mean(2)[0], probs[0, :, 0], atol=0.02, rtol=0)
    prior = cat.prior_sample((2, 3, 50, 50), torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.mean((0, 2, 3)), torch.full((3,), 1 / 3), atol=0.02, rtol=0)
