"""Segmentation and uncertainty quality of every trainer against nnUNetTrainer at the same iteration budget.

Every trainer is trained on fold 0 of the same plans-preprocessed data with the same budget (epochs x iterations per
epoch), the same seed for the weights' initialisation, then predicts the held-out test cases with its plans'
defaults (after the sampling tuning diffnnunet_train runs by default) and is evaluated by diffnnunet's evaluation
(Dice, HD95, NSD, ECE, AUROC of uncertainty vs error). The budget is repeated at several multiples (``--budgets 1
4``) and seeds (``--seeds 0 1``); nnU-Net's augmentation workers are not seeded, so the spread between seeds
includes the data order as well as the initialisation.

Default data: the demo's (2D ICBM152 slices, generated in --workdir, training and test slabs spatially separate).
``-d ID`` uses an already planned dataset of the current nnUNet_raw / nnUNet_preprocessed / nnUNet_results instead
(its imagesTs/labelsTs are the test cases; results go to a scratch copy of nnUNet_results under --workdir).
``--set KEY=VALUE`` overrides a diffusion plans key of every diffusion trainer for the whole run (dotted keys
reach into sections: ``--set ema.enabled=false optimizer.initial_lr=1e-4``): the ablation switch.

``--suite`` is the development benchmark suite (benchmarks/suite.py: four datasets, three seeds, every trainer
through the default command lines, with the raw / exported / control uncertainty AUROCs).

The last lines are ``worst_dice_gap=G worst_ece_ratio=R``: over the diffusion trainers and budgets (means over
seeds), the minimum of (trainer Dice - nnUNetTrainer Dice) and the maximum of trainer ECE / nnUNetTrainer ECE.

    python benchmarks/quality.py                                 # demo data, all trainers, budgets 1 and 4, 2 seeds
    python benchmarks/quality.py --trainers DiffUNetTrainer --budgets 1 --seeds 0 --set ema.enabled=false
    python benchmarks/quality.py --suite --workdir suite                 # every trainer, 4 datasets, 3 seeds
    python benchmarks/quality.py --suite --datasets nuclei2d --trainers nnUNetTrainer DiffUNetTrainer
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.suite import (  # noqa: E402, F401
    BASELINE,
    SUITE,
    parse_overrides,
    run_suite,
    summarise,
    validation_figures,
    with_overrides,
)
from diffnnunet.utils import merge_nested as merge  # noqa: E402, F401  (the merge --set applies; tested here)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="quality_benchmark")
    p.add_argument("--trainers", nargs="+", default=None, help="default: every registered trainer")
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 4], help="multiples of the base epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=10, help="base epochs (the demo's)")
    p.add_argument("--iterations-per-epoch", type=int, default=25)
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="diffusion plans overrides")
    p.add_argument("-d", "--dataset", default=None, help="a planned dataset id (default: the demo's data)")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--factor", type=int, default=3, help="demo data: downsampling of the 1 mm template")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-tune", action="store_true",
                   help="predict with the plans' sampling budget (default: tune it after training, as "
                        "diffnnunet_train does; the tuning's seconds count as training)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip nnUNetTrainer (ablations of the diffusion trainers; no gap line then)")
    p.add_argument("--json", default=None, help="also write every run's numbers to this file")
    p.add_argument("--suite", action="store_true", help="the development suite (module docstring); --seeds "
                                                        "defaults to 0 1 2 there")
    p.add_argument("--datasets", nargs="+", default=list(SUITE), choices=list(SUITE), help="suite datasets")
    p.add_argument("--runs-from", default=None, metavar="FOLDER",
                   help="suite: reuse the finished runs in FOLDER/<dataset>/ (e.g. benchmarks/runs), copied into "
                        "the work folder where it has none of that name")
    return p


def apply_overrides(preprocessed: str, dataset: str, overrides: dict) -> dict:
    """Rewrite every diffusion plans file of the dataset with the overrides; returns {file: original text}."""
    from diffnnunet.methods import METHODS
    originals = {}
    for name in {m.plans_name for m in METHODS.values()}:
        path = os.path.join(preprocessed, dataset, name + ".json")
        if not os.path.isfile(path) or not overrides:
            continue
        text = open(path).read()
        originals[path] = text
        with open(path, "w") as f:
            json.dump(with_overrides(json.loads(text), overrides), f, indent=2)
    return originals


def run_one(trainer: str, budget: int, seed: int, args, ctx: dict) -> dict:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from diffnnunet import demo
    from diffnnunet.evaluation import evaluate_folder

    run_args = argparse.Namespace(**vars(args))
    run_args.epochs = args.epochs * budget
    run_args.steps = run_args.samples = None
    t_train = demo._train(trainer, run_args, ctx["device"], seed, ctx["dataset"], args.configuration)
    folder = demo._model_folder(trainer, ctx["dataset"], args.configuration)
    t_tune = 0.0
    if not args.no_tune:  # diffnnunet_train's default last step: the tuned budget and temperature
        t_tune, line = demo._tune(trainer, ctx["device"], ctx["dataset"], args.configuration)
        if line:
            print(f"{trainer}: {line}", flush=True)
    out = os.path.join(args.workdir, "predictions", f"{trainer}_x{budget}_s{seed}")
    t_pred = demo._predict(trainer, ctx["images"], out, run_args, ctx["device"], folder)
    s = evaluate_folder(ctx["labels"], out, os.path.join(out, "summary.json"), SimpleITKIO(), ctx["ending"],
                        ctx["labels_or_regions"], num_processes=2)
    fg, unc = s["foreground_mean"], s.get("uncertainty") or {}
    return {"trainer": trainer, "budget": budget, "seed": seed, "Dice": fg["Dice"], "HD95": fg["HD95"],
            "NSD": fg["NSD"], "ECE": unc.get("ECE"), "AUROC": unc.get("AUROC_uncertainty_vs_error"),
            "train_s": t_train + t_tune, "predict_s": t_pred}


def prepare(args) -> dict:
    from diffnnunet import demo
    from diffnnunet.cli.common import parse_device, resolve_dataset_name
    from diffnnunet.cli.plan_and_preprocess import plan_and_preprocess_dataset

    device = parse_device(args.device)
    if args.dataset is None:
        paths = demo._set_paths(args.workdir)
        from diffnnunet.datasets.icbm152 import make_icbm152_dataset
        raw = make_icbm152_dataset(paths["nnUNet_raw"], demo.DATASET_ID, factor=args.factor)
        dataset = os.path.basename(raw)
        plan_and_preprocess_dataset(dataset, [args.configuration], 2, clean=True)
    else:
        dataset = resolve_dataset_name(args.dataset)
        raw = os.path.join(os.environ["nnUNet_raw"], dataset)
        os.environ["nnUNet_results"] = os.path.abspath(os.path.join(args.workdir, "nnUNet_results"))
    dj = json.load(open(os.path.join(raw, "dataset.json")))
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager(dj["labels"], dj.get("regions_class_order"))
    return {"device": device, "dataset": dataset, "images": os.path.join(raw, "imagesTs"),
            "labels": os.path.join(raw, "labelsTs"), "ending": dj["file_ending"],
            "labels_or_regions": lm.foreground_regions if lm.has_regions else lm.foreground_labels}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.seeds_given = "--seeds" in (argv if argv is not None else sys.argv[1:])
    from diffnnunet.trainers import TRAINERS
    trainers = args.trainers or [t for t in TRAINERS if t != "DiffusionTrainer"]
    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown:
        raise SystemExit(f"unknown trainer(s) {unknown} (known: {', '.join(TRAINERS)})")
    if args.no_baseline:
        trainers = [t for t in trainers if t != BASELINE]
    elif BASELINE not in trainers:
        trainers = [BASELINE, *trainers]
    os.makedirs(args.workdir, exist_ok=True)
    if args.suite:
        return run_suite(args, trainers)
    start = time.perf_counter()
    ctx = prepare(args)
    originals = apply_overrides(os.environ["nnUNet_preprocessed"], ctx["dataset"], parse_overrides(args.set))
    runs = []
    try:
        for budget in args.budgets:
            for seed in args.seeds:
                for trainer in trainers:
                    runs.append(run_one(trainer, budget, seed, args, ctx))
                    r = runs[-1]
                    print(f"[{time.perf_counter() - start:7.0f} s] {trainer} x{budget} seed {seed}: "
                          f"Dice {r['Dice']:.4f} HD95 {r['HD95']:.2f} ECE {r['ECE'] or float('nan'):.4f} "
                          f"AUROC {r['AUROC'] or float('nan'):.4f} train {r['train_s']:.0f} s "
                          f"predict {r['predict_s']:.1f} s", flush=True)
    finally:
        for path, text in originals.items():
            with open(path, "w") as f:
                f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    table, gap, ratio = summarise(runs)
    base = f"{args.epochs} x {args.iterations_per_epoch} iterations"
    print(f"\n== quality at budget multiples of {base} ({ctx['dataset']}, fold 0, {len(args.seeds)} seed(s); "
          f"mean ± half-range over seeds)" + (f", overrides {' '.join(args.set)}" if args.set else ""))
    print(table)
    print(f"\nworst_dice_gap={gap:.4f} worst_ece_ratio={ratio:.3f}")
    if args.dataset is None:
        shutil.rmtree(os.path.join(args.workdir, "nnUNet_results"), ignore_errors=True)


if __name__ == "__main__":
    main()
