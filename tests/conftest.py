import os

import pytest

os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "2")

ARCH_2D = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op="torch.nn.modules.conv.Conv2d",
               kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], n_conv_per_stage=[2, 2, 2],
               n_conv_per_stage_decoder=[1, 1], conv_bias=True,
               norm_op="torch.nn.modules.instancenorm.InstanceNorm2d", norm_op_kwargs={"eps": 1e-5, "affine": True},
               dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
# anisotropic: in-plane only convs and pooling in the first stages, as nnU-Net plans for thick slices
ARCH_3D = dict(ARCH_2D, conv_op="torch.nn.modules.conv.Conv3d", kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
               strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], norm_op="torch.nn.modules.instancenorm.InstanceNorm3d")


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dim(request):
    return request.param


@pytest.fixture
def arch(dim):
    return ARCH_2D if dim == 2 else ARCH_3D


@pytest.fixture
def spatial(dim):
    return (16, 16) if dim == 2 else (4, 16, 16)
