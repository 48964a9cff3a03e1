"""One meaning of every plans key: a key deleted from a planned diffusion section means the same value to the network
(built by :func:`build_method`, as the trainer builds it), to its loss and sampler, and to the predictor's settings."""
from types import SimpleNamespace

import pytest
import torch

from diffnnunet.config import DEFAULT_DIFFUSION, PLANS_WITHOUT_KEY, method_defaults, resolve_diffusion
from diffnnunet.inference.predictor import DiffusionPredictor
from diffnnunet.methods import build_method
from tests.conftest import ARCH_2D


def planned_section(method: str) -> dict:
    """What the planner writes for ``method`` on a tiny 2D configuration (defaults + derived keys)."""
    from diffnnunet.methods import METHODS
    plan = {"architecture": {"arch_kwargs": ARCH_2D}, "patch_size": [16, 16], "batch_size": 2}
    return METHODS[method].configure_plans(method_defaults(method), plan)


def deletions(section: dict):
    """Every key of ``section`` (nested ones as ``outer.inner``) but the method's name."""
    for key, value in section.items():
        if key == "method":
            continue
        yield key
        if isinstance(value, dict):
            yield from (f"{key}.{inner}" for inner in value)


def without(section: dict, path: str) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in section.items()}
    outer, _, inner = path.partition(".")
    (out[outer].pop(inner) if inner else out.pop(outer))
    return out


def build(section: dict):
    torch.manual_seed(0)
    cm = SimpleNamespace(configuration={"diffusion": section}, network_arch_init_kwargs=ARCH_2D)
    return build_method(SimpleNamespace(plans_name="P"), cm, 1, 3).eval()


def behaviour(net) -> list:
    """Seeded loss terms (fixed t and noise) and a 2-step x 2-sample sample with its map, on one tiny batch."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 16, 16, generator=g)
    x0 = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 16, 16), generator=g), 3).movedim(-1, 1).float()
    t = torch.tensor([0, 1])
    noise = torch.randn(2, net.latent_channels if hasattr(net, "latent_channels") else 3, 16, 16, generator=g)
    if hasattr(net, "latent_channels"):  # LDSeg's noise lives in its latent
        noise = None
    loss = net.training_loss(image, x0, None, generator=torch.Generator().manual_seed(1), t=t, noise=noise)
    probs, unc = net.sample(image, 2, 2, generator=torch.Generator().manual_seed(2), return_uncertainty=True,
                            uncertainty="mutual_information")
    return [loss["loss"].detach(), probs, unc]


@pytest.mark.parametrize("method", sorted(DEFAULT_DIFFUSION))
def test_a_deleted_key_means_one_value_everywhere(method):
    planned = planned_section(method)
    changed = 0
    predictor = DiffusionPredictor(device=torch.device("cpu"))
    for path in deletions(planned):
        missing = without(planned, path)
        resolved = resolve_diffusion(missing)
        net = build(missing)
        assert net.settings == resolved, path  # the network was built from the resolved section
        predictor.configuration_manager = SimpleNamespace(configuration={"diffusion": missing})
        predictor._configure_sampling()
        assert predictor.diffusion == resolved, path  # the sampler's settings are the network's
        outer, _, inner = path.partition(".")
        if outer not in resolved or resolved[outer] == planned[outer]:  # the same value either way, or a key the
            continue  # planner derives from the configuration (the network derives it again, nothing else reads it)
        changed += 1
        explicit = dict(planned, **{outer: resolved[outer]})  # the key written out with its resolved value
        reference = build(explicit)
        reference.load_state_dict(net.state_dict())
        for got, want in zip(behaviour(net), behaviour(reference)):
            torch.testing.assert_close(got, want, msg=path)
    # exactly the keys whose meaning predates them resolve to another value than the planner's current one
    assert changed == sum(PLANS_WITHOUT_KEY.get(method, {})[k] != planned[k]
                          for k in PLANS_WITHOUT_KEY.get(method, {}))


def test_resolution_fills_nested_keys_and_the_plans_win():
    section = {"method": "cdal", "loss_weights": {"dice": 0.5}, "timesteps": 4}
    resolved = resolve_diffusion(section)
    assert resolved["loss_weights"] == {"mse": 1.0, "dice": 0.5}
    assert resolved["timesteps"] == 4 and resolved["schedule"] == "vp"
    assert resolve_diffusion({"method": "medsegdiff_v2"})["x0_output"] == "linear"  # older plans, as trained
    assert method_defaults("medsegdiff_v2")["x0_output"] == "sigmoid"  # what the planner writes now
    # a MedSegDiff-V2 model planned before the anchor entered the output was tuned on the chains alone
    assert (resolve_diffusion({"method": "medsegdiff_v2"})["anchor_weight"], method_defaults("medsegdiff_v2")
            ["anchor_weight"]) == (0.0, 0.5)
    assert "paper_recipe" not in resolved and resolved["optimizer"]["initial_lr"] == 1e-3
    with pytest.raises(ValueError, match="unknown diffusion method 'nope'"):
        resolve_diffusion({"method": "nope"})
