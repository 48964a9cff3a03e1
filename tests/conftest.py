import os

import pytest

os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):  # xdist runs one worker per core: one torch thread each
    import torch
    torch.set_num_threads(1)

ARCH_2D = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op="torch.nn.modules.conv.Conv2d",
               kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], n_conv_per_stage=[2, 2, 2],
               n_conv_per_stage_decoder=[1, 1], conv_bias=True,
               norm_op="torch.nn.modules.instancenorm.InstanceNorm2d", norm_op_kwargs={"eps": 1e-5, "affine": True},
               dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
# anisotropic: in-plane only convs and pooling in the first stages, as nnU-Net plans for thick slices
ARCH_3D = dict(ARCH_2D, conv_op="torch.nn.modules.conv.Conv3d", kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
               strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], norm_op="torch.nn.modules.instancenorm.InstanceNorm3d")


@pytest.fixture(scope="session")
def planned(tmp_path_factory, request):
    """The shared synthetic datasets (tests/helpers.py, STANDARD_IDS and ZERO_BACKGROUND_IDS) planned once for every
    method; modules take private copies with ``helpers.module_cli_env``. Under pytest-xdist the workers of one run
    share one planning (the first plans, the others wait on a file lock), as xdist's documentation recommends."""
    from tests.helpers import plan_session_datasets
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if worker is None:
        return plan_session_datasets(tmp_path_factory.mktemp("planned"))
    import json

    from filelock import FileLock
    root = tmp_path_factory.getbasetemp().parent / "planned"  # the run's folder, shared by its workers
    done = root.parent / "planned.json"
    with FileLock(str(done) + ".lock"):
        if not done.is_file():
            root.mkdir()
            done.write_text(json.dumps(plan_session_datasets(root)))
    return json.loads(done.read_text())


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dim(request):
    return request.param


@pytest.fixture
def arch(dim):
    return ARCH_2D if dim == 2 else ARCH_3D


@pytest.fixture
def spatial(dim):
    return (16, 16) if dim == 2 else (4, 16, 16)
