"""Distributed data-parallel training (torch.distributed + DDP, as nnU-Net) for every trainer.

:class:`DistributedMixin` fixes the two places where nnU-Net's trainer assumes one machine full of GPUs once a
process group is initialised: the device (nnU-Net forces ``cuda:<global rank>``; here ``cuda:<LOCAL_RANK>``, or the
CPU when the CPU was asked for, so gloo works) and the DDP wrapper (nnU-Net passes ``device_ids=[global rank]``,
wrong on the CPU and beyond one node). nnU-Net's ``self.local_rank`` stays the *global* rank: it decides who logs and
checkpoints (global rank 0) and which validation cases a rank predicts. Gradients are only all-reduced when the
training computation runs through the wrapper's forward: nnU-Net's ``train_step`` calls ``self.network(data)`` and
``DiffusionTrainer.train_step`` calls ``self.network(image, x0, mask, mode="loss")``.

:func:`launch` runs a function on every rank: under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in the
environment) in this process, with ``num_processes > 1`` in that many spawned processes on this machine. NCCL on
CUDA, gloo on the CPU. See documentation/scaling.md.
"""
from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from torch.nn.parallel import DistributedDataParallel

from diffnnunet.utils import swapped


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): the CUDA device it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def under_torchrun() -> bool:
    """True when a launcher (torchrun, or a SLURM script exporting the same variables) set up the ranks."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and not is_distributed()


def ddp_device(requested: torch.device) -> torch.device:
    """The device of this rank: ``cuda:<LOCAL_RANK>`` for CUDA, else the requested device (the CPU for gloo)."""
    return torch.device("cuda", local_rank()) if requested.type == "cuda" else requested


class DistributedMixin:
    """Put before nnU-Net's trainer in the bases; changes nothing without an initialised process group."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        with warnings.catch_warnings():  # nnU-Net makes a CUDA GradScaler under DDP even on the CPU (dropped below)
            warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA is not available.*")
            super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            self.device = ddp_device(device)
            if self.device.type != "cuda":
                self.grad_scaler = None
            print(f"rank {self.local_rank} of {dist.get_world_size()} (local rank {local_rank()}) on {self.device}, "
                  f"backend {dist.get_backend()}")

    def initialize(self):
        """nnU-Net's, with its hard-coded ``DDP(network, device_ids=[rank])`` replaced by :meth:`wrap_ddp`."""
        with swapped(trainer_module, "DDP", self.wrap_ddp):
            super().initialize()

    def wrap_ddp(self, module: torch.nn.Module, device_ids=None) -> DistributedDataParallel:
        """DDP with ``device_ids`` only on CUDA (this rank's device) and the network's own answer to
        ``find_unused_parameters`` (``ddp_find_unused_parameters``, False for nnU-Net's U-Net and our methods,
        whose training step uses every parameter). nnU-Net's ``device_ids`` argument is ignored."""
        net = getattr(module, "_orig_mod", module)
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(net, "ddp_find_unused_parameters", False)))


# -- launching ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_process_group(device_type: str) -> None:
    """``env://`` initialisation (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE): NCCL on CUDA, gloo otherwise. On the CPU
    the machine's cores are shared between the ranks of this machine."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    else:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def _run_rank(fn, args: tuple, device_type: str):
    """``fn(*args)`` inside a process group. After success every rank meets at a barrier before the group is
    destroyed: a rank that tears gloo down while a peer still finishes its last collective can abort the process
    (SIGABRT, "terminate called without an active exception"; seen once in the two-rank tests). The same abort
    came back once with the barrier in place: DDP wrappers hold reference cycles (their reducer's hooks), so they
    die in the garbage collector, possibly after the group is gone, at interpreter exit; ``gc.collect()`` first
    frees them while the group still exists. After a failure the group is left to the process exit, as torchtitan
    does: destroying it while peers wait in a collective can hang them."""
    import gc
    init_process_group(device_type)
    fn(*args)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _spawned_rank(rank: int, world_size: int, port: int, fn, args: tuple, device_type: str):
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    _run_rank(fn, args, device_type)


def launch(fn, args: tuple = (), num_processes: int = 1, device_type: str = "cpu") -> None:
    """Run ``fn(*args)`` on every rank. Under torchrun: in this process (``num_processes`` must be 1, torchrun
    decides); with ``num_processes > 1``: spawns that many ranks on this machine (``fn`` and ``args`` picklable,
    MASTER_PORT from the environment or a free one); otherwise plainly, without a process group."""
    if under_torchrun():
        if num_processes > 1:
            raise ValueError("under torchrun the number of processes is torchrun's --nproc_per_node; drop -num_gpus")
        _run_rank(fn, args, device_type)
    elif num_processes > 1:
        import torch.multiprocessing as mp
        port = int(os.environ.get("MASTER_PORT") or free_port())
        try:
            mp.start_processes(_spawned_rank, args=(num_processes, port, fn, args, device_type),
                               nprocs=num_processes, start_method="spawn")
        except mp.ProcessExitedException as e:  # the rank printed its own error
            raise RuntimeError(f"rank {e.error_index} exited with code {e.exit_code} (its error is above)") from None
    else:
        fn(*args)
