"""Training timesteps and the plans keys of removed switches (diffnnunet.methods.base.REMOVED_PLANS_KEYS): plans of
earlier versions load with a key at its old default-off value and fail at method construction with it on."""
import pytest
import torch

from diffnnunet.methods import METHODS
from diffnnunet.methods.base import REMOVED_PLANS_KEYS
from diffnnunet.planners.diffusion_planner import DEFAULT_DIFFUSION
from diffnnunet.processes import BernoulliProcess
from tests.conftest import ARCH_2D


def test_training_timesteps_are_the_uniform_draw():
    """The exact randint draw (the seeded regressions of every method stay valid)."""
    proc = BernoulliProcess(1000)
    got = proc.sample_timesteps(16, "cpu", torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_removed_plans_keys_load_off_and_fail_on(name):
    settings = dict(DEFAULT_DIFFUSION[name], mirror_chains=False, anchor_in_map=False, recycling=0.0,
                    aux_head_weight=0, timestep_bias=0.0)
    assert set(REMOVED_PLANS_KEYS) <= set(settings)
    METHODS[name](ARCH_2D, 1, 2, settings)
    for key, on in (("recycling", 0.5), ("mirror_chains", True)):
        with pytest.raises(ValueError, match=rf"^plans key '{key}' was removed in this version \(measured no "
                                             r"better\); delete it from the plans$"):
            METHODS[name](ARCH_2D, 1, 2, dict(settings, **{key: on}))
