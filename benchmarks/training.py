"""Seconds per training iteration and per inference patch: every diffusion trainer vs nnUNetTrainer on the same
preprocessed data and, by default, the same plans (patch, batch size, topology), on the same device, in one run.

Per dimension (--dim 2 and/or 3) a synthetic dataset is generated with ``make_dataset``, planned and preprocessed
in-process (``plan_and_preprocess_dataset``: nnU-Net's fingerprint, both planners, nnU-Net's preprocessing, shared
by both plans), and each trainer is built with ``load_trainer`` (fold 0). After ``on_train_start()`` (which starts
nnU-Net's augmentation workers), W warm-up and N timed ``train_step(next(dataloader_train))`` calls are made per
trainer. Only ``train_step`` is timed, and the two trainers' steps alternate (ABBA...) so that a change in machine
load hits both alike; inference is interleaved the same way. By default all W+N batches are fetched first and the
dataloaders are shut down (as ``nnUNetTrainer.on_train_end`` does it; no checkpoint is written) before the clock
starts, so the augmentation workers do not compete with the timed compute on small CPU machines; --live-data times
with the workers running (the wait for each batch is reported separately either way).

Inference, without sliding window or mirroring: one patch (batch 1 by default) through
``method.sample(x, steps, samples, chunk=plans' samples_per_forward)`` vs the nnU-Net network's single forward
(deep supervision off), under ``torch.no_grad`` and the trainers' autocast (CUDA only).

Patch and batch sizes come from each trainer's plans by default, i.e. whatever the planners give for the tiny
synthetic dataset; --shape makes bigger cases (bigger plans), --patch/--batch-size override both plans.

    python benchmarks/training.py                          # CPU, 2D and 3D, tiny default cases
    python benchmarks/training.py --device cuda --dim 3 --shape 96 192 192 --num-train 10 -n 30
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

CONFIG = {2: "2d", 3: "3d_fullres"}
IDS = {2: 962, 3: 963}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, nargs="+", default=[2, 3], choices=[2, 3],
                   help="dataset dimensionality; 2 trains '2d', 3 trains '3d_fullres' (default: both)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("-n", "--iterations", type=int, default=10, help="timed training iterations (default 10)")
    p.add_argument("-w", "--warmup", type=int, default=2, help="untimed warm-up iterations (default 2)")
    p.add_argument("--infer-repeats", type=int, default=3, help="timed inference repeats, after 1 warm-up (default 3)")
    p.add_argument("--infer-batch", type=int, default=1, help="patches per inference call (default 1)")
    p.add_argument("--trainers", nargs="+", default=None,
                   help="diffusion trainers to compare with nnUNetTrainer (default: every registered one)")
    p.add_argument("--own-plans", action="store_true",
                   help="nnUNetTrainer on its own nnUNetPlans (default: on the diffusion trainer's plans, i.e. the "
                        "same patch, batch size and topology with nnU-Net's PlainConvUNet)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: each plans' sampling_steps)")
    p.add_argument("--samples", type=int, default=None, help="samples (default: each plans' samples_per_step)")
    p.add_argument("--no-infer", action="store_true", help="skip the one-patch inference timing")
    p.add_argument("--num-train", type=int, default=6, help="synthetic training cases (default 6)")
    p.add_argument("--shape", type=int, nargs="+", default=None,
                   help="synthetic case shape in voxels, numpy order (z y x for 3D, y x for 2D); default: "
                        "make_dataset's (10 32 28) / (40 36). Used for every --dim of matching length")
    p.add_argument("--channels", type=int, default=2, help="image channels of the synthetic data (default 2)")
    p.add_argument("--patch-from-plans", dest="patch", action="store_const", const=None, default=None,
                   help="use each plan's patch size (the default)")
    p.add_argument("--patch", type=int, nargs="+", default=None,
                   help="override patch size in both plans (must be divisible by the network's total stride)")
    p.add_argument("--batch-size", type=int, default=None, help="override batch size in both plans")
    p.add_argument("--gpu-memory-target", type=float, default=8.0, help="VRAM target (GB) for both planners")
    p.add_argument("--num-proc-da", type=int, default=2,
                   help="nnUNet_n_proc_DA augmentation workers (default 2; 0: in the main process)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads on --device cpu (default 1: multi-threaded CPU timings collapse when "
                        "anything else runs on the cores; pass the core count on an idle machine)")
    p.add_argument("--compile", action="store_true",
                   help="let nnUNetTrainer torch.compile on CUDA (its default; off here because DiffUNetTrainer "
                        "never compiles)")
    p.add_argument("--live-data", action="store_true",
                   help="time train_step while the augmentation workers keep running (as in real training); default: "
                        "fetch all batches first, stop the workers, then time (steadier on few CPU cores)")
    p.add_argument("--verbose", action="store_true", help="show the trainers' and planners' own output")
    p.add_argument("--keep", action="store_true", help="keep the temporary nnU-Net folders and print where")
    return p


@contextlib.contextmanager
def quiet(enabled: bool):
    """Swallow stdout and stderr (progress bars); an exception still propagates, with the captured text."""
    if not enabled:
        yield
        return
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stderr.write(out.getvalue()[-4000:] + err.getvalue()[-4000:])
        raise


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shutdown_dataloaders(trainer):
    """What nnUNetTrainer.on_train_end does to its dataloaders, without the checkpoint."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for dl in (trainer.dataloader_train, trainer.dataloader_val):
            if dl is not None and isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._finish()
    trainer.dataloader_train = trainer.dataloader_val = None


def prepare_dataset(dim: int, args) -> str:
    from diffnnunet.cli.plan_and_preprocess import plan_and_preprocess_dataset
    from diffnnunet.datasets.synthetic import make_dataset

    shape = tuple(args.shape) if args.shape and len(args.shape) == dim else None
    folder = make_dataset(os.environ["nnUNet_raw"], IDS[dim], dim=dim, num_train=args.num_train, num_test=0,
                          num_channels=args.channels, shape=shape, seed=dim)
    name = os.path.basename(folder)
    # nnU-Net's planner sets torch's thread count to nnUNet_n_proc_DA while it estimates memory: never 0 there
    os.environ["nnUNet_n_proc_DA"] = str(max(1, args.num_proc_da))
    with quiet(not args.verbose):
        plan_and_preprocess_dataset(name, [CONFIG[dim]], num_processes=int(os.environ["nnUNet_def_n_proc"]),
                                    gpu_memory_target=args.gpu_memory_target)
    if args.patch is not None or args.batch_size is not None:
        override_plans(name, CONFIG[dim], args.patch, args.batch_size)
    os.environ["nnUNet_n_proc_DA"] = str(args.num_proc_da)
    return name


def make_baseline_plans(pre: str, diffusion_plans: str, configuration: str) -> str:
    """nnUNetPlans with the diffusion plans' patch, batch size and topology (still PlainConvUNet and nnU-Net's
    preprocessed data): nnUNetTrainer 'on the same plans'. Returns the new plans identifier."""
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        base = json.load(f)
    with open(os.path.join(pre, diffusion_plans + ".json")) as f:
        diff = json.load(f)
    name = f"nnUNetPlans_as_{diffusion_plans}"
    src, dst = diff["configurations"][configuration], base["configurations"][configuration]
    for key in ("patch_size", "batch_size"):
        dst[key] = src[key]
    dst["architecture"]["arch_kwargs"] = src["architecture"]["arch_kwargs"]
    base["plans_name"] = name
    with open(os.path.join(pre, name + ".json"), "w") as f:
        json.dump(base, f, indent=2)
    return name


def diffusion_trainers(names=None) -> list:
    from diffnnunet.trainers import TRAINERS, is_diffusion_trainer
    return names or [n for n, c in TRAINERS.items() if is_diffusion_trainer(c) and c.method_name]


def override_plans(name: str, configuration: str, patch, batch_size):
    import numpy as np
    pre = os.path.join(os.environ["nnUNet_preprocessed"], name)
    for plans_file in sorted(f for f in os.listdir(pre) if f.endswith("Plans.json")):
        plans_name = plans_file[:-5]
        path = os.path.join(pre, plans_file)
        with open(path) as f:
            plans = json.load(f)
        cfg = plans["configurations"][configuration]
        if patch is not None:
            if len(patch) != len(cfg["patch_size"]):
                raise SystemExit(f"--patch needs {len(cfg['patch_size'])} values for {configuration}")
            stride = np.prod(np.array(cfg["architecture"]["arch_kwargs"]["strides"]), 0)
            if any(p % s for p, s in zip(patch, stride)):
                raise SystemExit(f"--patch {patch} is not divisible by the total stride {stride.tolist()} of "
                                 f"{plans_name} {configuration}")
            cfg["patch_size"] = list(patch)
        if batch_size is not None:
            cfg["batch_size"] = int(batch_size)
        with open(path, "w") as f:
            json.dump(plans, f, indent=2)


def median(values):
    return statistics.median(values) if values else float("nan")


def start_trainer(name: str, dim: int, trainer_name: str, plans: str, device, args) -> dict:
    """load_trainer + on_train_start; without --live-data all batches are fetched now and the workers stopped."""
    from diffnnunet.cli.train import load_trainer

    with quiet(not args.verbose):
        trainer = load_trainer(name, trainer_name, 0, CONFIG[dim], plans_identifier=plans, device=device)
        trainer.on_train_start()
    trainer.network.train()
    state = {"name": trainer_name, "plans": plans, "trainer": trainer, "batches": [], "wait": [], "step": [],
             "infer": [], "step_mem": 0.0}
    if not args.live_data:
        for _ in range(args.warmup + args.iterations):
            t0 = time.perf_counter()
            state["batches"].append(next(trainer.dataloader_train))
            state["wait"].append(time.perf_counter() - t0)
        state["wait"] = state["wait"][args.warmup:]
        shutdown_dataloaders(trainer)
    return state


def timed_step(state: dict, i: int, device, args):
    import torch
    trainer = state["trainer"]
    if args.live_data:
        t0 = time.perf_counter()
        batch = next(trainer.dataloader_train)
        if i >= args.warmup:
            state["wait"].append(time.perf_counter() - t0)
    else:
        batch, state["batches"][i] = state["batches"][i], None
    state["last_batch"] = batch
    sync(device)
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    trainer.train_step(batch)
    sync(device)
    if i >= args.warmup:
        state["step"].append(time.perf_counter() - t1)
    if device.type == "cuda":
        state["step_mem"] = max(state["step_mem"], (torch.cuda.max_memory_allocated(device) - resident) / 2 ** 30)


def make_inference(state: dict, x, args):
    trainer = state["trainer"]
    trainer.network.eval()
    if state["name"] != "nnUNetTrainer":
        d = trainer.diffusion
        steps, samples = args.steps or d["sampling_steps"], args.samples or d["samples_per_step"]
        chunk = d.get("samples_per_forward")
        state["work"] = f"sample {steps}x{samples} (chunk {min(chunk or samples, samples)})"
        return lambda: trainer.method.sample(x, steps, samples, chunk=chunk)
    trainer.set_deep_supervision_enabled(False)
    state["work"] = "1 forward"
    return lambda: trainer.network(x)


def bench_pair(name: str, dim: int, diffusion_trainer: str, device, args) -> list:
    """nnUNetTrainer and one diffusion trainer on the same data (by default on the same plans), interleaved step by
    step (ABBA order), so that a change in machine load hits both alike; then the same for inference."""
    import torch

    from diffnnunet.trainers import TRAINERS, default_plans_for
    plans = default_plans_for(TRAINERS[diffusion_trainer])
    pre = os.path.join(os.environ["nnUNet_preprocessed"], name)
    base_plans = "nnUNetPlans" if args.own_plans else make_baseline_plans(pre, plans, CONFIG[dim])
    states = []
    try:
        for trainer_name, p in (("nnUNetTrainer", base_plans), (diffusion_trainer, plans)):
            states.append(start_trainer(name, dim, trainer_name, p, device, args))
        for i in range(args.warmup + args.iterations):
            for st in (states if i % 2 == 0 else states[::-1]):
                timed_step(st, i, device, args)
        for st in states:
            shutdown_dataloaders(st["trainer"])
        if args.no_infer:
            return [result_row(st, dim) for st in states]
        common = states[0]["last_batch"]["data"][:args.infer_batch]  # nnU-Net's patch, shared when shapes match
        fns = []
        for st in states:
            own = st["last_batch"]["data"][:args.infer_batch]
            st["same_input"] = tuple(own.shape) == tuple(common.shape)
            x = (common if st["same_input"] else own).to(device)
            st["infer_shape"] = list(x.shape)
            fns.append(make_inference(st, x, args))
        autocast = (torch.autocast(device.type, enabled=True) if device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            for r in range(1 + args.infer_repeats):
                for st, fn in (zip(states, fns) if r % 2 == 0 else list(zip(states, fns))[::-1]):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    if r > 0:
                        st["infer"].append(time.perf_counter() - t0)
        return [result_row(st, dim) for st in states]
    finally:
        for st in states:
            shutdown_dataloaders(st["trainer"])
        states.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def result_row(st: dict, dim: int) -> dict:
    tr = st["trainer"]
    return {"trainer": st["name"], "plans": st["plans"], "config": CONFIG[dim],
            "patch": list(tr.configuration_manager.patch_size), "batch": int(tr.batch_size),
            "params": sum(p.numel() for p in tr.network.parameters()),
            "step": median(st["step"]), "step_min": min(st["step"]), "wait": median(st["wait"]),
            "step_mem": st["step_mem"], "infer": median(st["infer"]), "infer_shape": st.get("infer_shape"),
            "same_input": st.get("same_input"), "work": st.get("work")}


def train_ratios(name: str, trainers, device: str = "cpu", threads=None, iterations: int = 6, dim: int = 3) -> dict:
    """For benchmarks/inference.py: s/iteration of each diffusion trainer and of nnUNetTrainer on the same plans,
    on an already planned and preprocessed dataset. Returns {trainer: {"diff", "base", "ratio"}}."""
    import torch
    args = build_parser().parse_args(["-n", str(iterations), "-w", "2", "--no-infer"])
    if threads:
        torch.set_num_threads(threads)
    out = {}
    for trainer in trainers:
        base, diff = bench_pair(name, dim, trainer, torch.device(device), args)
        out[trainer] = {"diff": diff["step"], "base": base["step"], "ratio": diff["step"] / base["step"]}
    return out


def fmt_s(v):
    return f"{v:.4f}" if v < 1 else f"{v:.3f}"


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.infer_repeats < 1 or args.warmup < 0 or args.infer_batch < 1:
        parser.error("-n, --infer-repeats and --infer-batch must be >= 1, -w >= 0")
    os.environ["nnUNet_n_proc_DA"] = str(args.num_proc_da)
    os.environ["nnUNet_def_n_proc"] = "2"
    if not args.compile:
        os.environ["nnUNet_compile"] = "false"
    root = tempfile.mkdtemp(prefix="diffnnunet_bench_training_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build/machine")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"

    results = []
    try:
        print(f"Training/inference speed: {', '.join(diffusion_trainers(args.trainers))} vs nnUNetTrainer "
              f"({'nnUNetPlans' if args.own_plans else 'on each diffusion plans: same patch, batch, topology'}), "
              f"same run, same device: {dev_name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"nnUNet_n_proc_DA={os.environ['nnUNet_n_proc_DA']}, torch.compile "
              f"{'as nnU-Net decides' if args.compile else 'off'}")
        patch_src = ("patch " + "x".join(map(str, args.patch)) + " forced in both plans" if args.patch else
                     "patch and batch size from each trainer's own plans for the tiny synthetic dataset "
                     f"({args.num_train} cases of shape "
                     f"{'x'.join(map(str, args.shape)) if args.shape else '10x32x28 (3D) / 40x36 (2D)'})")
        if args.batch_size:
            patch_src += f", batch size {args.batch_size} forced"
        print(f"Data: make_dataset, {args.channels} channels, 3 labels; {patch_src}.")
        data_mode = ("batches fetched while timing, workers running" if args.live_data else
                     "batches prefetched, workers stopped before timing")
        print(f"Training: median of {args.iterations} train_step calls after {args.warmup} warm-up, the two trainers "
              f"interleaved step by step ({data_mode}; fetch not timed).")
        print(f"Inference: median of {args.infer_repeats} after 1 warm-up, {args.infer_batch} patch(es), no sliding "
              f"window/mirroring; sample(steps={args.steps or 'plans'}, samples={args.samples or 'plans'}).")
        for dim in args.dim:
            start = time.perf_counter()
            name = prepare_dataset(dim, args)
            print(f"[{dim}D] planned and preprocessed {name} in {time.perf_counter() - start:.1f} s", flush=True)
            for trainer in diffusion_trainers(args.trainers):
                pair = bench_pair(name, dim, trainer, device, args)
                results.append(pair)
                print(f"[{dim}D] " + ", ".join(f"{r['trainer']} ({r['plans']}): {fmt_s(r['step'])} s/iter"
                                             for r in pair), flush=True)
    finally:
        if args.keep:
            print(f"nnU-Net folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    train_rows, infer_rows = [], []
    for base, diff in results:
        for r in (base, diff):
            is_diff = r is diff
            train_rows.append([r["trainer"], r["plans"], r["config"], "x".join(map(str, r["patch"])), r["batch"],
                               f"{r['params'] / 1e6:.2f}M", fmt_s(r["step"]), fmt_s(r["step_min"]),
                               fmt_s(r["wait"]),
                               *([f"{r['step_mem']:.2f}"] if device.type == "cuda" else []),
                               f"{r['step'] / base['step']:.2f}" if is_diff else ""])
            if args.no_infer:
                continue
            infer_rows.append([r["trainer"], r["config"], "x".join(map(str, r["infer_shape"][2:])),
                               r["infer_shape"][0], r["work"], "yes" if r["same_input"] else "no", fmt_s(r["infer"]),
                               f"{r['infer'] / base['infer']:.1f}" if is_diff else ""])
    print("Training (s per train_step)")
    print_table(["trainer", "plans", "config", "patch", "batch", "params", "s/iter median", "s/iter min",
                 "data wait median", *(["step peak GiB"] if device.type == "cuda" else []), "Diff/nnU-Net"], train_rows)
    if args.no_infer:
        return 0
    print()
    print("Inference (one patch, no sliding window, no mirroring)")
    print_table(["trainer", "config", "patch", "n", "work", "same input", "s/patch median", "Diff/nnU-Net"],
                infer_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
