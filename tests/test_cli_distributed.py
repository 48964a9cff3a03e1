"""The CLIs scaled out on the CPU: ``diffnnunet_train -num_gpus 2`` (two gloo ranks) trains and resumes, and
``diffnnunet_predict -num_parts 2`` run as two concurrent processes into one folder equals a single run."""
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffnnunet.cli import predict, train
from tests.helpers import STANDARD_IDS, dataset_names, module_cli_env

IDS = {2: STANDARD_IDS[2]}
NAMES = dataset_names(IDS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet_ddp"), "DiffnnUNetPlans", ids=IDS,
                              sampling_steps=2, samples_per_step=2)


def _train(*extra):
    """Two gloo ranks on fold 0; each rank loads its batches in-process (no augmentation workers: 2 CPU cores)."""
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "0"
    try:
        train.main([str(IDS[2]), "DiffUNetTrainer", "0", "-device", "cpu", "-num_gpus", "2",
                    "--iterations-per-epoch", "2", "--val-iterations", "1", "--no-tune", *extra])
    finally:
        os.environ["nnUNet_n_proc_DA"] = old or "2"


def _fold(env):
    return os.path.join(env["nnUNet_results"], NAMES[2], "DiffUNetTrainer__DiffnnUNetPlans__2d", "fold_0")


@pytest.fixture(scope="module")
def trained(env):
    """Fold 0 after one epoch on two ranks (the resume test continues it to a second)."""
    _train("--epochs", "1")
    return _fold(env)


def test_num_gpus_2_trains_and_resumes_on_cpu(env, trained, capfd):
    """One epoch on two ranks, then --continue for a second one."""
    folder = trained
    capfd.readouterr()
    first = torch.load(os.path.join(folder, "checkpoint_final.pth"), weights_only=False)
    _train("--epochs", "2", "--continue")
    out = capfd.readouterr().out  # the spawned ranks write to the inherited stdout
    final = torch.load(os.path.join(folder, "checkpoint_final.pth"), weights_only=False)
    assert first["current_epoch"] == 1 and final["current_epoch"] == 2
    assert len(final["logging"]["train_losses"]) == 2  # the resumed run kept the first epoch's log
    assert not any(k.startswith("module.") for k in final["network_weights"])  # loadable without DDP
    assert os.path.isfile(os.path.join(folder, "validation", "summary.json"))  # validation split over the ranks
    assert not [f for f in os.listdir(folder) if f.startswith(".partial_")]
    assert out.count("rank 1 of 2 (local rank 1) on cpu, backend gloo") == 1, out[-3000:]  # the resumed run
    assert "worker 1 batch_size 1" in out  # nnU-Net split the plans' batch of 2 over the ranks


def test_num_gpus_errors(env, capsys):
    with pytest.raises(SystemExit):
        train.main([str(IDS[2]), "DiffUNetTrainer", "0", "-device", "cpu", "-num_gpus", "0"])
    assert "-num_gpus must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # bad input is reported once, before any rank is spawned
        train.main(["999", "DiffUNetTrainer", "0", "-device", "cpu", "-num_gpus", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("diffnnunet_train: error: dataset ID 999") and "rank" not in err


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_prediction_in_two_concurrent_parts_equals_one_run(env, trained, tmp_path, capsys):
    images = os.path.join(env["nnUNet_raw"], NAMES[2], "imagesTs")
    argv = ["-i", images, "-d", str(IDS[2]), "-tr", "DiffUNetTrainer", "-f", "0", "-device", "cpu",
            "--steps", "2", "--samples", "2", "--save_uncertainty", "-npp", "1", "-nps", "1"]
    parts, single = str(tmp_path / "parts"), str(tmp_path / "single")
    run_env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    procs = [subprocess.Popen([sys.executable, "-m", "diffnnunet.cli.predict", *argv, "-o", parts,
                               "-num_parts", "2", "-part_id", str(k)], env=run_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    predict.main([*argv, "-o", single])
    produced = sorted(f for f in os.listdir(single) if f.endswith(".nii.gz"))
    assert produced and sorted(f for f in os.listdir(parts) if f.endswith(".nii.gz")) == produced
    for f in produced:  # segmentations exact; maps to float32 rounding (the parts' processes may use other thread
        a, b = _read(os.path.join(parts, f)), _read(os.path.join(single, f))  # counts, so other summation orders)
        if f.endswith("_uncertainty.nii.gz"):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)
    assert not [f for f in os.listdir(parts) if f.startswith(".partial_")]
    with pytest.raises(SystemExit):
        predict.main([*argv, "-o", parts, "-num_parts", "2", "-part_id", "2"])
    assert "need 0 <= part_id < num_parts" in capsys.readouterr().err
