"""The benchmark's naive mode must compute what the fast sampler computes, or its speed-up means nothing."""
import torch

from diffnnunet.methods import DiffUNet
from tests.helpers import load_benchmark


def test_naive_diff_unet_sampler_matches_the_batched_one(arch, spatial):
    bench = load_benchmark("inference")
    torch.manual_seed(0)
    method = DiffUNet(arch, 2, 3, {"timesteps": 1000}).eval()
    image = torch.randn(1, 2, *spatial)
    calls = []
    method.feature_encoder.register_forward_hook(lambda *_: calls.append(1))
    fast = method.sample(image, steps=3, samples=2, generator=torch.Generator().manual_seed(4), chunk=2)
    assert len(calls) == 1
    naive = bench.naive_diff_unet_sample(method, image, 3, 2, torch.Generator().manual_seed(4))
    assert len(calls) == 1 + 3 * 2  # the naive path re-encodes the image at every step of every chain
    torch.testing.assert_close(naive, fast, atol=1e-5, rtol=1e-4)
