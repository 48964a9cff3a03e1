"""diffnnunet_tune_sampling: measure validation Dice over a grid of sampling steps x samples and store the cheapest
budget within a tolerance of the best in the model folder (``sampling.json``), with the temperature and the error
map fitted at that budget; diffnnunet_predict then uses them. A stock nnUNetTrainer model gets the same calibration
(no budget)."""
from __future__ import annotations

import argparse
import os

from diffnnunet.cli.common import UserError, cli_entry, parse_device, require_env


def build_parser() -> argparse.ArgumentParser:
    from diffnnunet.inference.tuning import DEFAULT_SAMPLES, DEFAULT_STEPS
    p = argparse.ArgumentParser(prog="diffnnunet_tune_sampling", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-tr", default="DiffUNetTrainer", help="trainer the model was trained with")
    p.add_argument("-c", default=None, help="configuration (default: as diffnnunet_predict)")
    p.add_argument("-p", default=None, help="plans identifier (default depends on the trainer)")
    p.add_argument("-f", nargs="+", default=None, help="folds whose validation cases are used (default: every "
                                                       "trained fold 0-4)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="steps grid (default %(default)s)")
    p.add_argument("--samples", type=int, nargs="+", default=list(DEFAULT_SAMPLES),
                   help="samples grid (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.5, help="Dice points below the best that still count as "
                                                                "good (default 0.5, i.e. 0.005 Dice)")
    p.add_argument("--max_cases", type=int, default=None, help="validation cases per fold (default: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the plans')")
    p.add_argument("--no_calibration", action="store_true",
                   help="do not fit the temperature of the exported probabilities nor the error map of the "
                        "uncertainty map (fitted by default at the chosen budget on the same validation cases; "
                        "applied by diffnnunet_predict)")
    p.add_argument("-device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def run_tuning(dataset: str, trainer: str, configuration=None, plans=None, folds=None,
               checkpoint="checkpoint_final.pth", steps=None, samples=None, tolerance_points: float = 0.5,
               max_cases=None, seed=None, device=None, calibration: bool = True):
    """Resolve the model like diffnnunet_predict, tune, print the table; returns the stored summary."""
    from math import nan

    from diffnnunet.cli.predict import resolve_model
    from diffnnunet.inference.tuning import DEFAULT_SAMPLES, DEFAULT_STEPS, SAMPLING_FILE, tune_sampling

    ns = argparse.Namespace(d=dataset, tr=trainer, c=configuration, p=plans, f=folds, chk=checkpoint)
    folder, configuration, folds = resolve_model(ns)
    folds = [f for f in folds if f != "all"]
    if not folds:
        raise UserError(f"{folder}: tuning needs a fold 0-4 (fold 'all' has no validation cases)")
    name = os.path.basename(os.path.dirname(folder))
    pre = os.path.join(require_env("nnUNet_preprocessed"), name)
    steps, samples = list(steps or DEFAULT_STEPS), list(samples or DEFAULT_SAMPLES)
    if min(steps + samples) < 1:
        raise UserError("--steps and --samples values must be >= 1")
    try:
        summary = tune_sampling(folder, pre, folds, steps, samples, tolerance_points / 100,
                                device or parse_device("auto"), checkpoint, max_cases, seed,
                                calibration=calibration)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    if "grid" in summary:
        print(f"{'steps':>5} {'samples':>7} {'evals':>5}  {'Dice':>6}  {'ECE':>6}  AUROC (uncertainty vs error)")
        for r in summary["grid"]:
            mark = "  <- chosen" if (r["steps"], r["samples"]) == (summary["sampling_steps"],
                                                                  summary["samples_per_step"]) else ""
            print(f"{r['steps']:>5} {r['samples']:>7} {r['evaluations']:>5}  {r['dice']:.4f}  "
                  f"{r.get('ece', nan):.4f}  {r.get('auroc', nan):.4f}{mark}")
        print(f"{os.path.join(folder, SAMPLING_FILE)}: {summary['sampling_steps']} steps x "
              f"{summary['samples_per_step']} samples (Dice {summary['dice']:.4f}, best {summary['best']['dice']:.4f}, "
              f"{summary['cases']} cases)")
    elif summary.get("budget") == "plans":
        print(f"{os.path.join(folder, SAMPLING_FILE)}: the plans' budget kept ({summary['sampling_steps']} steps x "
              f"{summary['samples_per_step']} samples, recipe {summary['recipe']}), calibrated on "
              f"{summary['cases']} validation cases")
    else:
        print(f"{os.path.join(folder, SAMPLING_FILE)}: calibration of the stock model on {summary['cases']} "
              "validation cases (mirroring on, as diffnnunet_predict predicts it)")
    cal = summary.get("calibration")
    if cal:
        print(f"temperature {cal['temperature']:.3f}: validation ECE {cal['ece_before']:.4f} -> "
              f"{cal['ece_after']:.4f}, "
              f"NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f} ({cal['voxels']} voxels)")
        if cal.get("error_map"):
            em = cal["error_map"]
            source = f"the {em['measure']} map" if em["inputs"] == "map" else "the exported probabilities' margin"
            print(f"error map of {source}: validation AUROC {em['auroc_before']:.4f} (raw) -> "
                  f"{em['auroc_after']:.4f} (held out: each half of the cases scored with the other half's fit)")
    return summary


@cli_entry("diffnnunet_tune_sampling")
def main(argv=None):
    args = build_parser().parse_args(argv)
    run_tuning(args.d, args.tr, args.c, args.p, args.f, args.chk, args.steps, args.samples, args.tolerance,
               args.max_cases, args.seed, parse_device(args.device), calibration=not args.no_calibration)


if __name__ == "__main__":
    main()
