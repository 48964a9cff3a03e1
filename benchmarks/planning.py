"""Plans of nnU-Net's ExperimentPlanner ('nnUNetPlans') vs diffnnunet's DiffusionPlanner ('DiffnnUNetPlans') for
realistic dataset sizes, without realistic images.

For each scenario a one-case raw dataset is written with ``make_dataset`` (the planners only read one image, to
pick the reader) and a synthetic ``dataset_fingerprint.json`` describing the realistic dataset (case count, shapes,
spacings, intensities) is put into ``nnUNet_preprocessed``; ``dataset.json`` gets the scenario's ``numTraining``
(the planners use it for the 5 %-of-the-dataset batch size cap). Both planners then run ``plan_experiment()`` in
this process and one table compares their configurations. Everything lives in a temporary folder.

    python benchmarks/planning.py                       # all scenarios, 8 GB VRAM target
    python benchmarks/planning.py --scenarios ct3d --gpu-memory-target 24
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

# Realistic datasets. shape/spacing are numpy axis order (z, y, x) as nnU-Net's fingerprint stores them;
# *_jitter is the relative spread (uniform, +-) of the per-case values around the nominal ones.
SCENARIOS = {
    "ct3d": {
        "description": "3D CT, abdomen-like (1 channel CT, 3 labels)",
        "dim": 3, "num_cases": 40, "shape": (200, 512, 512), "shape_jitter": (0.4, 0.0, 0.0),
        "spacing": (2.5, 0.8, 0.8), "spacing_jitter": (0.4, 0.15, 0.15),
        "channels": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "tumor": 2},
        "intensities": [{"mean": 99.5, "median": 101.0, "std": 72.3, "min": -1024.0, "max": 3071.0,
                         "percentile_99_5": 289.0, "percentile_00_5": -87.0}],
        "relative_size_after_crop": 1.0,
    },
    "mr3d": {
        "description": "3D MR, prostate-like (2 channels T2/ADC, anisotropic, 3 labels)",
        "dim": 3, "num_cases": 32, "shape": (20, 320, 320), "shape_jitter": (0.25, 0.2, 0.2),
        "spacing": (3.6, 0.62, 0.62), "spacing_jitter": (0.1, 0.1, 0.1),
        "channels": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "intensities": [{"mean": 354.6, "median": 326.0, "std": 169.6, "min": 0.0, "max": 1969.0,
                         "percentile_99_5": 886.0, "percentile_00_5": 80.0},
                        {"mean": 1120.1, "median": 1104.0, "std": 368.2, "min": 0.0, "max": 3420.0,
                         "percentile_99_5": 2030.0, "percentile_00_5": 0.0}],
        "relative_size_after_crop": 1.0,
    },
    "2d": {
        "description": "2D, X-ray/slice-like (1 channel, 3 labels, shapes (1, 512, 512))",
        "dim": 2, "num_cases": 200, "shape": (1, 512, 512), "shape_jitter": (0.0, 0.0, 0.0),
        "spacing": (999.0, 0.5, 0.5), "spacing_jitter": (0.0, 0.0, 0.0),
        "channels": {"0": "rescale_to_0_1"}, "labels": {"background": 0, "lung": 1, "heart": 2},
        "intensities": [{"mean": 0.45, "median": 0.44, "std": 0.18, "min": 0.0, "max": 1.0,
                         "percentile_99_5": 0.93, "percentile_00_5": 0.05}],
        "relative_size_after_crop": 1.0,
    },
}
CONFIGS = ("2d", "3d_fullres", "3d_lowres")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS),
                   help="scenarios to plan (default: all)")
    p.add_argument("--gpu-memory-target", type=float, default=8.0, help="VRAM target in GB for both planners")
    p.add_argument("--num-cases", type=int, default=None, help="override every scenario's case count")
    p.add_argument("--method", default="diff_unet", help="diffusion method for the DiffusionPlanner")
    p.add_argument("--seed", type=int, default=0, help="seed for the per-case shape/spacing jitter")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (plans JSONs) and print it")
    return p


def make_fingerprint(sc: dict, num_cases: int, rng: np.random.Generator) -> dict:
    """The keys (and layout) of nnU-Net's DatasetFingerprintExtractor.run()."""
    shape, spacing = np.array(sc["shape"], float), np.array(sc["spacing"], float)
    shapes, spacings = [], []
    for _ in range(num_cases):
        s = shape * (1 + rng.uniform(-1, 1, 3) * np.array(sc["shape_jitter"]))
        shapes.append([max(1, int(round(v))) for v in s])
        spacings.append([float(v) for v in spacing * (1 + rng.uniform(-1, 1, 3) * np.array(sc["spacing_jitter"]))])
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {str(i): dict(v) for i, v in enumerate(sc["intensities"])},
        "median_relative_size_after_cropping": float(sc["relative_size_after_crop"]),
    }


def setup_scenario(root: str, dataset_id: int, key: str, sc: dict, num_cases: int, seed: int) -> str:
    from diffnnunet.datasets.synthetic import make_dataset

    name = f"Dataset{dataset_id:03d}_Bench{key.upper()}"
    num_channels = len(sc["channels"])
    folder = make_dataset(os.environ["nnUNet_raw"], dataset_id, dim=sc["dim"], num_train=1, num_test=0,
                          num_channels=num_channels, seed=seed, name=name)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    dataset_json.update(channel_names=dict(sc["channels"]), labels=dict(sc["labels"]), numTraining=num_cases)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], name)
    os.makedirs(pre, exist_ok=True)
    with open(os.path.join(pre, "dataset_fingerprint.json"), "w") as f:
        json.dump(make_fingerprint(sc, num_cases, np.random.default_rng(seed)), f)
    return name


def run_planners(name: str, gpu_memory_target: float, method: str):
    """{plans identifier: (plans, seconds)}; the planners' chatter is swallowed."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from diffnnunet.planners import DiffusionPlanner

    out = {}
    for label, make in (("nnUNetPlans", lambda: ExperimentPlanner(name, gpu_memory_target)),
                        ("DiffnnUNetPlans", lambda: DiffusionPlanner(name, gpu_memory_target, method=method))):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            plans = make().plan_experiment()
        out[label] = (plans, time.perf_counter() - start)
    return out


def _fmt_list(values, digits=None):
    if digits is None:
        return "x".join(str(int(v)) for v in values)
    return "x".join(f"{float(v):.{digits}f}".rstrip("0").rstrip(".") for v in values)


def rows_for(key: str, results: dict) -> list:
    rows = []
    base_plans, diff_plans = results["nnUNetPlans"][0], results["DiffnnUNetPlans"][0]
    for c in CONFIGS:
        base_cfg, diff_cfg = base_plans["configurations"].get(c), diff_plans["configurations"].get(c)
        if base_cfg is None and diff_cfg is None:
            continue
        vox = {}
        for planner, cfg in (("nnU-Net", base_cfg), ("DiffnnUNet", diff_cfg)):
            if cfg is None:
                rows.append([key, c, planner, "-", "-", "-", "-", "-", "(no such configuration)"])
                continue
            v = int(np.prod(cfg["patch_size"], dtype=np.int64)) * int(cfg["batch_size"])
            vox[planner] = v
            ratio = ""
            if planner == "DiffnnUNet" and "nnU-Net" in vox:
                ratio = f"{v / vox['nnU-Net']:.3f}"
            rows.append([key, c, planner, _fmt_list(cfg["patch_size"]), str(cfg["batch_size"]),
                         _fmt_list(cfg["spacing"], 3), str(cfg["architecture"]["arch_kwargs"]["n_stages"]),
                         f"{v:,}", ratio])
    return rows


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print(line)
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            print(line)
        prev = r[0]
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = tempfile.mkdtemp(prefix="diffnnunet_bench_planning_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    try:
        import torch
        print(f"Planner comparison: nnU-Net ExperimentPlanner (nnUNetPlans) vs diffnnunet DiffusionPlanner "
              f"(DiffnnUNetPlans, method {args.method}), VRAM target {args.gpu_memory_target:g} GB, "
              f"synthetic fingerprints (seed {args.seed}); torch {torch.__version__}")
        rows, notes = [], []
        for i, key in enumerate(args.scenarios):
            sc = SCENARIOS[key]
            n = args.num_cases or sc["num_cases"]
            name = setup_scenario(root, 950 + i, key, sc, n, args.seed)
            results = run_planners(name, args.gpu_memory_target, args.method)
            rows += rows_for(key, results)
            notes.append(f"  {key:5s} {sc['description']}: {n} cases, median shape {_fmt_list(sc['shape'])} at "
                         f"spacing {_fmt_list(sc['spacing'], 3)} (z,y,x); planning time nnU-Net "
                         f"{results['nnUNetPlans'][1]:.1f} s, DiffnnUNet {results['DiffnnUNetPlans'][1]:.1f} s")
        print("Scenarios:")
        print("\n".join(notes))
        print()
        print_table(["scenario", "config", "planner", "patch", "batch", "spacing", "n_stages", "voxels/batch",
                     "Diff/nnU-Net voxels/batch"], rows)
        print("\nvoxels/batch = prod(patch_size) * batch_size. Both planners fit the same VRAM target; the "
              "DiffusionPlanner counts the feature maps of the whole diffusion network (noisy-label input channels, "
              "time embedding, separate image encoder), so a ratio < 1 means fewer voxels per training step.")
        if args.keep:
            print(f"\nplans kept in {os.environ['nnUNet_preprocessed']}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
