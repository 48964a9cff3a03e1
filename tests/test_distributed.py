"""DDP on the CPU: two gloo ranks, spawned by diffnnunet's own launcher.

The synchronised gradient of a per-sample-mean loss equals the single-process gradient on the concatenated batch,
and the trainers' own ``train_step`` keeps the ranks' weights identical, for DiffUNetTrainer (the method's
``forward(mode="loss")``) and nnU-Net's trainer (``network(x)`` + its CE). Each check has a control that fails
without synchronisation: unwrapped ranks, and ``training_loss`` called past the wrapper (the old, silent bug).
"""
import os
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

from tests.conftest import ARCH_2D

WORLD = 2
HALF = 2  # samples per rank; the concatenated batch has WORLD * HALF
SHAPE = (16, 16)
NUM_CLASSES = 3


def _model(kind: str) -> torch.nn.Module:
    from diffnnunet.networks import resolve_arch_kwargs
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    if kind == "DiffUNetTrainer":
        from diffnnunet.methods import METHODS
        # bce and mse are means over voxels of equal-sized samples, i.e. means over samples; the batch Dice is not
        return METHODS["diff_unet"](ARCH_2D, 2, NUM_CLASSES,
                                    {"timesteps": 1000, "loss_weights": {"dice": 0.0, "bce": 1.0, "mse": 1.0}})
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    # deep supervision on, as nnU-Net trains: without it the lower segmentation heads get no gradient
    return PlainConvUNet(2, num_classes=NUM_CLASSES, deep_supervision=True, **resolve_arch_kwargs(ARCH_2D))


def _ce(outputs: list, labels: torch.Tensor) -> torch.Tensor:
    """nnU-Net's CE term with its deep-supervision weights (1, 1/2, ...; labels subsampled per output): a weighted
    sum of means over voxels and samples, so still a mean over samples."""
    targets = [labels[..., ::SHAPE[0] // o.shape[-1], ::SHAPE[1] // o.shape[-2]] for o in outputs]
    return DeepSupervisionWrapper(RobustCrossEntropyLoss(), [0.5 ** i for i in range(len(outputs))])(outputs, targets)


def _batch(seed: int, n: int):
    """image ``(n, 2, *SHAPE)``, labels ``(n, 1, *SHAPE)``, one-hot ``(n, N, *SHAPE)``, t ``(n,)``, noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((n, 2, *SHAPE), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n, 1, *SHAPE), generator=g)
    x0 = torch.nn.functional.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
    t = torch.randint(0, 1000, (n,), generator=g)
    return image, labels, x0, t, torch.randn(x0.shape, generator=g)


def _loss(kind, module, batch, bypass=False):
    """The loss through ``module``'s forward (a DDP wrapper or a plain module); ``bypass``: past the wrapper."""
    image, labels, x0, t, noise = batch
    if kind == "DiffUNetTrainer":
        if bypass:  # what DiffusionTrainer.train_step did before: training_loss, past DDP's forward
            return module.module.training_loss(image, x0, None, t=t, noise=noise)["loss"]
        return module(image, x0, None, mode="loss", t=t, noise=noise)["loss"]
    net = module.module if bypass else module
    return _ce(net(image), labels)


def _grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def _params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _gather(x: torch.Tensor) -> list:
    out = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(out, x)
    return out


def _train_steps(kind, module, rank: int, steps: int = 3) -> torch.Tensor:
    """The trainer's own ``train_step`` on a stand-in trainer, different batches and global RNG on every rank."""
    from diffnnunet.trainers import TRAINERS
    from diffnnunet.trainers.optimizers import MultiOptimizerMixin
    torch.manual_seed(100 + rank)  # different timesteps/noise per rank, as in a real run
    fake = SimpleNamespace(device=torch.device("cpu"), network=module, grad_scaler=None, _autocast=nullcontext,
                           optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2),
                           _encode=lambda target: (target, None), loss=lambda out, target: _ce(out, target),
                           step_extra_optimizers=lambda *args: {},  # no extra networks (see test_cdal.py)
                           update_ema=lambda: None)  # no EMA here (tests/test_recipe.py)
    fake.optimizer_step = MultiOptimizerMixin.optimizer_step.__get__(fake)
    for step in range(steps):
        image, labels, x0, _, _ = _batch(1000 * rank + step, HALF)
        TRAINERS[kind].train_step(fake, {"data": image, "target": x0 if kind == "DiffUNetTrainer" else labels})
    return _params(module.module if hasattr(module, "module") else module)


def _worker(kind: str, out_dir: str):
    """One rank: every comparison is made here (all ranks hold everything after all_gather), rank 0 saves them."""
    from diffnnunet.trainers.distributed import DistributedMixin
    rank = dist.get_rank()
    torch.use_deterministic_algorithms(True)
    wrap = DistributedMixin.wrap_ddp.__get__(SimpleNamespace(device=torch.device("cpu")))
    full = _batch(7, WORLD * HALF)
    mine = [x[rank * HALF:(rank + 1) * HALF] for x in full]
    reference = _model(kind)
    _loss(kind, reference, full).backward()  # one process, the concatenated batch
    ddp = wrap(_model(kind))
    _loss(kind, ddp, mine).backward()
    bypass = wrap(_model(kind))
    _loss(kind, bypass, mine, bypass=True).backward()
    synced, ref, local = _grads(ddp.module), _grads(reference), _grads(bypass.module)
    result = {
        "grad_err": float((synced - ref).abs().max() / ref.abs().max()),
        "bypass_err": float(max((g - ref).abs().max() for g in _gather(local)) / ref.abs().max()),
        "grads_equal_across_ranks": all(torch.equal(g, synced) for g in _gather(synced)),
    }
    trained = _train_steps(kind, wrap(_model(kind)), rank)
    alone = _train_steps(kind, _model(kind), rank)
    start = _params(_model(kind))
    result["weights_equal_across_ranks"] = all(torch.equal(p, trained) for p in _gather(trained))
    result["weights_moved"] = float((trained - start).abs().max())
    result["unsynced_rank_diff"] = float((_gather(alone)[0] - _gather(alone)[1]).abs().max())
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))


@pytest.mark.parametrize("kind", ["DiffUNetTrainer", "nnUNetTrainer"])
def test_two_gloo_ranks_sync_like_one_process(kind, tmp_path):
    from diffnnunet.trainers.distributed import launch
    start = time.time()
    launch(_worker, (kind, str(tmp_path)), WORLD, "cpu")
    r = torch.load(tmp_path / "result.pt")
    print(kind, r, f"{time.time() - start:.1f} s")
    assert r["grad_err"] < 1e-5  # synchronised gradient = gradient of the concatenated batch
    assert r["grads_equal_across_ranks"]
    assert r["bypass_err"] > 1e-3  # past the wrapper nothing is synchronised (the bug this guards against)
    assert r["weights_equal_across_ranks"] and r["weights_moved"] > 1e-4
    assert r["unsynced_rank_diff"] > 1e-4  # unwrapped ranks drift apart on their different batches


@pytest.mark.parametrize("method_name", ["diff_unet", "berdiff", "ldseg", "medsegdiff_v2"])
def test_training_step_uses_every_parameter(method_name):
    """DDP runs with ``find_unused_parameters=False`` (``ddp_find_unused_parameters``): a parameter without a
    gradient would make the second synchronised step fail, so every method's loss must reach all of them."""
    from diffnnunet.methods import METHODS
    method = METHODS[method_name](ARCH_2D, 2, NUM_CLASSES, {"timesteps": 1000})
    image, _, x0, _, _ = _batch(3, 2)
    method(image, x0, None, mode="loss")["loss"].backward()
    assert not method.ddp_find_unused_parameters
    assert [n for n, p in method.named_parameters() if p.grad is None] == []
