import numpy as np
import pytest
import torch

from diffnnunet.config import resolve_diffusion
from diffnnunet.evaluation.uncertainty import normalized_entropy
from diffnnunet.inference import probabilities_to_logits
from diffnnunet.inference.predictor import autocast_dtype


def test_regions_round_trip_through_sigmoid(dim, spatial):
    p = torch.rand(3, *spatial) * 0.98 + 0.01
    torch.testing.assert_close(torch.sigmoid(probabilities_to_logits(p, True)), p, rtol=1e-4, atol=1e-5)


def test_labels_softmax_is_the_one_hot_posterior():
    p = torch.tensor([0.9, 0.3, 0.3]).reshape(3, 1, 1)
    probs = torch.softmax(probabilities_to_logits(p, False), 0).flatten()
    unnorm = torch.tensor([0.9 * 0.7 * 0.7, 0.3 * 0.1 * 0.7, 0.3 * 0.1 * 0.7])
    torch.testing.assert_close(probs, unnorm / unnorm.sum(), rtol=1e-5, atol=1e-6)
    assert probs.argmax() == p.flatten().argmax()


def test_normalized_entropy_range_and_extremes():
    certain = np.zeros((3, 4, 4), np.float32)
    certain[1] = 1
    assert normalized_entropy(certain, False).max() == pytest.approx(0, abs=1e-6)
    uniform = np.full((3, 4, 4), 1 / 3, np.float32)
    np.testing.assert_allclose(normalized_entropy(uniform, False), 1, rtol=1e-5)
    half = np.full((2, 4, 4), 0.5, np.float32)
    np.testing.assert_allclose(normalized_entropy(half, True), 1, rtol=1e-5)
    assert normalized_entropy(certain, True).dtype == np.float32


class _Deterministic(torch.nn.Module):
    """A stand-in method whose 'sampler' is a fixed function of the window, so sliding windows can be compared."""
    probabilities = "per_channel"

    def __init__(self, dim):
        super().__init__()
        conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
        self.conv = conv(2, 3, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))

    def sample(self, x, steps, samples, generator=None, chunk=None, return_uncertainty=False, uncertainty="entropy"):
        self.autocast_seen = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        p = self(x)
        return (p, p[:, :1] * 0.5) if return_uncertainty else p


def _predictors(dim, **kwargs):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from diffnnunet.inference import DiffusionPredictor
    patch = (12, 10) if dim == 2 else (4, 12, 10)
    lm = type("LM", (), {"num_segmentation_heads": 3, "has_regions": False})()
    cm = type("CM", (), {"patch_size": patch, "batch_size": 2})()
    net = _Deterministic(dim).eval()
    out = []
    for cls in (nnUNetPredictor, DiffusionPredictor):
        p = cls(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False,
                perform_everything_on_device=False, **(kwargs if cls is DiffusionPredictor else {}))
        p.network, p.label_manager, p.configuration_manager = net, lm, cm
        if cls is DiffusionPredictor:
            p.diffusion = resolve_diffusion({"method": "diff_unet", "sampling_steps": 1, "samples_per_step": 1,
                                        "samples_per_forward": 1})
        out.append(p)
    return out


def test_batched_windows_blend_like_nnunet(dim):
    """Several windows per sampler call (and the extra uncertainty channel) change nothing in the blending:
    with a deterministic per-window function the diffusion predictor reproduces nnU-Net's sliding window."""
    stock, ours = _predictors(dim)
    data = torch.randn(2, *((2, 30, 23) if dim == 2 else (9, 30, 23)))  # 2D: nnU-Net slides over (z, y, x)
    slicers = stock._internal_get_sliding_window_slicers(data.shape[1:])
    assert len(slicers) > 4
    # float16 buffers (nnU-Net's) quantize where the Gaussian weights are tiny, differently for p and p/2: compare
    # the uncertainty channel with flat weights
    stock.use_gaussian = ours.use_gaussian = False
    with torch.inference_mode():
        ref = stock._internal_predict_sliding_window_return_logits(data, slicers, False).float()
        voxels = int(np.prod(ours.configuration_manager.patch_size))
        for k in (1, 4):
            ours.cpu_voxels_per_forward = k * voxels  # k network inputs per forward on CPU
            assert ours.windows_per_forward == k
            ours.save_uncertainty = True
            got = ours._internal_predict_sliding_window_return_logits(data, slicers, False).float()
            assert got.shape == (4, *data.shape[1:])
            torch.testing.assert_close(got[:3], ref, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(got[3:], ref[:1] * 0.5, atol=2e-3, rtol=2e-3)
            ours.save_uncertainty = False
            assert ours._internal_predict_sliding_window_return_logits(data, slicers, False).shape[0] == 3
        stock.use_gaussian = ours.use_gaussian = True
        ref = stock._internal_predict_sliding_window_return_logits(data, slicers, False).float()
        got = ours._internal_predict_sliding_window_return_logits(data, slicers, False).float()
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


def test_uncertainty_is_blended_in_float32(dim):
    """The native map is accumulated with the Gaussian weights in float32 (its fold parts are later subtracted from
    one another): it matches a float64 blend of the same windows to 1e-5, where float16 buffers are off by ~1e-3."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    _, ours = _predictors(dim, save_uncertainty=True)
    data = torch.randn(2, *((2, 30, 23) if dim == 2 else (9, 30, 23)))
    slicers = ours._internal_get_sliding_window_slicers(data.shape[1:])
    with torch.inference_mode():
        got = ours._internal_predict_sliding_window_return_logits(data, slicers, False)
        assert got.dtype == torch.float32
        g = compute_gaussian(tuple(ours.configuration_manager.patch_size), sigma_scale=1. / 8,
                             value_scaling_factor=10, device=torch.device("cpu")).double()
        acc, w = torch.zeros(data.shape[1:], dtype=torch.float64), torch.zeros(data.shape[1:], dtype=torch.float64)
        for sl in slicers:
            u = ours.network.sample(data[sl][None], 1, 1, return_uncertainty=True)[1][0, 0].double()
            acc[sl[1:]] += u * g
            w[sl[1:]] += g
    torch.testing.assert_close(got[3].double(), acc / w, atol=1e-5, rtol=1e-5)


def test_categorical_probabilities_go_through_log():
    p = torch.tensor([0.7, 0.2, 0.1]).reshape(3, 1)
    torch.testing.assert_close(torch.softmax(probabilities_to_logits(p, False, "categorical"), 0), p)


def test_autocast_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu) is None  # auto: float32 off CUDA
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16 and autocast_dtype(cpu, "fp16") is torch.float16
    assert autocast_dtype(cuda, "fp32") is None
    with pytest.raises(ValueError, match="precision 'int8'"):
        autocast_dtype(cpu, "int8")


@pytest.mark.parametrize("precision,expected", [("fp32", False), ("bf16", torch.bfloat16)])
def test_sampler_runs_under_the_requested_autocast(dim, precision, expected):
    _, ours = _predictors(dim, precision=precision)
    windows = torch.randn(2, 2, *((12, 10) if dim == 2 else (4, 12, 10)))
    with torch.inference_mode():
        probs, _ = ours._sample_windows(windows)
    assert ours.network.autocast_seen == expected
    assert probs.shape == (2, 3, *windows.shape[2:])


def test_bf16_sampling_stays_close_to_float32(arch, spatial):
    """A real sampler under bfloat16 autocast: changed (the autocast took effect), but only at bf16's precision."""
    from diffnnunet.methods import DiffUNet
    torch.manual_seed(0)
    method = DiffUNet(arch, 2, 3, {"timesteps": 1000}).eval()
    image = torch.randn(1, 2, *spatial)
    out = {}
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out[dtype] = method.sample(image, steps=2, samples=2, generator=torch.Generator().manual_seed(1))
    assert out[torch.bfloat16].dtype == torch.float32
    assert not torch.equal(out[None], out[torch.bfloat16])
    torch.testing.assert_close(out[torch.bfloat16], out[None], atol=0.05, rtol=0)


@pytest.mark.parametrize("method_name", ["diff_unet", "ldseg"])
def test_compile_targets_the_per_step_modules(arch, method_name):
    """``compile=True`` compiles the modules run at every step (LDSeg: the latent denoiser only, not the encoders),
    and nnU-Net's whole-network compile (``nnUNet_compile``) is undone, since the sampler never calls forward()."""
    from diffnnunet.methods import METHODS
    _, ours = _predictors(2 if "Conv2d" in arch["conv_op"] else 3, compile=True)
    assert ours.compile_steps
    method = METHODS[method_name](arch, 2, 3, {"timesteps": 1000}).eval()
    ours.network = torch.compile(method)
    ours._prepare_sampler_network()
    assert ours.network is method
    compiled = [m for m in method.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == method.step_modules()
    if method_name == "ldseg":
        assert compiled == [method.denoiser]


def test_cpu_sizes_inputs_per_forward_by_voxels_gpu_follows_the_plans():
    """On CPU: as many network inputs per forward as fit CPU_VOXELS_PER_FORWARD voxels (small patches: chains and
    several windows; a large patch: one chain of one window). Other devices follow the plans."""
    from diffnnunet.inference.predictor import CPU_VOXELS_PER_FORWARD
    _, ours = _predictors(3)
    ours.diffusion = resolve_diffusion({"method": "diff_unet", "sampling_steps": 10, "samples_per_step": 4,
                                      "samples_per_forward": 4, "inference_batch": 8})
    ours.configuration_manager.patch_size = (4, 16, 16)
    assert CPU_VOXELS_PER_FORWARD == 2 ** 18
    assert (ours.samples_per_forward, ours.windows_per_forward) == (4, 2 ** 18 // 1024 // 4)
    ours.configuration_manager.patch_size = (64, 64, 64)
    assert (ours.samples_per_forward, ours.windows_per_forward) == (1, 1)
    ours.configuration_manager.patch_size = (32, 64, 64)  # two inputs fit: two chains, one window
    assert (ours.samples_per_forward, ours.windows_per_forward) == (2, 1)
    ours.device = torch.device("cuda")
    assert (ours.samples_per_forward, ours.windows_per_forward) == (4, 2)
