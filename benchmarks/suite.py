"""The development benchmark suite (``python benchmarks/quality.py --suite``): every trainer through the default
command lines (``diffnnunet_plan_and_preprocess``, ``diffnnunet_train`` with its end-of-training tuning and
calibration, ``diffnnunet_predict --save_uncertainty --save_probabilities``, ``diffnnunet_evaluate``), each in its
own process, on four datasets built from data that ships inside packages (diffnnunet/datasets/subjects.py):
``brain3d`` (3D, independent warped subjects), ``skullstripped2d`` (zero background outside the brain),
``nuclei2d`` (four labels, two small) and ``demo``; three training seeds by default; one table per dataset with
mean ± sd over seeds and the worst Dice gap / ECE ratio against nnUNetTrainer. Runs already in ``--workdir`` are
reused, so an interrupted suite continues where it stopped.

Uncertainty is reported like for like (every trainer, nnUNetTrainer included, gets the same temperature and
error-map calibration at the end of training) with three test AUROCs against the voxel errors per run:

- ``AUROC_raw``: the map before calibration (``diffnnunet_predict --raw_uncertainty``: a diffusion model's native
  map of its chains; for nnUNetTrainer the normalised entropy of its softmax);
- ``AUROC`` (exported): the map ``diffnnunet_predict --save_uncertainty`` writes;
- ``AUROC_control``: the control, the exported probabilities' margin h = 1 - (p_(1) - p_(2)) recalibrated per
  predicted label by the error-map curves fitted on the validation cases (sampling.json: the error map itself when
  the tuning chose the margin, its ``control`` curves when it chose the chains' map);

and the same three within each predicted label (``*_within``: the unweighted mean over labels of the AUROC
among the voxels predicted as that label). A diffusion map counts as better only where its exported AUROC beats
nnU-Net's exported AUROC and its own control by more than the seed spread.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from diffnnunet.utils import merge_nested, write_json

BASELINE = "nnUNetTrainer"
#: the suite's datasets: (dataset id, configuration); the subjects' are built by diffnnunet.datasets.subjects
SUITE = {"brain3d": (981, "3d_fullres"), "skullstripped2d": (982, "2d"), "nuclei2d": (983, "2d"), "demo": (990, "2d")}
#: the test table's columns
TEST_KEYS = ("Dice", "HD95", "NSD", "ECE", "AUROC_raw", "AUROC", "AUROC_control", "AUROC_within",
             "AUROC_control_within", "train_s", "predict_s")
#: the validation table's columns (fold 0's validation cases: what defaults are chosen on)
VALIDATION_KEYS = ("val_Dice", "val_ECE", "val_AUROC")


def summarise(runs: list, spread: str = "half-range",
              keys=("Dice", "HD95", "NSD", "ECE", "AUROC", "train_s", "predict_s")) -> tuple[str, float, float]:
    """Mean and half-range (or ``spread="sd"``: sample standard deviation, 0 for one seed) over seeds per (trainer,
    budget) of ``keys``; the worst gaps against the baseline."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["trainer"], r["budget"]), []).append(r)
    lines = [f"{'trainer':>16s} {'budget':>6s} {'seeds':>5s} " + " ".join(f"{k:>15s}" for k in keys)]
    means = {}
    for (trainer, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != BASELINE, kv[0][0])):
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            mean = statistics.fmean(vals) if vals else float("nan")
            if spread == "sd":
                width = statistics.stdev(vals) if len(vals) > 1 else 0.0
            else:
                width = (max(vals) - min(vals)) / 2 if vals else float("nan")
            means[(trainer, budget, k)] = mean
            cells.append(f"{mean:8.4f}±{width:6.4f}" if k not in ("train_s", "predict_s")
                         else f"{mean:9.1f}±{width:5.1f}")
        lines.append(f"{trainer:>16s} {'x' + str(budget):>6s} {len(rs):5d} " + " ".join(cells))
    gaps, ratios = [], []
    for (trainer, budget), _ in groups.items():
        if trainer == BASELINE or (BASELINE, budget) not in groups or not {"Dice", "ECE"} <= set(keys):
            continue
        gaps.append(means[(trainer, budget, "Dice")] - means[(BASELINE, budget, "Dice")])
        base_ece = means[(BASELINE, budget, "ECE")]
        ratios.append(means[(trainer, budget, "ECE")] / base_ece if base_ece else float("inf"))
    return "\n".join(lines), (min(gaps) if gaps else float("nan")), (max(ratios) if ratios else float("nan"))


def _cli(module: str, argv: list, env: dict, log) -> float:
    """``python -m diffnnunet.cli.<module> argv`` in its own process (the default command line); seconds. A
    failure stops the suite with the command's last error line."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"diffnnunet.cli.{module}", *map(str, argv)], env=env,
                          stdout=log, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"suite: diffnnunet.cli.{module} {' '.join(map(str, argv))} failed: {last}")
    return time.perf_counter() - start


def make_suite_dataset(name: str, raw_root: str) -> str:
    """The raw folder of a suite dataset (built once)."""
    from diffnnunet.datasets.icbm152 import make_icbm152_dataset
    from diffnnunet.datasets.subjects import SUITE_DATASETS, make_subjects_dataset
    if name == "demo":
        return make_icbm152_dataset(raw_root, SUITE["demo"][0])
    return make_subjects_dataset(raw_root, **SUITE_DATASETS[name])


def _seed_env(env: dict, seed: int) -> dict:
    """Each seed's models in their own nnUNet_results (every trainer of a seed side by side)."""
    return dict(env, nnUNet_results=os.path.join(os.path.dirname(env["nnUNet_results"]), f"nnUNet_results_s{seed}"))


def default_plans(trainer: str) -> str:
    from diffnnunet.trainers import default_plans_for, get_trainer_class
    return default_plans_for(get_trainer_class(trainer))


def model_folder(results: str, trainer: str, configuration: str, plans: str | None = None) -> str:
    return os.path.join(results, f"{trainer}__{plans or default_plans(trainer)}__{configuration}")


def parse_overrides(items) -> dict:
    """["ema.enabled=false", "optimizer.initial_lr=1e-4"] -> nested dict with JSON-parsed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def with_overrides(plans: dict, overrides: dict) -> dict:
    """``plans`` (a plans.json dict) with the nested ``overrides`` merged into every configuration's diffusion
    section, in place; returned for convenience."""
    for cfg in plans["configurations"].values():
        if "diffusion" in cfg:
            cfg["diffusion"] = merge_nested(cfg["diffusion"], overrides)
    return plans


def variant_plans(preprocessed: str, trainer: str, overrides: list) -> tuple[str | None, str]:
    """``--set KEY=VALUE ...`` for a diffusion trainer: a copy of its default plans (same preprocessed data) named
    ``<plans>_set_<key>-<value>...`` with the overrides merged into every configuration's diffusion section
    (dotted keys reach into sections), written once; (that plans name, the tag its runs are stored under). The
    baseline and runs without overrides: (None, "")."""
    if not overrides or trainer == BASELINE:
        return None, ""
    tag = "_set_" + "_".join(item.replace("=", "-").replace("/", "-") for item in sorted(overrides))
    base = default_plans(trainer)
    path = os.path.join(preprocessed, base + tag + ".json")
    if not os.path.isfile(path):
        plans = with_overrides(json.load(open(os.path.join(preprocessed, base + ".json"))), parse_overrides(overrides))
        plans["plans_name"] = base + tag
        write_json(path, plans)
    return base + tag, tag


def suite_run(name: str, trainer: str, seed: int, args, raw: str, env: dict, log, plans: str | None = None) -> dict:
    """One trainer, one seed on one suite dataset through the command lines: train (default tuning), predict,
    evaluate; the row of :func:`summarise`, with :func:`uncertainty_figures`."""
    dataset_id, configuration = SUITE[name]
    env = _seed_env(env, seed)
    chosen = ["-p", plans] if plans else []
    t_train = _cli("train", [dataset_id, trainer, 0, "-c", configuration, *chosen, "--epochs", args.epochs,
                             "--iterations-per-epoch", args.iterations_per_epoch, "--val-iterations",
                             args.val_iterations, "--seed", seed, "-device", args.device], env, log)
    out = _prediction_folder(args, name, trainer, seed, plans)
    shutil.rmtree(out, ignore_errors=True)
    t_pred = _cli("predict", ["-i", os.path.join(raw, "imagesTs"), "-o", out, "-d", dataset_id, "-tr", trainer, "-f",
                              0, "-c", configuration, *chosen, "--save_uncertainty", "--save_probabilities",
                              "-device", args.device], env, log)
    _cli("evaluate", ["-ref", os.path.join(raw, "labelsTs"), "-pred", out, "-djfile",
                      os.path.join(out, "dataset.json"), "-o", os.path.join(out, "summary.json")], env, log)
    s = json.load(open(os.path.join(out, "summary.json")))
    fg, unc = s["foreground_mean"], s.get("uncertainty") or {}
    row = {"dataset": name, "trainer": trainer, "budget": 1, "seed": seed, "training": training_budget(args),
           "Dice": fg["Dice"], "HD95": fg["HD95"],
           "NSD": fg["NSD"], "ECE": unc.get("ECE"), "AUROC": unc.get("AUROC_uncertainty_vs_error"),
           "train_s": t_train, "predict_s": t_pred,
           "Dice_per_label": {k: v["Dice"] for k, v in s["mean"].items()},
           **validation_figures(os.path.join(env["nnUNet_results"], os.path.basename(raw)), trainer, configuration,
                                plans)}
    if plans:
        row.update(trainer=trainer + plans[len(default_plans(trainer)):], plans=plans)
    return {**row, **uncertainty_figures(name, trainer, seed, args, raw, env, log, plans)}


def _prediction_folder(args, name: str, trainer: str, seed: int, plans: str | None) -> str:
    tag = plans[len(default_plans(trainer)):] if plans else ""
    return os.path.join(args.workdir, name, "predictions", f"{trainer}{tag}_s{seed}")


def uncertainty_figures(name: str, trainer: str, seed: int, args, raw: str, env: dict, log,
                        plans: str | None = None) -> dict:
    """The raw, exported and control AUROCs of a finished run's test predictions, pooled and within predicted
    labels (module docstring): the exported prediction re-evaluated, a second prediction with
    ``--raw_uncertainty`` (same seed, so the same segmentation), and the control computed here."""
    dataset_id, configuration = SUITE[name]
    env = _seed_env(env, seed)
    out = _prediction_folder(args, name, trainer, seed, plans)
    out_raw = out + "_raw"
    shutil.rmtree(out_raw, ignore_errors=True)
    _cli("predict", ["-i", os.path.join(raw, "imagesTs"), "-o", out_raw, "-d", dataset_id, "-tr", trainer, "-f", 0,
                     "-c", configuration, *(["-p", plans] if plans else []), "--save_uncertainty", "--raw_uncertainty",
                     "--save_probabilities",
                     "-device", args.device], env, log)
    figures = {}
    for folder, suffix in ((out, ""), (out_raw, "_raw")):
        _cli("evaluate", ["-ref", os.path.join(raw, "labelsTs"), "-pred", folder, "-djfile",
                          os.path.join(folder, "dataset.json"), "-o", os.path.join(folder, "summary.json")], env, log)
        unc = json.load(open(os.path.join(folder, "summary.json"))).get("uncertainty") or {}
        figures.update({f"AUROC{suffix}": unc.get("AUROC_uncertainty_vs_error"),
                        f"AUROC{suffix}_within": unc.get("AUROC_within_label_mean")})
    from diffnnunet.inference.uncertainty_control import control_auroc, control_curves
    curves = control_curves(model_folder(os.path.join(env["nnUNet_results"], os.path.basename(raw)), trainer,
                                         configuration, plans))
    figures.update(control_auroc(out, os.path.join(raw, "labelsTs"), curves))
    return figures


def validation_figures(results: str, trainer: str, configuration: str, plans: str | None = None) -> dict:
    """What the protocol chooses defaults on: fold 0's validation figures of a trained model, from nnU-Net's
    validation summary (``val_Dice``: foreground mean Dice of the final validation) and the tuning's sampling.json
    (``val_ECE`` after the temperature, ``val_AUROC``: the error map's held-out AUROC; the budget it chose)."""
    folder = model_folder(results, trainer, configuration, plans)
    out = {}
    summary = os.path.join(folder, "fold_0", "validation", "summary.json")
    if os.path.isfile(summary):
        out["val_Dice"] = json.load(open(summary))["foreground_mean"]["Dice"]
    tuned = os.path.join(folder, "sampling.json")
    if os.path.isfile(tuned):
        t = json.load(open(tuned))
        cal = t.get("calibration") or {}
        out.update(val_ECE=cal.get("ece_after"), val_AUROC=(cal.get("error_map") or {}).get("auroc_after"),
                   budget_tuned=[t["sampling_steps"], t["samples_per_step"]] if "sampling_steps" in t else None,
                   error_map_input=(cal.get("error_map") or {}).get("inputs"))
    return out


def training_budget(args) -> list[int]:
    """``[epochs, iterations per epoch, validation iterations]`` of a suite run, stored in its run file."""
    return [int(args.epochs), int(args.iterations_per_epoch), int(args.val_iterations)]


def check_budget(path: str, row: dict, training: list[int], recorded: bool) -> None:
    """ValueError naming ``path`` when its run was trained at another budget than ``training``
    (:func:`training_budget`); a run that does not record its budget passes unless ``recorded`` is asked."""
    found = row.get("training", None if recorded else training)
    if found != training:
        raise ValueError(f"{path}: trained at {found or 'not recorded'}, not this suite's {training} (epochs x "
                         "iterations x validation iterations)")


def stored_run(path: str, training: list[int]) -> dict:
    """A finished run of the work folder; one trained at another budget stops the suite naming the file (a run of
    an earlier version that does not record its budget is taken as it is)."""
    row = json.load(open(path))
    try:
        check_budget(path, row, training, recorded=False)
    except ValueError as e:
        raise SystemExit(f"suite: {e}; use another --workdir") from None
    return row


def reuse_runs(source: str, runs: str, training: list[int] | None = None) -> list[str]:
    """Finished runs kept elsewhere (``source``: run files ``<trainer>_s<seed>.json`` of one dataset, e.g.
    ``benchmarks/runs/brain3d``) copied into the work folder's ``runs`` folder where it has no file of that name,
    so the suite skips them; returns the names copied. A file that is not a suite run, is the run of another
    dataset, trainer or seed than its folder and name say, or (given ``training``, :func:`training_budget`) was
    trained at another budget or does not say its budget, is refused naming the file."""
    os.makedirs(runs, exist_ok=True)
    copied = []
    for f in sorted(os.listdir(source)) if os.path.isdir(source) else []:
        if not f.endswith(".json") or os.path.isfile(os.path.join(runs, f)):
            continue
        row = json.load(open(os.path.join(source, f)))
        if not {"dataset", "trainer", "seed", "Dice"} <= set(row):
            raise ValueError(f"{os.path.join(source, f)}: not a suite run (no dataset, trainer, seed or Dice)")
        says = (os.path.basename(os.path.normpath(source)), f"{row['trainer']}_s{row['seed']}.json")
        if (row["dataset"], f) != says:
            raise ValueError(f"{os.path.join(source, f)}: the run of {row['dataset']} {row['trainer']} seed "
                             f"{row['seed']}, not what its folder and name say")
        if training is not None:
            check_budget(os.path.join(source, f), row, training, recorded=True)
        write_json(os.path.join(runs, f), row)
        copied.append(f)
    return copied


def run_suite(args, trainers: list) -> None:
    """Every dataset of ``args.datasets``, every trainer, every seed (module docstring); one table per dataset."""
    seeds = args.seeds if args.seeds_given else [0, 1, 2]
    all_runs = []
    for name in args.datasets:
        root = os.path.abspath(os.path.join(args.workdir, name))
        env = dict(os.environ, nnUNet_raw=os.path.join(root, "nnUNet_raw"),
                   nnUNet_preprocessed=os.path.join(root, "nnUNet_preprocessed"),
                   nnUNet_results=os.path.join(root, "nnUNet_results"), nnUNet_n_proc_DA="2",
                   nnUNet_def_n_proc="2")
        for k in ("nnUNet_raw", "nnUNet_preprocessed"):
            os.makedirs(env[k], exist_ok=True)
        os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
        with open(os.path.join(root, "commands.log"), "a") as log:
            dataset_id, configuration = SUITE[name]
            raw = [os.path.join(env["nnUNet_raw"], d) for d in os.listdir(env["nnUNet_raw"])
                   if d.startswith(f"Dataset{dataset_id:03d}_")]
            raw = raw[0] if raw else make_suite_dataset(name, env["nnUNet_raw"])
            if not os.path.isdir(os.path.join(env["nnUNet_preprocessed"], os.path.basename(raw),
                                              f"nnUNetPlans_{configuration}")):
                _cli("plan_and_preprocess", ["-d", dataset_id, "-c", configuration, "-np", 2], env, log)
            os.makedirs(os.path.join(root, "runs"), exist_ok=True)
            if getattr(args, "runs_from", None):
                try:
                    reuse_runs(os.path.join(args.runs_from, name), os.path.join(root, "runs"),
                               training_budget(args))
                except ValueError as e:
                    raise SystemExit(f"suite: {e}") from None
            preprocessed = os.path.join(env["nnUNet_preprocessed"], os.path.basename(raw))
            variants = {t: variant_plans(preprocessed, t, args.set) for t in trainers}
            for seed in seeds:
                for trainer in trainers:
                    plans, tag = variants[trainer]
                    done = os.path.join(root, "runs", f"{trainer}{tag}_s{seed}.json")
                    if os.path.isfile(done):
                        row = stored_run(done, training_budget(args))
                        if "AUROC_control" not in row:  # a run of an earlier version: its missing figures
                            results = os.path.join(_seed_env(env, seed)["nnUNet_results"], os.path.basename(raw))
                            row.update({**validation_figures(results, trainer, configuration, plans), **row,
                                        **uncertainty_figures(name, trainer, seed, args, raw, env, log, plans)})
                            write_json(done, row)
                        all_runs.append(row)
                        continue
                    start = time.perf_counter()
                    row = suite_run(name, trainer, seed, args, raw, env, log, plans)
                    write_json(done, row)
                    all_runs.append(row)
                    print(f"[{name}] {trainer} seed {seed}: Dice {row['Dice']:.4f} HD95 {row['HD95']:.2f} ECE "
                          f"{row['ECE'] or float('nan'):.4f} AUROC {row['AUROC'] or float('nan'):.4f} "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": all_runs}, f, indent=2)
    print(f"\n== suite: {args.epochs} x {args.iterations_per_epoch} iterations, fold 0, seeds {seeds}; mean ± sd "
          "over seeds")
    for name in args.datasets:
        runs = [r for r in all_runs if r["dataset"] == name]
        table, gap, ratio = summarise(runs, spread="sd", keys=TEST_KEYS)
        validation = summarise(runs, spread="sd", keys=VALIDATION_KEYS)[0]
        print(f"\n-- {name}: test cases\n{table}\nworst_dice_gap={gap:.4f} worst_ece_ratio={ratio:.3f}\n"
              + "\n".join(uncertainty_verdicts(runs))
              + f"\n-- {name}: fold 0 validation cases (what defaults are chosen on)\n{validation}\n"
              + "error-map input chosen on validation: " + ", ".join(
                  f"{t} {[r.get('error_map_input') for r in runs if r['trainer'] == t]}"
                  for t in dict.fromkeys(r["trainer"] for r in runs)))


def _mean_sd(runs: list, key: str) -> tuple[float, float]:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def uncertainty_verdicts(runs: list) -> list[str]:
    """Per diffusion trainer of one dataset: is its exported map better than nnU-Net's exported map and than its
    own control? ``better``/``worse`` only when the difference of the means exceeds the larger seed sd, else
    ``tie`` (the protocol); the map counts as better only when both say ``better``."""
    def compare(a, b):
        (ma, sa), (mb, sb) = a, b
        if np.isnan(ma) or np.isnan(mb):
            return "n/a", float("nan")
        d = ma - mb
        return ("better" if d > max(sa, sb) else "worse" if -d > max(sa, sb) else "tie"), d
    base = [r for r in runs if r["trainer"] == BASELINE]
    lines = []
    for trainer in dict.fromkeys(r["trainer"] for r in runs if r["trainer"] != BASELINE):
        rs = [r for r in runs if r["trainer"] == trainer]
        vs_base, d_base = compare(_mean_sd(rs, "AUROC"), _mean_sd(base, "AUROC"))
        vs_control, d_control = compare(_mean_sd(rs, "AUROC"), _mean_sd(rs, "AUROC_control"))
        verdict = "better" if vs_base == vs_control == "better" else "not better"
        lines.append(f"uncertainty {trainer}: exported AUROC vs nnU-Net's exported {d_base:+.4f} ({vs_base}), vs "
                     f"its own control {d_control:+.4f} ({vs_control}): {verdict}")
    return lines


