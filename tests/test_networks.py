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


def test_hooks_absent_is_the_plain_network(arch, spatial):
    """A network built with ``latent_dim`` and called without hooks or latent equals the plain one (same seed)."""
    torch.manual_seed(0)
    plain = TimeUNet(2, 3, **arch).eval()
    torch.manual_seed(0)
    hooked = TimeUNet(2, 3, **arch, latent_dim=5).eval()
    hooked.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(1, 2, *spatial), torch.tensor([10])
    torch.testing.assert_close(hooked(x, t), plain(x, t))
    # the latent projections start at zero: any latent is the identity modulation until trained
    torch.testing.assert_close(hooked(x, t, latent=torch.randn(1, 5)), plain(x, t))


def test_latent_modulation_scales_and_shifts_every_stage(arch, spatial):
    net = TimeUNet(1, 2, **arch, latent_dim=3).eval()
    stage = net.encoder.stages[0]
    with torch.no_grad():
        stage.latent_proj.weight.zero_()
        stage.latent_proj.bias.zero_()
        stage.latent_proj.bias[:stage.out_ch] = 1.0  # scale 1 -> h * 2, shift 0
    x, temb = torch.randn(1, 1, *spatial), net.embed_time(torch.tensor([7]))
    h = stage.first(x) + stage.time_proj(temb).reshape(1, -1, *[1] * len(spatial))
    expected = stage.rest(2 * h) if stage.rest is not None else 2 * h
    torch.testing.assert_close(stage(x, temb, torch.randn(1, 3)), expected)
    n_latent = sum(m.latent_proj is not None for m in [*net.encoder.stages, *net.dec_stages])
    assert n_latent == len(net.encoder.stages) + len(net.dec_stages)


def test_encoder_and_bottleneck_hooks_and_features_out(arch, spatial):
    net = TimeUNet(1, 2, **arch).eval()
    x, t = torch.randn(1, 1, *spatial), torch.tensor([3])
    seen = []

    def encoder_hook(s, h):
        seen.append((s, tuple(h.shape)))
        return h * 0 if s == 0 else h

    bottleneck_seen = []

    def bottleneck_hook(h, temb):
        bottleneck_seen.append((tuple(h.shape), tuple(temb.shape)))
        return h

    logits, feat = net(x, t, encoder_hook=encoder_hook, bottleneck_hook=bottleneck_hook, return_features=True)
    assert [s for s, _ in seen] == list(range(len(net.encoder.stages)))
    assert seen[0][1] == (1, net.encoder.features[0], *spatial)
    assert bottleneck_seen == [(seen[-1][1], (1, net.temb_dim))]
    assert feat.shape == (1, net.encoder.features[0], *spatial)
    torch.testing.assert_close(net.head(feat), logits)
    assert not torch.allclose(logits, net(x, t))  # zeroing stage 0 (its skip included) changes the output
