"""BerDiff method: loss (Eqs. 7-9) and its K = 2 equivalence with the paper, label/region modes, sampler
(Algorithm 2) shapes, uncertainty and a seeded regression, and the CLIs end to end on tiny 2D/3D multi-class data."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from diffnnunet.cli import predict, train
from diffnnunet.config import DEFAULT_DIFFUSION
from diffnnunet.methods import BerDiff
from diffnnunet.networks import resolve_arch_kwargs
from diffnnunet.processes import BernoulliProcess
from diffnnunet.trainers import default_plans_for
from diffnnunet.utils import expand_to
from tests.helpers import CONFIG, STANDARD_IDS, dataset_names, image_geometry, module_cli_env


def _model(arch, channels=2, classes=3, **diffusion):
    torch.manual_seed(0)
    return BerDiff(resolve_arch_kwargs(arch), channels, classes, {**DEFAULT_DIFFUSION["berdiff"], **diffusion}).eval()


def _labels(classes, spatial, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(torch.randint(0, classes, (batch, *spatial), generator=g), classes).movedim(-1, 1).float()


def test_trainer_plans_build_a_working_berdiff(arch, spatial):
    """BerDiffTrainer's default plans are the plans file of the method it trains; a configuration whose diffusion
    section names that method builds, through the one builder training and inference share, a BerDiff with the
    paper's linear schedule (betas 1e-4 .. 0.02) that samples M = 2 image channels into N = 3 label channels."""
    from types import SimpleNamespace

    from diffnnunet.methods import build_method
    from diffnnunet.trainers import get_trainer_class
    trainer = get_trainer_class("BerDiffTrainer")
    plans = SimpleNamespace(plans_name=default_plans_for(trainer))
    config = SimpleNamespace(configuration={"diffusion": {"method": trainer.method_name}},
                             network_arch_init_kwargs=arch)
    net = build_method(plans, config, 2, 3).eval()
    assert isinstance(net, BerDiff) and net.plans_name == plans.plans_name
    torch.testing.assert_close(net.process.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    probs = net.sample(torch.randn(1, 2, *spatial), 1, 1, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (1, 3, *spatial)


def test_loss_terms_shapes_and_gradients(arch, spatial):
    m = _model(arch).train()
    out = m.training_loss(torch.randn(2, 2, *spatial), _labels(3, spatial), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "kl", "bce", "dice"} and out["loss"].ndim == 0
    out["loss"].backward()
    assert all(p.grad is not None for p in m.network.parameters())
    assert m(torch.randn(1, 2, *spatial)).shape == (1, 3, *spatial)  # nnU-Net's bare network(x) call


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_binary_labels_are_the_papers_bernoulli_loss(arch, spatial, prediction):
    """Binary label dataset (one-hot [bg, fg]): the categorical K = 2 loss equals the paper's Bernoulli loss on the
    foreground channel with eps_hat = sigmoid(l_fg - l_bg): KL of Eq. 8 (decoder NLL at t = 1) + BCE of Eq. 9.
    Under x0-prediction sigmoid(l_fg - l_bg) is y0_hat, eps_hat = |y_t - y0_hat| and the BCE is against y_0."""
    m = _model(arch, classes=2, prediction=prediction)
    assert m.probabilities == "categorical"
    x0, image = _labels(2, spatial, batch=4), torch.randn(4, 2, *spatial)
    mask = (torch.rand(4, 1, *spatial, generator=torch.Generator().manual_seed(5)) > 0.2).float()
    seen = {}
    m.network.register_forward_hook(lambda mod, inp, out: seen.update(logits=out, y_t=inp[0][:, 2:]))
    got = m.training_loss(image, x0, mask, generator=torch.Generator().manual_seed(1))
    bern = BernoulliProcess()
    g = torch.Generator().manual_seed(1)
    t = bern.sample_timesteps(4, "cpu", g)
    y = x0[:, 1:]
    noise = bern.sample_noise(y, t, g)
    y_t = bern.q_sample(y, t, noise)
    torch.testing.assert_close(seen["y_t"][:, 1:], y_t)
    logit = seen["logits"][:, 1:] - seen["logits"][:, :1]
    if prediction == "eps":
        eps_hat = torch.sigmoid(logit)
        p_fg = (y_t - eps_hat).abs()
        bce = F.binary_cross_entropy(eps_hat, noise, reduction="none")
    else:
        p_fg = torch.sigmoid(logit)
        eps_hat = (y_t - p_fg).abs()
        bce = F.binary_cross_entropy(p_fg, y, reduction="none")
    mu = bern.calibrate(y_t, eps_hat, t)
    vb = torch.where(expand_to(t == 0, y) > 0, bern.decoder_nll(y, mu), bern.kl(bern.posterior(y_t, y, t), mu))
    kl = (vb * mask).sum() / mask.sum()
    bce = (bce * mask).sum() / mask.sum()
    torch.testing.assert_close(got["kl"], kl, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got["bce"], bce, atol=1e-6, rtol=1e-4)
    # the recipe's Dice term (dice_weight 1) on y0_hat (Eq. 7), [bg, fg] = [1 - p, p], batch Dice
    probs = torch.cat([1 - p_fg, p_fg], 1) * mask
    target = x0 * mask
    axes = [0] + list(range(2, probs.ndim))
    dice = 1 - ((2 * (probs * target).sum(axes) + 1e-5) / (probs.sum(axes) + target.sum(axes) + 1e-5)).mean()
    torch.testing.assert_close(got["loss"], kl + bce + dice, atol=1e-6, rtol=1e-4)
    paper = _model(arch, classes=2, dice_weight=0.0, prediction=prediction).training_loss(
        image, x0, mask, generator=torch.Generator().manual_seed(1))
    assert "dice" not in paper
    torch.testing.assert_close(paper["loss"], kl + bce, atol=1e-6, rtol=1e-4)


def test_label_and_region_modes(arch, spatial):
    """auto: one-hot targets keep the categorical process; the first non-one-hot target (regions) switches to
    independent Bernoulli channels for good, and a checkpoint carries the mode. N = 1 is always per channel."""
    image = torch.randn(2, 2, *spatial)
    m = _model(arch)
    m.training_loss(image, _labels(3, spatial))
    assert m.probabilities == "categorical" and not bool(m.per_channel)
    regions = (torch.rand(2, 3, *spatial) > 0.5).float()
    m.training_loss(image, regions)
    assert m.probabilities == "per_channel" and m.process is m.bernoulli
    m.training_loss(image, _labels(3, spatial))  # stays per channel
    fresh = _model(arch)
    fresh.load_state_dict(m.state_dict())
    assert fresh.probabilities == "per_channel"
    assert _model(arch, classes=1).probabilities == "per_channel"
    with pytest.raises(ValueError, match="per_channel"):
        _model(arch, multiclass="categorical").training_loss(image, regions)
    with pytest.raises(ValueError, match="multiclass"):
        _model(arch, multiclass="softmax")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_shapes_samples_and_uncertainty(arch, spatial, sampler):
    m = _model(arch, sampler=sampler, saliency="samples")
    calls = []
    m.network.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    probs, unc = m.sample(torch.randn(2, 2, *spatial), steps=3, samples=5, chunk=2,
                          generator=torch.Generator().manual_seed(0), return_uncertainty=True)
    assert calls == [4] * 3 + [4] * 3 + [2] * 3  # 5 chains of 2 windows, 2 chains per forward, 3 steps each
    assert probs.shape == (2, 3, *spatial) and unc.shape == (2, 1, *spatial)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *spatial))  # mean of one-hot samples
    assert torch.allclose(probs * 5, (probs * 5).round())  # frequencies of 5 discrete samples


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_expected_saliency_by_hand(arch, spatial, prediction):
    """Regions (per-channel Bernoulli), 1 step: y_T ~ B(1/2), x0_hat = |y_T - sigmoid(logits)| (Eq. 7; under
    x0-prediction sigmoid(logits) itself) and the expected saliency is the mean of the S chains' x0_hat, the
    probability of their last draw y_0 ~ B(x0_hat); the paper's saliency (same seed, same draws) is the mean of
    those draws, a frequency of S samples."""
    m = _model(arch, multiclass="per_channel", prediction=prediction)
    seen = []
    m.network.register_forward_hook(lambda mod, inp, out: seen.append((inp[0][:, 2:].clone(), out.clone())))
    image = torch.randn(1, 2, *spatial)
    got = m.sample(image, steps=1, samples=3, chunk=1, generator=torch.Generator().manual_seed(4))
    if prediction == "eps":
        expected = sum((y - torch.sigmoid(logits)).abs() for y, logits in seen) / 3
    else:
        expected = sum(torch.sigmoid(logits) for _, logits in seen) / 3
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got * 3, (got * 3).round())  # continuous, not a frequency
    m.saliency = "samples"
    drawn = m.sample(image, steps=1, samples=3, chunk=1, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(drawn * 3, (drawn * 3).round())
    assert (drawn - got).abs().max() < 1  # the same chains: every draw lies on the side its x0_hat allows
    with pytest.raises(ValueError, match="saliency"):
        _model(arch, saliency="majority")


@pytest.mark.parametrize("saliency", ["samples", "expected"])
def test_seeded_sampler_regression(arch, spatial, dim, saliency):
    """Pinned numbers: a change in the process, the sampler or the draw order shows up here."""
    m = _model(arch, saliency=saliency, prediction="eps" if saliency == "samples" else "x0")
    image = torch.linspace(-1, 1, 2 * int(np.prod(spatial))).reshape(1, 2, *spatial)
    probs, _ = m.sample(image, steps=4, samples=3, generator=torch.Generator().manual_seed(42),
                        return_uncertainty=True)
    again = m.sample(image, steps=4, samples=3, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(probs, again)
    got = [float(v) for v in (probs[0, 0].mean(), probs[0, 1].mean())]
    assert got == pytest.approx(REGRESSION[saliency][dim], abs=2e-4)  # pinned to 4 decimals, not exact floats


REGRESSION = {"samples": {2: [0.3255, 0.306], 3: [0.3512, 0.3109]},
              "expected": {2: [0.3354, 0.4448], 3: [0.3608, 0.2217]}}


# -- CLIs end to end -------------------------------------------------------------------------------------------------
IDS = STANDARD_IDS
NAMES = dataset_names(IDS)


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet_berdiff"), "BerDiffPlans", sampling_steps=2,
                              samples_per_step=2)


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_cli_train_predict_with_uncertainty(env, dim, tmp_path):
    plans = json.load(open(os.path.join(env["nnUNet_preprocessed"], NAMES[dim], "BerDiffPlans.json")))
    assert plans["configurations"][CONFIG[dim]]["diffusion"]["method"] == "berdiff"
    train.main([str(IDS[dim]), "BerDiffTrainer", "0", "-device", "cpu", "--epochs", "1", "--iterations-per-epoch",
                "2", "--val-iterations", "1", "--no-tune"])
    fold = os.path.join(env["nnUNet_results"], NAMES[dim], f"BerDiffTrainer__BerDiffPlans__{CONFIG[dim]}", "fold_0")
    for f in ("checkpoint_final.pth", "validation/summary.json"):
        assert os.path.isfile(os.path.join(fold, f)), f
    out = str(tmp_path / "pred")
    images = os.path.join(env["nnUNet_raw"], NAMES[dim], "imagesTs")
    predict.main(["-i", images, "-o", out, "-d", str(IDS[dim]), "-tr", "BerDiffTrainer", "-f", "0", "-device", "cpu",
                  "-npp", "0", "--save_uncertainty", "--save_probabilities", "--steps", "2", "--samples", "2",
                  "--precision", "bf16" if dim == 2 else "fp32"])  # the CPU bfloat16 autocast path, end to end (2D:
    # 3D bfloat16 convolutions are slow on CPU)
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
        assert unc.min() >= 0 and unc.max() <= 1 + 1e-3  # the chains' mutual information (normalised)
        probs = np.load(os.path.join(out, case + ".npz"))["probabilities"]
        assert probs.shape[0] == 3
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-3)  # categorical: exported as log(p), softmax = p
