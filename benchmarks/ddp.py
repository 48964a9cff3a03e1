"""Seconds per training iteration with 1 vs N data-parallel ranks (DDP, gloo on CPU / NCCL on CUDA) at the same
global batch: one rank trains the whole batch, N ranks train batch / N each and all-reduce the gradients.

The Diff-UNet method on a 3D patch (a plans-like anisotropic topology), one iteration = ``forward(mode="loss")``
(the trainer's DDP path), backward, AdamW step; W warm-up and N timed iterations, the slowest rank's mean is
one run's figure; the rank counts alternate over ``--repeats`` runs and each one's fastest run is reported (a
shared machine's load then hits all alike). Ranks come from diffnnunet's launcher
(``diffnnunet.trainers.distributed.launch``); on CPU the machine's cores are split between the ranks
(``os.cpu_count() // ranks`` threads each), as in ``diffnnunet_train -num_gpus``.

    python benchmarks/ddp.py                                  # CPU: 1 and 2 ranks, patch 16x32x32, batch 2
    python benchmarks/ddp.py --device cuda --ranks 1 2 4 --patch 64 128 128 --batch-size 4
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

ARCH_3D = dict(n_stages=4, features_per_stage=[16, 32, 64, 128], conv_op="torch.nn.modules.conv.Conv3d",
               kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
               strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2] * 4,
               n_conv_per_stage_decoder=[2] * 3, conv_bias=True,
               norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
               dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to compare (default 1 2)")
    p.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32])
    p.add_argument("--batch-size", type=int, default=2, help="global batch, split over the ranks (default 2)")
    p.add_argument("-n", "--iterations", type=int, default=5)
    p.add_argument("-w", "--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per rank (default: the cores split between the ranks, as diffnnunet_train)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per rank count, alternating (1, 2, 1, 2, ...); the fastest is reported (default 2)")
    return p


def _rank(args, out: str):
    import torch
    import torch.distributed as dist

    from diffnnunet.methods import METHODS
    from diffnnunet.trainers.distributed import DistributedMixin, ddp_device
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = ddp_device(torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = METHODS["diff_unet"](ARCH_3D, 1, 3, {"timesteps": 1000}).to(device)
    if world > 1:
        holder = type("Trainer", (), {"device": device})()
        module = DistributedMixin.wrap_ddp(holder, module)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = args.batch_size // world
    image = torch.randn((batch, 1, *args.patch), device=device)
    x0 = torch.nn.functional.one_hot(torch.randint(0, 3, (batch, *args.patch), device=device), 3)
    x0 = x0.movedim(-1, 1).float()
    times = []
    for i in range(args.warmup + args.iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module(image, x0, None, mode="loss")["loss"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mean)
        mean = max(gathered)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"ranks": world, "batch_per_rank": batch, "threads_per_rank": torch.get_num_threads(),
                       "s_per_iteration": mean}, f)


def main(argv=None):
    import torch

    from diffnnunet.trainers.distributed import launch
    args = build_parser().parse_args(argv)
    best = {}
    for _ in range(args.repeats):
        for n in args.ranks:
            if args.batch_size % n:
                raise SystemExit(f"--batch-size {args.batch_size} does not split over {n} ranks")
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "result.json")
                if n == 1 and args.device == "cpu":
                    torch.set_num_threads(os.cpu_count() or 1)
                launch(_rank, (args, out), n, args.device)
                with open(out) as f:
                    row = json.load(f)
            if n not in best or row["s_per_iteration"] < best[n]["s_per_iteration"]:
                best[n] = row
    rows = [best[n] for n in args.ranks]
    base = rows[0]["s_per_iteration"]
    print(f"patch {args.patch}, global batch {args.batch_size}, device {args.device}, cores {os.cpu_count()}, "
          f"fastest of {args.repeats} runs")
    print("ranks  batch/rank  threads/rank  s/iteration  vs first")
    for r in rows:
        print(f"{r['ranks']:5d}  {r['batch_per_rank']:10d}  {r['threads_per_rank']:12d}  {r['s_per_iteration']:11.3f}"
              f"  {r['s_per_iteration'] / base:8.2f}x")


if __name__ == "__main__":
    main()
