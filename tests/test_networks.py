import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from diffnnunet.networks import TimeUNet, UNetEncoder, resolve_arch_kwargs


def test_time_unet_shapes(arch, spatial):
    net = TimeUNet(3, 4, **arch)
    out = net(torch.randn(2, 3, *spatial), torch.tensor([0, 999]))
    assert out.shape == (2, 4, *spatial)


def test_time_changes_the_output(arch, spatial):
    torch.manual_seed(0)
    net = TimeUNet(1, 2, **arch).eval()
    x = torch.randn(1, 1, *spatial)
    assert not torch.allclose(net(x, torch.tensor([1])), net(x, torch.tensor([900])))


def test_encoder_stage_shapes_follow_anisotropic_strides():
    from tests.conftest import ARCH_3D
    enc = UNetEncoder(2, **{k: v for k, v in ARCH_3D.items() if k != "n_conv_per_stage_decoder"})
    skips = enc(torch.randn(1, 2, 4, 16, 16))
    assert [tuple(s.shape[2:]) for s in skips] == [(4, 16, 16), (4, 8, 8), (2, 4, 4)]
    assert enc.stages[0].first.convs[0].conv.kernel_size == (1, 3, 3)


def test_feature_map_count_matches_nnunet_without_time(arch, spatial):
    """The planner's VRAM proxy uses nnU-Net's convention: without time embedding it equals PlainConvUNet's."""
    ours = TimeUNet(2, 3, **arch, time_embedding=False).compute_conv_feature_map_size(spatial)
    ref = PlainConvUNet(input_channels=2, num_classes=3, deep_supervision=False,
                        **resolve_arch_kwargs(arch)).compute_conv_feature_map_size(spatial)
    assert ours == ref
    with_time = TimeUNet(2, 3, **arch).compute_conv_feature_map_size(spatial)
    assert with_time > ours


def test_resolve_arch_kwargs_names_bad_class():
    with pytest.raises(ImportError, match="torch.nn.NoSuchConv"):
        resolve_arch_kwargs({"conv_op": "torch.nn.NoSuchConv"})


def test_feature_map_size_is_int():
    from tests.conftest import ARCH_2D
    assert isinstance(TimeUNet(1, 2, **ARCH_2D).compute_conv_feature_map_size((16, 16)), (int, np.integer))
