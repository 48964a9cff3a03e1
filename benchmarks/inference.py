"""Sliding-window inference cost of diffnnunet's diffusion predictor against stock nnU-Net, in one run, on the same
preprocessed 3D case and the same plans (patch, topology, step size, Gaussian blending).

Modes, each run in a fresh process (forked from a preloaded fork server) so that its peak resident memory (VmHWM)
is its own:

  a  nnUNetPredictor + PlainConvUNet with the diffusion plans' topology, mirroring off
  b  the same with nnU-Net's default mirroring (all axes: 8 passes per window in 3D)
  c  DiffusionPredictor for each diffusion trainer, at its plans' default steps x samples (network weights are
     random: the cost does not depend on them)
  d  naive Diff-UNet, the public code's path: the whole sampler inside each window, one window at a time, the
     samples one after another, the image feature encoder recomputed at every step

Reported per mode: seconds per case (the sliding window on the preprocessed case: padding, windows, network,
blending; not the file reading/resampling, which are nnU-Net's own and identical for all modes), windows,
network evaluations per window, seconds per evaluation, peak RSS. Ratios: c/a, c/b, d/c and
efficiency = time(c) / (windows x evaluations per window x time of one denoiser forward on one window, batch 1).
It then times training iterations (benchmarks/training.py) of the diffusion trainers (--quick: DiffUNetTrainer)
against nnUNetTrainer on the same plans. The last line reads
``efficiency=E naive_speedup=N rss_ratio=R train_iter_ratio=T``: E and R are the worst over the diffusion trainers,
N is d/c for Diff-UNet, T is DiffUNetTrainer's s/iteration over nnUNetTrainer's.

    python benchmarks/inference.py --quick          # small generated case, 2 windows timed: ~2.5 min on 2 CPU cores
    python benchmarks/inference.py                  # realistic 160x256x256 case (long on CPU: see --max-windows)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training import make_baseline_plans, print_table, train_ratios  # noqa: E402

DATASET_ID = 973
CONFIG = "3d_fullres"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small generated case, 2 windows timed (~2.5 min on 2 CPU cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per worker (default 1: multi-threaded CPU timings collapse when anything "
                        "else runs on the cores; pass the core count on an idle machine)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="case shape z y x (default 160 256 256; "
                                                                     "--quick: 20 48 48)")
    p.add_argument("--gpu-memory-target", type=float, default=None,
                   help="VRAM target (GB) for the planners (default 8; --quick: 0.1, for a small patch)")
    p.add_argument("--trainers", nargs="+", default=None, help="diffusion trainers (default: every registered one)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="time only the first N windows of every mode and extrapolate seconds per case to all "
                        "windows (marked '*'; for CPU runs of big cases; --quick: 2, 0 = all)")
    p.add_argument("--fit-steps", action="store_true",
                   help="time the diffusion modes (c, d) at 1 and 2 sampling steps (after a 1-step warm-up) and "
                        "extrapolate to the plans' K steps: t1 + (K-1)(t2-t1), i.e. once-per-window cost plus K "
                        "per-step costs (marked '+'; for CPU runs of the realistic case)")
    p.add_argument("--no-training", action="store_true", help="skip the training-iteration measurement")
    p.add_argument("--train-trainers", nargs="+", default=None,
                   help="diffusion trainers whose training iterations are timed (default: those of --trainers; "
                        "--quick: DiffUNetTrainer, the one with a target)")
    p.add_argument("--train-iterations", type=int, default=None, help="timed training iterations (default 6; "
                                                                      "--quick: 4)")
    p.add_argument("--keep", action="store_true", help="keep the temporary nnU-Net folders")
    return p


# -- one mode, in its own process ---------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over exec from the parent
    (the driver that spawned the worker), so every worker would report the driver's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def naive_diff_unet_sample(method, image, steps, samples, generator=None, chunk=None, return_uncertainty=False):
    """The public Diff-UNet inference path: S chains one after another, batch 1, the image feature encoder run
    again at every step; same DDIM update and Step-Uncertainty Fusion as ``DiffUNet.sample``."""
    import torch

    from diffnnunet.methods.diff_unet import logits_to_x0
    timesteps = method.process.set_timesteps(steps)
    sums = [0.0] * len(timesteps)
    for _ in range(samples):
        x = torch.randn((image.shape[0], method.num_classes, *image.shape[2:]), generator=generator,
                        device=image.device, dtype=image.dtype)
        for i, t in enumerate(timesteps):
            features = method.feature_encoder(image)
            tt = torch.full((image.shape[0],), t, device=image.device, dtype=torch.long)
            logits = method(image, x, tt, features)
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x = method.process.step(logits_to_x0(logits), x, t, t_prev, method.eta, generator)
            sums[i] = sums[i] + torch.sigmoid(logits).float()
    out = method.fuse([s / samples for s in sums])
    return (out, None) if return_uncertainty else out


def run_worker(spec: dict) -> dict:
    """Build the network and predictor of one mode, run the sliding window on the case, report timings."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from diffnnunet.inference import DiffusionPredictor
    from diffnnunet.trainers import get_trainer_class

    class NaiveDiffUNetPredictor(DiffusionPredictor):
        """Mode d: one window per call, and the naive sampler inside it."""
        windows_per_forward = 1

        def _sample_windows_mirrored(self, x):
            return naive_diff_unet_sample(self.network, x, self.sampling_steps, self.samples_per_step,
                                          self.generator), None

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    plans = PlansManager(load_json(spec["plans_file"]))
    cm = plans.get_configuration(CONFIG)
    dataset_json = load_json(spec["dataset_json"])
    folder = os.path.join(os.path.dirname(spec["plans_file"]), cm.data_identifier)
    dataset = infer_dataset_class(folder)(folder)
    data = dataset.load_case(sorted(dataset.identifiers)[0])[0]
    data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
    num_heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    trainer = get_trainer_class(spec["trainer"])
    network = trainer.build_network_architecture(plans, cm, data.shape[0], num_heads, enable_deep_supervision=False)
    network.eval()
    mode = spec["mode"]
    common = dict(tile_step_size=0.5, use_gaussian=True, perform_everything_on_device=True, device=device,
                  verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's 'only supported for cuda' notice on CPU
        if mode in ("a", "b"):
            predictor = nnUNetPredictor(use_mirroring=mode == "b", **common)
        else:
            predictor = (NaiveDiffUNetPredictor if mode == "d" else DiffusionPredictor)(use_mirroring=False, **common)
    predictor.manual_initialization(network, plans, cm, [network.state_dict()], dataset_json, spec["trainer"],
                                    (0, 1, 2))
    all_slicers = predictor._internal_get_sliding_window_slicers
    padded = [max(s, p) for s, p in zip(data.shape[1:], cm.patch_size)]
    n_windows = len(all_slicers(tuple(padded)))
    limit = spec.get("max_windows")
    if limit and limit < n_windows:
        predictor._internal_get_sliding_window_slicers = lambda shape: all_slicers(shape)[:limit]
    timed_windows = min(n_windows, limit or n_windows)
    if mode == "a":
        evals = 1
    elif mode == "b":
        evals = 2 ** len(cm.patch_size)
    else:
        evals = predictor.sampling_steps * predictor.samples_per_step
    rss_before = _rss_mb()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_case(steps=None) -> float:
        if steps is not None:
            predictor.steps_override = steps
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            predictor.predict_sliding_window_return_logits(data)
        sync()
        return time.perf_counter() - t0

    fitted = mode in ("c", "d") and spec.get("fit_steps") and predictor.sampling_steps > 2
    if fitted:
        k = predictor.sampling_steps
        timed_case(1)  # warm-up: first-call allocations
        t1, t2 = timed_case(1), timed_case(2)
        elapsed = t1 + (k - 1) * max(t2 - t1, 0.0)
    else:
        elapsed = timed_case()
    seconds = elapsed * n_windows / timed_windows
    out = {"seconds": seconds, "windows": n_windows, "timed_windows": timed_windows, "evals": evals,
           "fitted_steps": bool(fitted),
           "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before, "patch": list(cm.patch_size),
           "shape": list(data.shape[1:])}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if mode == "c":  # one denoiser forward on one window, batch 1, conditioning precomputed
        window = data[(slice(None), *[slice(0, p) for p in cm.patch_size])][None].to(device)
        with torch.inference_mode(), (torch.autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()):
            forward = network.to(device).benchmark_forward(window)
            times = []
            for _ in range(4):
                sync()
                t1 = time.perf_counter()
                forward()
                sync()
                times.append(time.perf_counter() - t1)
        out["t_forward"] = sorted(times[1:])[1]
    return out


# -- the driver ------------------------------------------------------------------------------------------------------
def prepare(args) -> dict:
    """Generate the dataset, plan (all plans) and preprocess 3d_fullres; returns paths and the diffusion plans."""

    from diffnnunet.cli.plan_and_preprocess import plan_and_preprocess_dataset
    from diffnnunet.datasets.synthetic import make_dataset

    folder = make_dataset(os.environ["nnUNet_raw"], DATASET_ID, dim=3, num_train=args.num_train, num_test=0,
                          shape=tuple(args.shape), spacing=(1.0, 1.0, 1.0), seed=3)
    name = os.path.basename(folder)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        plan_and_preprocess_dataset(name, [CONFIG], num_processes=2, gpu_memory_target=args.gpu_memory_target)
    return {"name": name, "pre": os.path.join(os.environ["nnUNet_preprocessed"], name)}


_PRELOAD = ["torch", "nnunetv2.inference.predict_from_raw_data", "nnunetv2.training.dataloading.nnunet_dataset",
            "diffnnunet.inference", "diffnnunet.trainers"]


def _worker_entry(spec: dict, conn) -> None:
    import traceback
    import warnings
    warnings.simplefilter("ignore")
    try:
        conn.send(run_worker(spec))
    except BaseException:
        conn.send({"error": traceback.format_exc()[-3000:]})
    finally:
        conn.close()


def spawn(spec: dict) -> dict:
    """Run one mode in a fresh process forked from a fork server that has imported torch, nnU-Net and diffnnunet
    once (about 10 s per worker otherwise) and never computed anything (so forking is safe with OpenMP). The child
    is a new process: its peak RSS (VmHWM) starts at the server's imported footprint, like a fresh interpreter's."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_entry, args=(spec, send))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the worker died without a word (killed, out of memory)
        result = None
    proc.join()
    result = result or {"error": f"exit code {proc.exitcode}"}
    if "error" in result:
        raise SystemExit(f"worker {spec['mode']} {spec['trainer']} failed:\n{result['error']}")
    return result


def fmt(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.shape = args.shape or ([20, 48, 48] if args.quick else [160, 256, 256])
    args.gpu_memory_target = args.gpu_memory_target or (0.1 if args.quick else 8.0)
    args.num_train = 6
    if args.max_windows is None and args.quick:
        args.max_windows = 2
    for k, v in (("nnUNet_def_n_proc", "2"), ("nnUNet_n_proc_DA", "2"), ("nnUNet_compile", "false")):
        os.environ.setdefault(k, v)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the temporary folder is removed
    root = tempfile.mkdtemp(prefix="diffnnunet_bench_inference_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)
    import torch

    from diffnnunet.trainers import TRAINERS, default_plans_for, is_diffusion_trainer
    diffusion = args.trainers or [n for n, c in TRAINERS.items() if is_diffusion_trainer(c) and c.method_name]
    start = time.perf_counter()
    try:
        info = prepare(args)
        dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
        print(f"Inference benchmark: {dev}, torch {torch.__version__}; case {'x'.join(map(str, args.shape))} "
              f"(make_dataset, 2 channels, 3 labels, 1 mm), planned for {args.gpu_memory_target:g} GB "
              f"(prepared in {time.perf_counter() - start:.0f} s)", flush=True)
        base = {"device": args.device, "threads": args.threads, "max_windows": args.max_windows or None,
                "fit_steps": args.fit_steps,
                "dataset_json": os.path.join(info["pre"], "dataset.json")}
        rows, summary, baselines = [], {}, {}
        for trainer in diffusion:
            plans_name = default_plans_for(TRAINERS[trainer])
            if plans_name not in baselines:
                bplans = make_baseline_plans(info["pre"], plans_name, CONFIG)
                baselines[plans_name] = {m: spawn({**base, "mode": m, "trainer": "nnUNetTrainer",
                                                   "plans_file": os.path.join(info["pre"], bplans + ".json")})
                                         for m in ("a", "b")}
                for m in ("a", "b"):
                    rows.append((m, f"nnUNetTrainer ({bplans})", baselines[plans_name][m]))
            a, b = baselines[plans_name]["a"], baselines[plans_name]["b"]
            spec = {**base, "trainer": trainer, "plans_file": os.path.join(info["pre"], plans_name + ".json")}
            c = spawn({**spec, "mode": "c"})
            rows.append(("c", trainer, c))
            s = {"c/a": c["seconds"] / a["seconds"], "c/b": c["seconds"] / b["seconds"],
                 "efficiency": c["seconds"] / (c["windows"] * c["evals"] * c["t_forward"]),
                 "rss_ratio": c["peak_rss_mb"] / a["peak_rss_mb"], "t_forward": c["t_forward"]}
            if TRAINERS[trainer].method_name == "diff_unet":
                d = spawn({**spec, "mode": "d"})
                rows.append(("d", trainer + " naive", d))
                s["d/c"] = d["seconds"] / c["seconds"]
            summary[trainer] = s
            print(f"  measured {trainer} ({time.perf_counter() - start:.0f} s)", flush=True)
        print()
        header = ["mode", "trainer", "patch", "windows", "evals/window", "s/case", "s/eval", "peak RSS MB"]
        table = [[m, t, "x".join(map(str, r["patch"])), r["windows"], r["evals"],
                  fmt(r["seconds"]) + ("*" if r["timed_windows"] < r["windows"] else "")
                  + ("+" if r.get("fitted_steps") else ""),
                  fmt(r["seconds"] / (r["windows"] * r["evals"])), f"{r['peak_rss_mb']:.0f}"] for m, t, r in rows]
        print_table(header, table)
        if any(r["timed_windows"] < r["windows"] for _, _, r in rows):
            print(f"* extrapolated from the first {args.max_windows} windows")
        if any(r.get("fitted_steps") for _, _, r in rows):
            print("+ fitted from 1- and 2-step runs: t1 + (K-1)(t2-t1)")
        print()
        print_table(["trainer", "c/a", "c/b", "d/c", "t_forward s", "efficiency", "rss c/a"],
                    [[t, f"{s['c/a']:.1f}", f"{s['c/b']:.2f}", f"{s['d/c']:.2f}" if "d/c" in s else "",
                      fmt(s["t_forward"]), f"{s['efficiency']:.2f}", f"{s['rss_ratio']:.2f}"]
                     for t, s in summary.items()])
        train_ratio = float("nan")
        if not args.no_training:
            timed = args.train_trainers or (["DiffUNetTrainer"] if args.quick and "DiffUNetTrainer" in diffusion
                                            else diffusion)
            ratios = train_ratios(info["name"], timed, args.device, args.threads,
                                  args.train_iterations or (4 if args.quick else 6))
            print()
            print_table(["trainer", "s/iter", "nnUNetTrainer s/iter (same plans)", "ratio"],
                        [[t, fmt(r["diff"]), fmt(r["base"]), f"{r['ratio']:.2f}"] for t, r in ratios.items()])
            train_ratio = ratios.get("DiffUNetTrainer", {}).get("ratio", float("nan"))
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
        efficiency = max(s["efficiency"] for s in summary.values())
        rss = max(s["rss_ratio"] for s in summary.values())
        naive = next((s["d/c"] for s in summary.values() if "d/c" in s), float("nan"))
        print(f"efficiency={efficiency:.2f} naive_speedup={naive:.2f} rss_ratio={rss:.2f} "
              f"train_iter_ratio={train_ratio:.2f}")
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
