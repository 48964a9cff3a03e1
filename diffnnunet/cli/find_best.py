"""diffnnunet_find_best_configuration: nnU-Net's find_best_configuration for every trainer (the stock nnUNetTrainer
included): cross-validation results per model, ensembles of pairs of models from their validation .npz, Dice / HD95 /
NSD / ECE / AUROC and the predict time per case, the best and the cheapest near it, postprocessing, and the commands.
"""
from __future__ import annotations

import argparse
import itertools
import os

from diffnnunet.cli.common import UserError, cli_entry, parse_device, require_env, resolve_dataset_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_find_best_configuration", description=__doc__, allow_abbrev=False)
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-tr", nargs="+", default=None,
                   help="trainers (default: every registered trainer with a model folder in nnUNet_results)")
    p.add_argument("-c", nargs="+", default=None, help="configurations (default: every trained one)")
    p.add_argument("-p", nargs="+", default=None, help="plans identifiers (default: every trained one)")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default: 0 1 2 3 4)")
    p.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)),
                   help="processes for evaluation, ensembling and postprocessing (1: all in this process)")
    p.add_argument("-o", default=None, help="folder for the report and the instructions (default: "
                                            "nnUNet_results/DatasetXXX, where nnU-Net writes its instructions)")
    p.add_argument("--disable_ensembling", action="store_true", help="no ensembles of pairs of models")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="the cheapest model or ensemble within this many Dice points of the best (default 0.5)")
    p.add_argument("--no_timing", action="store_true",
                   help="do not measure the predict seconds per case (then no cheapest and no Pareto plot)")
    p.add_argument("--timing_cases", type=int, default=2,
                   help="validation cases of the raw data each model predicts for the timing (default 2)")
    p.add_argument("-device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device of the timing")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint the timing loads")
    return p


def member(model) -> dict:
    return {"trainer": model.trainer, "configuration": model.configuration, "plans_identifier": model.plans}


def score_uncertainty(rows: list, members_of: dict, models: list, cases: dict, shared: set, reference: str,
                      folds) -> None:
    """Every row's AUROC, the held-out AUROC of its error map fitted on the shared validation cases
    (:mod:`~diffnnunet.inference.find_best_uncertainty`), and each ensemble's fitted error map stored in its
    folder (``error_map`` in the row: its path, None without errors to fit)."""
    import math

    from diffnnunet.inference import find_best_uncertainty as fbu

    print(f"fitting every row's error map on the {len(shared)} shared validation cases (the AUROC column)")
    by_id = {m.identifier: m for m in models}
    try:
        fits = fbu.validation_uncertainty({r["name"]: [by_id[i] for i in members_of[r["name"]]] for r in rows},
                                          cases, shared, reference)
    except ValueError as e:
        raise UserError(str(e)) from None
    for row in rows:
        fit = fits[row["name"]]
        row["AUROC"] = fbu.held_out_auroc(fit)
        row["AUROC_input"] = None if fit is None else fit["inputs"]
        row["AUROC_by_input"] = {} if fit is None else {
            k: None if math.isnan(v) else float(v) for k, v in fit["validation_auroc"].items()}
        if row["kind"] == "ensemble":
            row["error_map"] = fbu.store_ensemble_error_map(row["source"], fit, row["members"], folds, len(shared))


def compare(args, dataset_name: str) -> dict:
    """The whole flow (module docstring); returns the result that ``write_report`` writes."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.file_path_utilities import get_ensemble_name

    from diffnnunet.evaluation.find_best_report import choose, pareto_front, row_from_summary
    from diffnnunet.inference import find_best as fb

    results_dir = os.path.join(require_env("nnUNet_results"), dataset_name)
    from diffnnunet.trainers import TRAINERS
    models = fb.select_models(results_dir, args.tr, args.c, args.p, registered=set(TRAINERS))
    if not models:
        raise UserError(f"{results_dir}: no trained model to compare (train with: diffnnunet_train {args.d} "
                        "TRAINER FOLD --npz)")
    ending = load_json(os.path.join(models[0].folder, "dataset.json"))["file_ending"]
    cases = {m: fb.validation_cases(m, args.f, args.d, ending) for m in models}
    shared = set.intersection(*(set(c) for c in cases.values()))
    if not shared:
        raise UserError(f"the models share no validation case over folds {' '.join(map(str, args.f))} (different "
                        "splits?): " + ", ".join(m.identifier for m in models))
    for m, c in cases.items():
        if len(c) > len(shared):
            print(f"{m.identifier}: compared on the {len(shared)} validation cases every model has (of its {len(c)})")
    reference = fb.reference_folder(dataset_name)
    rows, members_of = [], {}
    for m in models:
        print(f"accumulating the cross-validation of {m.identifier}")
        merged = fb.accumulate(m, args.f, {k: v for k, v in cases[m].items() if k in shared}, ending, args.np)
        row = row_from_summary(m.identifier, "model", [member(m)], merged,
                               load_json(os.path.join(merged, "summary.json")))
        row["budget"] = [fb.budget(m)]
        rows.append(row)
        members_of[row["name"]] = [m.identifier]
    if not args.disable_ensembling:
        for m1, m2 in itertools.combinations(models, 2):
            name = get_ensemble_name(m1.folder, m2.folder, args.f)
            print(f"ensembling {m1.identifier} + {m2.identifier}")
            out = fb.ensemble([m1, m2], args.f, shared, os.path.join(results_dir, "ensembles", name), reference,
                              args.np)
            row = row_from_summary(name, "ensemble", [member(m1), member(m2)], out,
                                   load_json(os.path.join(out, "summary.json")))
            row["budget"] = [fb.budget(m1), fb.budget(m2)]
            rows.append(row)
            members_of[name] = [m1.identifier, m2.identifier]
    score_uncertainty(rows, members_of, models, cases, shared, reference, args.f)
    timing_note = "timing off (--no_timing)"
    if not args.no_timing:
        device = parse_device(args.device)
        timed_cases = sorted(shared)[: args.timing_cases]
        seconds = {}
        for m in models:
            print(f"timing {m.identifier} on {len(timed_cases)} validation case(s)")
            seconds[m.identifier] = fb.time_prediction(m, args.f, timed_cases, device, args.chk)
        for row in rows:  # an ensemble: its members', predicted one after the other
            row["seconds_per_case"] = sum(seconds[n] for n in members_of[row["name"]])
        timing_note = (f"measured on {len(timed_cases)} validation case(s) of the raw data on {device.type}, "
                       "model loading excluded, an ensemble's time the sum of its members'")
    front = set(pareto_front(rows))
    for row in rows:
        row["pareto"] = row["name"] in front
    tolerance = args.tolerance / 100
    best, cheapest = choose(rows, tolerance)
    for choice in {id(best): best, id(cheapest): cheapest}.values():
        if choice is not None:
            print(f"determining postprocessing for {choice['name']}")
            choice["postprocessing"] = fb.determine_postprocessing(choice["source"], reference, args.np)
    return {"dataset": args.d, "dataset_name": dataset_name, "folds": list(args.f), "n_shared": len(shared),
            "tolerance": tolerance, "timing_note": timing_note, "reference_folder": reference,
            "models": [m.identifier for m in models], "rows": rows, "best": best, "cheapest": cheapest}


@cli_entry("diffnnunet_find_best_configuration")
def main(argv=None):
    from diffnnunet.evaluation.find_best_report import markdown_table, write_report
    from diffnnunet.inference.find_best import MissingResults

    args = build_parser().parse_args(argv)
    if args.timing_cases < 1:
        raise UserError(f"--timing_cases must be >= 1, got {args.timing_cases}")
    if len(set(args.f)) != len(args.f) or any(not 0 <= f <= 4 for f in args.f):
        raise UserError(f"-f {' '.join(map(str, args.f))}: folds must be distinct, 0-4")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        require_env(name)
    dataset_name = resolve_dataset_name(args.d)
    try:
        result = compare(args, dataset_name)
    except MissingResults as e:
        raise UserError(str(e)) from None
    out_dir = args.o or os.path.join(os.environ["nnUNet_results"], dataset_name)
    paths = write_report(out_dir, result, args.np)
    print()
    print(markdown_table(result["rows"], result["best"], result["cheapest"]))
    print()
    best, cheapest = result["best"], result["cheapest"]
    print(f"best by Dice: {best['name']} ({best['Dice']:.4f}; after postprocessing "
          f"{best['postprocessing']['dice_after']:.4f})")
    if cheapest is not None:
        print(f"cheapest within {args.tolerance:g} Dice points: {cheapest['name']} ({cheapest['Dice']:.4f}, "
              f"{cheapest['seconds_per_case']:.2f} s per case)")
    print()
    with open(paths["instructions"]) as f:
        print(f.read())
    print("written: " + ", ".join(paths.values()))


if __name__ == "__main__":
    main()
