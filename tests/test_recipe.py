"""The training recipe: the EMA of the weights (trainers/ema.py) against hand-computed values, and the planner's
configured vs. the papers' recipe."""
import pytest
import torch

from diffnnunet.config import DEFAULT_DIFFUSION, DEFAULT_RECIPE, training_recipe
from diffnnunet.trainers.ema import WeightEMA, ema_decay


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


@pytest.mark.parametrize("method", sorted(DEFAULT_DIFFUSION))
def test_paper_recipe_has_no_ema_and_default_does(method):
    paper, default = training_recipe(DEFAULT_DIFFUSION[method], "paper"), training_recipe(DEFAULT_DIFFUSION[method])
    assert paper["recipe"] == "paper" and not paper["ema"]["enabled"]
    assert paper["optimizer"] == DEFAULT_DIFFUSION[method]["paper_recipe"]["optimizer"]
    own = DEFAULT_DIFFUSION[method].get("default_recipe", {})
    assert default["recipe"] == "default" and default["ema"]["enabled"] == own.get("ema", {}).get("enabled", True)
    assert default["optimizer"] == {**DEFAULT_RECIPE["optimizer"], **own.get("optimizer", {})}
    with pytest.raises(ValueError, match="unknown training recipe"):
        training_recipe(DEFAULT_DIFFUSION[method], "fast")


def test_a_methods_default_recipe_overrides_only_its_own_entries():
    """MedSegDiff-V2 trains without the weight EMA (measured, benchmarks.md) and keeps the configured optimizer and
    the EMA's other settings; the other methods keep the shared default."""
    recipe = training_recipe({"default_recipe": {"ema": {"enabled": False}}})
    assert recipe["ema"] == {**DEFAULT_RECIPE["ema"], "enabled": False}
    assert recipe["optimizer"] == DEFAULT_RECIPE["optimizer"]
    assert DEFAULT_RECIPE["ema"]["enabled"]  # the shared default is not modified
    assert not training_recipe(DEFAULT_DIFFUSION["medsegdiff_v2"])["ema"]["enabled"]
    assert training_recipe(DEFAULT_DIFFUSION["diff_unet"])["ema"]["enabled"]
