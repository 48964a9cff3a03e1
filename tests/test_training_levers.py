"""Training timesteps and the plans keys of removed switches (diffnnunet.methods.base.REMOVED_PLANS_KEYS): plans of
earlier versions load with a key at its old default-off value; turned on, a key that did not change the weights is
ignored with one warning, one that did (an extra head) fails at method construction."""
import pytest
import torch

from diffnnunet.config import DEFAULT_DIFFUSION
from diffnnunet.methods import METHODS
from diffnnunet.methods.base import REMOVED_PLANS_KEYS
from diffnnunet.processes import BernoulliProcess
from tests.conftest import ARCH_2D


def test_training_timesteps_are_the_uniform_draw():
    """The exact randint draw (the seeded regressions of every method stay valid)."""
    proc = BernoulliProcess(1000)
    got = proc.sample_timesteps(16, "cpu", torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_removed_plans_keys_load_off_warn_or_fail_on(name, capsys):
    from diffnnunet.methods import base
    settings = dict(DEFAULT_DIFFUSION[name], mirror_chains=False, anchor_in_map=False, recycling=0.0,
                    aux_head_weight=0, timestep_bias=0.0)
    assert set(REMOVED_PLANS_KEYS) <= set(settings)
    METHODS[name](ARCH_2D, 1, 2, settings)
    assert capsys.readouterr().err == ""
    base._warned.clear()
    for key, on in (("recycling", 0.5), ("anchor_in_map", True)):
        for _ in range(2):  # one warning per key and process
            METHODS[name](ARCH_2D, 1, 2, dict(settings, **{key: on}))
        assert capsys.readouterr().err.count(f"warning: plans key '{key}' was removed") == 1
    with pytest.raises(ValueError, match=r"^plans key 'aux_head_weight' was removed in this version \(measured no "
                                         r"better\) and changed the network's weights; retrain without it"):
        METHODS[name](ARCH_2D, 1, 2, dict(settings, aux_head_weight=0.5))
