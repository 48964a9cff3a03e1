"""cDAL: the few-step VP schedule and the posterior of Eq. 2 on hand values, the latent z, the discriminator's
attention (Eq. 4's training input), the sampler (seeded regression + hand check, no discriminator at inference),
the second optimizer (steps, checkpoint, --continue) and the CLIs end to end on tiny 2D and 3D data."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffnnunet.methods import CDAL, encode_target
from diffnnunet.methods.cdal import attention_stage
from diffnnunet.processes import GaussianProcess, make_beta_schedule
from tests.helpers import CONFIG, STANDARD_IDS, dataset_names, image_geometry, module_cli_env


def _model(arch, channels=2, classes=3, seed=0, **diffusion):
    torch.manual_seed(seed)
    return CDAL(arch, channels, classes, {"timesteps": 2, "multiclass": "categorical", **diffusion}).eval()


def _randomise_latent(m):
    """The latent modulation starts as the identity (zero init); give it weights so z matters, as after training."""
    g = torch.Generator().manual_seed(11)
    for stage in [*m.generator.encoder.stages, *m.generator.dec_stages]:
        with torch.no_grad():
            stage.latent_proj.weight.copy_(torch.randn(stage.latent_proj.weight.shape, generator=g) * 0.5)


def _onehot(spatial, classes=3, batch=2, seed=0):
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=torch.Generator().manual_seed(seed))
    return encode_target(labels.float(), classes, has_regions=False, ignore_label=None)[0]


# -- process: schedule and posterior (Eq. 2) ---------------------------------------------------------------------
def test_vp_schedule_hand_values():
    abar = torch.cumprod(1 - make_beta_schedule("vp", 2, 0.1, 20.0), 0)
    # alpha_bar(s) = exp(-0.1 s - 19.9 s^2 / 2) at s = 1/2, 1
    assert abar[0].item() == pytest.approx(math.exp(-0.05 - 19.9 / 8), rel=1e-9)
    assert abar[1].item() == pytest.approx(math.exp(-0.1 - 19.9 / 2), rel=1e-9)
    assert make_beta_schedule("vp", 4, 0.1, 20.0).shape == (4,)


def test_posterior_step_is_eq2(dim, spatial):
    p = GaussianProcess(2, "vp", 0.1, 20.0)
    a1, a2 = math.exp(-0.05 - 19.9 / 8), math.exp(-0.1 - 19.9 / 2)
    b2 = 1 - a2 / a1
    x0 = torch.full((1, 1, *spatial), 0.5)
    xt = torch.full((1, 1, *spatial), -1.0)
    mean, var = p.posterior(x0, xt, torch.tensor([1]))
    # Eq. 2: sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t) x_t
    ref_mean = math.sqrt(a1) * b2 / (1 - a2) * 0.5 + math.sqrt(1 - b2) * (1 - a1) / (1 - a2) * -1.0
    assert mean.flatten()[0].item() == pytest.approx(ref_mean, rel=1e-5)
    assert var.flatten()[0].item() == pytest.approx(b2 * (1 - a1) / (1 - a2), rel=1e-5)
    # the last step lands on x0: variance 0, mean x0
    mean0, var0 = p.posterior(x0, xt, torch.tensor([0]))
    assert var0.abs().max().item() < 1e-7 and torch.allclose(mean0, x0, atol=1e-6)
    # the sampler's DDIM step with eta = 1 is the same posterior draw (fresh noise from the generator)
    step = p.step(x0, xt, 1, 0, eta=1.0, generator=torch.Generator().manual_seed(4))
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(step, ref_mean + math.sqrt(b2 * (1 - a1) / (1 - a2)) * z, rtol=1e-5, atol=1e-5)


def test_real_pair_is_two_forward_steps(spatial):
    p = GaussianProcess(2, "vp", 0.1, 20.0)
    x0, n1, n2 = torch.ones(2, 1, *spatial), torch.randn(2, 1, *spatial), torch.randn(2, 1, *spatial)
    prev, xt = p.q_sample_pair(x0, torch.tensor([0, 1]), n1, n2)
    a1 = math.exp(-0.05 - 19.9 / 8)
    torch.testing.assert_close(prev[0], x0[0])  # t = 0: x_{t-1} = x_0
    torch.testing.assert_close(xt[0], math.sqrt(a1) * x0[0] + math.sqrt(1 - a1) * n2[0])
    torch.testing.assert_close(prev[1], math.sqrt(a1) * x0[1] + math.sqrt(1 - a1) * n1[1])
    b2 = 1 - math.exp(-0.1 - 19.9 / 2) / a1
    torch.testing.assert_close(xt[1], math.sqrt(1 - b2) * prev[1] + math.sqrt(b2) * n2[1])


# -- generator, discriminator, attention ----------------------------------------------------------------------
def test_z_changes_x0_hat(arch, spatial):
    m = _model(arch)
    _randomise_latent(m)
    image, xt = torch.randn(1, 2, *spatial), torch.randn(1, 3, *spatial)
    t = torch.tensor([1])
    a = m.predict_x0(image, xt, t, torch.randn(1, 100, generator=torch.Generator().manual_seed(1)))[0]
    b = m.predict_x0(image, xt, t, torch.randn(1, 100, generator=torch.Generator().manual_seed(2)))[0]
    assert (a - b).abs().max() > 1e-3
    off = _model(arch, latent=False)
    assert off.mapping is None and off.draw_z(1, "cpu") is None
    assert not any(s.latent_proj is not None for s in off.generator.encoder.stages)


def test_attention_map_and_training_input(arch, spatial, dim):
    m = _model(arch)
    x0 = _onehot(spatial)
    x0s, image = 2 * x0 - 1, torch.randn(2, 2, *spatial)
    t, noise = torch.tensor([0, 1]), torch.randn(x0.shape)
    g = torch.Generator().manual_seed(5)
    x_prev, x_t = m.process.q_sample_pair(x0s, t, *[torch.randn(x0.shape, generator=g) for _ in range(2)])
    att = m.attention_map(x_prev, x_t, t)
    assert att.shape == (2, 1, *spatial) and att.min() >= 0
    torch.testing.assert_close(att.flatten(1).amax(1), torch.ones(2))
    # by hand: channel mean of D's stage-2 map (1/4 of the patch in-plane), upsampled, |.| / max |.|
    feat = m.discriminator.encoder(torch.cat([x_prev, x_t], 1), m.discriminator.time_embed(t))[2]
    assert feat.shape[-1] == spatial[-1] // 4
    a = F.interpolate(feat.mean(1, keepdim=True), size=spatial, mode="bilinear" if dim == 2 else "trilinear").abs()
    ref = a / a.flatten(1).amax(1).reshape(2, *[1] * (dim + 1))
    torch.testing.assert_close(att, ref)
    seen = []
    m.generator.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 2:].clone()))
    terms = m.training_loss(image, x0, t=t, noise=noise, generator=torch.Generator().manual_seed(5))
    x_t_att = m.process.q_sample(x0s * ref, t, noise)  # Eq. 4's input: q(x_t^att | x_0 * A_D)
    torch.testing.assert_close(seen[-1], x_t_att)
    assert not torch.allclose(seen[-1], m.process.q_sample(x0s, t, noise), atol=1e-3)  # A_D changed it
    # the loss is ||x0 - x_theta||^2 on the diffused label space (x0_hat = 2 softmax - 1)
    z = torch.Generator().manual_seed(5)
    [torch.randn(x0.shape, generator=z) for _ in range(2)]
    x0_hat = 2 * torch.softmax(m(image, x_t_att, t, torch.randn(2, 100, generator=z)), 1) - 1
    torch.testing.assert_close(terms["loss"], ((x0_hat - x0s) ** 2).mean())
    m_off = _model(arch, attention=False)
    m_off.load_state_dict(m.state_dict())
    m_off.generator.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 2:].clone()))
    m_off.training_loss(image, x0, t=t, noise=noise)
    torch.testing.assert_close(seen[-1], m.process.q_sample(x0s, t, noise))  # ablation: plain x_t


def test_discriminator_loss_trains_only_the_discriminator(arch, spatial, monkeypatch):
    """The non-saturating GAN loss of D by hand, with a stub D(x_prev, x_t) = w mean(x_prev) + mean(x_t) / 2 (w = 1)
    on a known real pair (x_prev = 2 and 1 for the two samples, x_t = 0.4) and a known fake x_hat_{t-1} = -1:
    real logits 2.2, 1.2 (label 1), fake logits -0.8 (label 0), so
    d_real = mean softplus(-logit) = (ln(1 + e^-2.2) + ln(1 + e^-1.2)) / 2 = (0.105083 + 0.263282) / 2 = 0.184183,
    d_fake = mean softplus(logit) = ln(1 + e^-0.8) = 0.371101 (real and fake labels swapped: 1.884183, 1.171101);
    dloss/dw = -(2 sigmoid(-2.2) + sigmoid(-1.2)) / 2 - sigmoid(-0.8) = -0.215488 - 0.310026 = -0.525514.
    The fake pair keeps the real pair's x_t. With the real D: only D gets gradients (the generator is frozen)."""
    m = _model(arch).train()
    terms = m(torch.randn(2, 2, *spatial), _onehot(spatial), None, mode="discriminator_loss")
    terms["loss"].backward()
    assert all(p.grad is not None for p in m.discriminator.parameters())
    assert all(p.grad is None for p in [*m.generator.parameters(), *m.mapping.parameters()])  # generator frozen
    assert m.extra_optimised() == {"discriminator": m.discriminator}

    class StubD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, x_prev, x_t, t, stage=None):
            return self.w * x_prev.flatten(1).mean(1) + x_t.flatten(1).mean(1) / 2

    x0 = _onehot(spatial)
    x_prev = torch.tensor([2.0, 1.0]).reshape(2, 1, *[1] * len(spatial)).expand(x0.shape).clone()
    x_t = torch.full(x0.shape, 0.4)
    seen = []
    m.discriminator = StubD()
    monkeypatch.setattr(m, "_real_pair", lambda x0s, t, generator: (x_prev, x_t))
    monkeypatch.setattr(m.process, "posterior_sample",
                        lambda x0_hat, xt, t, noise: seen.append(xt) or torch.full(x0.shape, -1.0))
    terms = m(torch.randn(2, 2, *spatial), x0, None, mode="discriminator_loss")
    assert seen and seen[0] is x_t
    assert terms["d_real"].item() == pytest.approx(0.184183, abs=1e-6)
    assert terms["d_fake"].item() == pytest.approx(0.371101, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.184183 + 0.371101, abs=2e-6)
    terms["loss"].backward()
    assert m.discriminator.w.grad.item() == pytest.approx(-0.525514, abs=1e-6)


# -- sampling ------------------------------------------------------------------------------------------------------
def test_sampler_by_hand_and_no_discriminator(arch, spatial):
    m = _model(arch)
    _randomise_latent(m)
    calls = []
    m.discriminator.register_forward_hook(lambda *a: calls.append(1))
    image = torch.randn(1, 2, *spatial, generator=torch.Generator().manual_seed(3))
    probs, unc = m.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(1),
                          return_uncertainty=True, uncertainty="std")
    assert not calls and probs.shape == (1, 3, *spatial) and unc.shape == (1, 1, *spatial)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 3, *spatial), generator=g)
    a1, a2 = math.exp(-0.05 - 19.9 / 8), math.exp(-0.1 - 19.9 / 2)
    b2 = 1 - a2 / a1
    for t in (1, 0):  # plain x_t (no attention at inference), a fresh z per step, Eq. 2
        p = torch.softmax(m(image.repeat(2, 1, *[1] * len(spatial)), x, torch.full((2,), t),
                            torch.randn((2, 100), generator=g)), 1)
        x0_hat = 2 * p - 1
        eps = torch.randn(x.shape, generator=g)
        if t == 1:
            x = (math.sqrt(a1) * b2 * x0_hat + math.sqrt(1 - b2) * (1 - a1) * x) / (1 - a2) + math.sqrt(
                b2 * (1 - a1) / (1 - a2)) * eps
    torch.testing.assert_close(probs[0], p.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unc[0], p.std(0, unbiased=False).mean(0, keepdim=True), atol=1e-5, rtol=1e-4)
    assert unc.max() > 0  # two z, two different samples


def test_sampler_seeded_regression():
    from tests.conftest import ARCH_2D
    m = _model(ARCH_2D, channels=1)
    _randomise_latent(m)
    x = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    probs, unc = m.sample(x, steps=2, samples=3, generator=torch.Generator().manual_seed(0),
                          return_uncertainty=True)
    got = [probs[0, 0, 3, 5].item(), probs[0, 2, 12, 9].item(), unc.mean().item()]
    assert got == pytest.approx(REGRESSION, abs=2e-4)  # pinned to 4 decimals


REGRESSION = [0.3778, 0.3297, 0.0079]


def test_attention_stage():
    arch = {"n_stages": 5, "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]}
    assert attention_stage(arch, 8) == 3 and attention_stage(arch, 16) == 4 and attention_stage(arch, 1) == 0
    aniso = {"n_stages": 4, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}
    assert attention_stage(aniso, 4) == 2  # by the largest (in-plane) stride: 1, 2, 4, 8


# -- trainer with two optimizers and the CLIs end to end ------------------------------------------------------------
IDS = STANDARD_IDS
NAMES = dataset_names(IDS)


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet_cdal"), "cDALPlans", samples_per_step=2)


def _fold(env, dim, fold=0):
    return os.path.join(env["nnUNet_results"], NAMES[dim], f"cDALTrainer__cDALPlans__{CONFIG[dim]}", f"fold_{fold}")


def _train(dim, *extra):
    from diffnnunet.cli import train
    train.main([str(IDS[dim]), "cDALTrainer", "0", "-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--no-tune", *extra])


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_cli_plan_train_continue_predict(env, dim, tmp_path):
    from diffnnunet.cli import predict
    from diffnnunet.cli.train import load_trainer
    from diffnnunet.utils import load_checkpoint_safely
    _train(dim)
    ckpt = load_checkpoint_safely(os.path.join(_fold(env, dim), "checkpoint_final.pth"))
    main, disc = ckpt["optimizer_state"], ckpt["extra_optimizers"]["discriminator"]["optimizer_state"]
    for state in (main, disc):  # both optimizers stepped once per iteration
        assert {int(s["step"]) for s in state["state"].values()} == {2}
    trainer = load_trainer(str(IDS[dim]), "cDALTrainer", "0", CONFIG[dim], device=torch.device("cpu"))
    trainer.initialize()
    n_disc = len(list(trainer.method.discriminator.parameters()))
    assert len(disc["param_groups"][0]["params"]) == n_disc
    assert len(main["param_groups"][0]["params"]) == len(list(trainer.method.parameters())) - n_disc
    trainer.load_checkpoint(os.path.join(_fold(env, dim), "checkpoint_final.pth"))  # as --continue does
    resumed = trainer.extra_optimizers["discriminator"].state_dict()
    for k, v in disc["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed["state"][k][name], v[name])
    if dim == 2:
        _train(dim, "--epochs", "2", "--continue")
        final = load_checkpoint_safely(os.path.join(_fold(env, dim), "checkpoint_final.pth"))
        assert final["current_epoch"] == 2
        assert {int(s["step"]) for s in final["extra_optimizers"]["discriminator"]["optimizer_state"]["state"]
                .values()} == {4}
    out = str(tmp_path / "pred")
    images = os.path.join(env["nnUNet_raw"], NAMES[dim], "imagesTs")
    predict.main(["-i", images, "-o", out, "-d", str(IDS[dim]), "-tr", "cDALTrainer", "-f", "0", "-device", "cpu",
                  "-npp", "0", "--save_uncertainty", "--save_probabilities"])
    for case in sorted({f[:-12] for f in os.listdir(images)}):
        src = image_geometry(os.path.join(images, case + "_0000.nii.gz"))
        for path in (os.path.join(out, case + ".nii.gz"), os.path.join(out, case + "_uncertainty.nii.gz")):
            got = image_geometry(path)
            assert got[0] == src[0]
            for a, b in zip(got[1:], src[1:]):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        probs = np.load(os.path.join(out, case + ".npz"))["probabilities"]
        assert probs.shape[0] == 3
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-3)


# -- DDP: both networks' steps go through the wrapper -----------------------------------------------------------------
def _ddp_worker(out_dir: str):
    """One gloo rank: two iterations of the trainer's own train_step (discriminator step, then generator step) on a
    stand-in trainer with a different batch per rank; rank 0 saves whether both networks stayed equal and moved."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch.distributed as dist

    from diffnnunet.trainers.diffusion_trainer import DiffusionTrainer
    from diffnnunet.trainers.distributed import DistributedMixin
    from diffnnunet.trainers.optimizers import MultiOptimizerMixin
    from tests.conftest import ARCH_2D
    rank = dist.get_rank()
    method = _model(ARCH_2D).train()
    start = {k: torch.cat([p.detach().flatten().clone() for p in net.parameters()])
             for k, net in (("g", method.generator), ("d", method.discriminator))}
    ddp = DistributedMixin.wrap_ddp(SimpleNamespace(device=torch.device("cpu")), method)
    disc = torch.optim.AdamW(method.discriminator.parameters(), 1e-2)
    fake = SimpleNamespace(device=torch.device("cpu"), network=ddp, method=method, grad_scaler=None,
                           _autocast=nullcontext, _encode=lambda target: (target, None),
                           extra_optimizers={"discriminator": disc}, extra_grad_scalers={"discriminator": None},
                           update_ema=lambda: None)
    for name in ("step_extra_optimizers", "extra_parameter_groups", "optimizer_step", "main_parameters"):
        setattr(fake, name, getattr(MultiOptimizerMixin, name).__get__(fake))
    fake.optimizer = torch.optim.AdamW(fake.main_parameters(), 1e-2)
    torch.manual_seed(100 + rank)
    for step in range(2):
        batch = {"data": torch.randn(2, 2, 16, 16), "target": _onehot((16, 16), seed=10 * rank + step)}
        terms = DiffusionTrainer.train_step(fake, batch)
    result = {"terms": sorted(terms)}
    for k, net in (("g", method.generator), ("d", method.discriminator)):
        now = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered = [torch.empty_like(now) for _ in range(2)]
        dist.all_gather(gathered, now)
        result[k] = (torch.equal(gathered[0], gathered[1]), float((now - start[k]).abs().max()))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))


def test_two_gloo_ranks_sync_both_networks(tmp_path):
    from diffnnunet.trainers.distributed import launch
    launch(_ddp_worker, (str(tmp_path),), 2, "cpu")
    r = torch.load(tmp_path / "result.pt")
    assert r["terms"] == ["d_fake", "d_real", "discriminator_loss", "loss", "mse"]
    for k in ("g", "d"):
        equal, moved = r[k]
        assert equal and moved > 1e-4, (k, r)  # different batches per rank, yet identical weights: synced


# -- recipe "paper": attention on the {0, 1} label, two discriminator steps, residual blocks -------------------------
def test_paper_attention_multiplies_the_01_label(arch, spatial):
    """Sec. 2.2, x0_att = x0 * A_D on the {0, 1} label, diffused as 2 x0_att - 1: background stays at -1 (the
    recipe's (2 x0 - 1) A_D pulls it towards 0, i.e. p = 1/2); foreground becomes 2 A_D - 1."""
    m = _model(arch, attention_on="label")
    x0 = _onehot(spatial)
    t, noise = torch.tensor([0, 1]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    seen = []
    m.generator.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 2:].clone()))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.training_loss(torch.randn(2, 2, *spatial), x0, t=t, noise=noise, generator=g)
        g = torch.Generator().manual_seed(5)
        pair = m.process.q_sample_pair(2 * x0 - 1, t, *[torch.randn(x0.shape, generator=g) for _ in range(2)])
        a_d = m.attention_map(*pair, t)
    x0_att = torch.where(x0 > 0, 2 * a_d - 1, -torch.ones_like(x0))  # by hand, per voxel
    torch.testing.assert_close(seen[-1], m.process.q_sample(x0_att, t, noise))
    signed = _model(arch)
    signed.load_state_dict(m.state_dict())
    signed.generator.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 2:].clone()))
    with torch.no_grad():
        signed.training_loss(torch.randn(2, 2, *spatial), x0, t=t, noise=noise,
                             generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[-1], m.process.q_sample((2 * x0 - 1) * a_d, t, noise))
    with pytest.raises(ValueError, match="attention_on"):
        _model(arch, attention_on="both")


def test_paper_two_discriminator_steps_per_generator_step(arch, spatial):
    """The trainer steps D once per part of extra_steps: the paper's real step, then its fake step on the same x_t
    (Sec. 2.2); the recipe's one step on the summed loss."""
    from types import SimpleNamespace

    from diffnnunet.trainers.optimizers import MultiOptimizerMixin
    m = _model(arch, discriminator_steps=2).train()
    assert m.extra_steps() == {"discriminator": ("real", "fake")}
    assert _model(arch).extra_steps() == {"discriminator": (None,)}
    calls, inputs = [], []
    m.discriminator.register_forward_pre_hook(lambda mod, args: inputs.append(args[1].detach().clone()))
    optimizer = torch.optim.SGD(m.discriminator.parameters(), lr=0.1)

    def step(loss, opt, scaler, params):
        loss.backward()
        calls.append(loss.detach())
        opt.step()

    trainer = SimpleNamespace(network=m, extra_optimizers={"discriminator": optimizer},
                              extra_parameter_groups=lambda: {"discriminator": list(m.discriminator.parameters())},
                              extra_grad_scalers={"discriminator": None}, optimizer_step=step,
                              _autocast=lambda: torch.autocast("cpu", enabled=False))
    torch.manual_seed(0)
    terms = MultiOptimizerMixin.step_extra_optimizers(trainer, torch.randn(2, 2, *spatial), _onehot(spatial), None)
    assert len(calls) == 2 and set(terms) == {"discriminator_loss", "d_real", "d_fake"}
    torch.testing.assert_close(terms["discriminator_loss"], calls[0] + calls[1])
    torch.testing.assert_close(terms["d_real"], calls[0])
    assert len(inputs) == 2 and torch.equal(inputs[0], inputs[1])  # the fake pair shares the real pair's x_t
    with pytest.raises(ValueError, match="discriminator_steps"):
        _model(arch, discriminator_steps=3)


def test_paper_residual_blocks_in_generator_and_discriminator(arch, spatial, dim):
    """residual_blocks: every stage of both networks is convs(x) + shortcut(x) (identity or a strided 1x1 conv)."""
    m = _model(arch, residual_blocks=True)
    plain = _model(arch)
    stages = [*m.generator.encoder.stages, *m.generator.dec_stages, *m.discriminator.encoder.stages]
    assert all(s.residual for s in stages) and not any(s.residual for s in plain.generator.encoder.stages)
    stage = m.discriminator.encoder.stages[1]  # 4 -> 8 channels, stride 2: a projected shortcut
    assert stage.shortcut is not None and list(stage.shortcut.stride) == stage.stride
    x = torch.randn(1, 4, *spatial)
    with torch.no_grad():
        temb = m.discriminator.time_embed(torch.tensor([1]))
        torch.testing.assert_close(stage(x, temb), stage._convs(x, temb) + stage.shortcut(x))
    same = m.generator.dec_stages[-1]  # 2 F0 -> F0: projected; a shape-keeping stage has the identity
    from diffnnunet.networks.time_unet import UNetEncoder
    enc = UNetEncoder(4, 2, [4, 4], arch["conv_op"], arch["kernel_sizes"][:2], [[1] * dim] * 2, [2, 2], residual=True,
                      norm_op=arch["norm_op"], nonlin=arch["nonlin"])
    assert enc.stages[1].shortcut is None and same.shortcut is not None
    with torch.no_grad():
        h = enc.stages[0](x)
        torch.testing.assert_close(enc.stages[1](h), enc.stages[1]._convs(h) + h)
    assert sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in plain.parameters())
    # the planner's memory proxy counts the residual sums and projections of the network the plans build
    assert CDAL.feature_map_size(arch, 2, 3, spatial, {"residual_blocks": True}) > CDAL.feature_map_size(
        arch, 2, 3, spatial)
