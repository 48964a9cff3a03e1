"""Test-time mirroring of the sampler (DiffusionPredictor, ``use_mirroring``): every chain runs on every mirror view
of the window and comes back flipped; without it the chains run on the window as it is. Hand-computed values in 2D
and 3D."""
import pytest
import torch

from diffnnunet.methods.uncertainty import MEASURES, ChainStatistics

#: binary entropy in bits, by hand: h(0.8) = 0.721928
H08 = 0.721928


class _TopBottom(torch.nn.Module):
    """A stand-in method that is not mirror-equivariant: every chain gives class probabilities (0.8, 0.2) in the
    first half of the window along the first spatial axis and (0.2, 0.8) in the second half, whatever the image."""
    probabilities = "categorical"
    categorical_chains = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, x, steps, samples, generator=None, chunk=None, return_uncertainty=False, uncertainty="entropy"):
        self.calls.append(samples)
        n = x.shape[2]
        q = torch.where(torch.arange(n) < n // 2, 0.8, 0.2).reshape(1, 1, 1, n, *([1] * (x.ndim - 3)))
        p = torch.cat([q, 1 - q], 2).expand(x.shape[0], samples, 2, *x.shape[2:])
        chains = ChainStatistics(categorical=True)
        chains.add(p)
        return (chains.mean(), chains.map(uncertainty)) if return_uncertainty else chains.mean()


def _predictor(dim, samples, measure="mutual_information", mirroring=False):
    from diffnnunet.inference import DiffusionPredictor
    p = DiffusionPredictor(use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False,
                           perform_everything_on_device=False, save_uncertainty=True, uncertainty=measure)
    p.network = _TopBottom()
    p.configuration_manager = type("CM", (), {"patch_size": (6, 4) if dim == 2 else (6, 4, 2), "batch_size": 2})()
    p.diffusion = {"sampling_steps": 1, "samples_per_step": samples}
    p.allowed_mirroring_axes = tuple(range(dim))
    return p


@pytest.mark.parametrize("measure", MEASURES)
def test_without_mirroring_every_chain_runs_on_the_window_as_it_is(dim, measure):
    """One call with all S chains on the unflipped window: every chain gives 0.8 in the first half, so the chains
    agree: entropy h(0.8) = 0.721928, mutual information and std 0."""
    x = torch.zeros(3, 1, *((6, 4) if dim == 2 else (6, 4, 2)))
    p = _predictor(dim, 3, measure)
    with torch.inference_mode():
        probs, unc = p._sample_windows(x)
    assert p.network.calls == [3]
    torch.testing.assert_close(probs[:, 0, :3], torch.full_like(probs[:, 0, :3], 0.8), atol=1e-6, rtol=0)
    off = {"entropy": H08, "mutual_information": 0.0, "std": 0.0}[measure]
    torch.testing.assert_close(unc, torch.full_like(unc, off), atol=2e-6, rtol=0, msg=measure)


def test_full_mirroring_runs_every_chain_on_every_view(dim):
    """``use_mirroring`` (``--mirror``): all S chains on each of the 4 (2D) or 8 (3D) mirror combinations, the
    probabilities averaged: half the views flip the first axis, so the first half's probability is 0.5. Each
    view's chains agree, and the views' maps are averaged (not pooled): mutual information 0."""
    x = torch.zeros(2, 1, *((6, 4) if dim == 2 else (6, 4, 2)))
    p = _predictor(dim, 2, mirroring=True)
    with torch.inference_mode():
        probs, unc = p._sample_windows(x)
    assert p.network.calls == [2] * (4 if dim == 2 else 8)
    torch.testing.assert_close(probs[:, 0], torch.full_like(probs[:, 0], 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(unc, torch.zeros_like(unc), atol=1e-6, rtol=0)
