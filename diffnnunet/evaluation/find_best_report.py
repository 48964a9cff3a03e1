"""The report of diffnnunet_find_best_configuration: one row per model or ensemble (validation Dice, HD95, NSD,
ECE, AUROC, budget, predict seconds per case), the Pareto front of Dice against seconds, the best and the cheapest
near it, as markdown, JSON, a PNG and nnU-Net-style inference instructions with diffnnunet's commands."""
from __future__ import annotations

import math
import os

from diffnnunet.evaluation.plots import save_png
from diffnnunet.utils import write_json, write_text

#: "the cheapest within 0.5 Dice points": Dice is a fraction, one point is 0.01
DEFAULT_TOLERANCE = 0.005


def row_from_summary(name: str, kind: str, members: list, source: str, summary: dict) -> dict:
    """One report row from a summary.json (nnU-Net's schema plus HD95, NSD and ``uncertainty``). ``AUROC`` starts as
    the summary's (the raw map against the errors); diffnnunet_find_best_configuration replaces it with the
    held-out AUROC of the row's fitted error map and sets ``AUROC_input`` (the input the fit chose: ``map`` or
    ``confidence``), ``AUROC_by_input`` and, for ensembles, ``error_map`` (the stored fit's path)."""
    fg = summary["foreground_mean"]
    unc = summary.get("uncertainty") or {}
    return {"name": name, "kind": kind, "members": members, "source": source,
            "n_cases": len(summary["metric_per_case"]),
            "Dice": _num(fg["Dice"]), "Dice_per_label": {str(k): _num(v["Dice"]) for k, v in summary["mean"].items()},
            "HD95": _num(fg.get("HD95")), "NSD": _num(fg.get("NSD")),
            "ECE": _num(unc.get("ECE")), "AUROC": _num(unc.get("AUROC_uncertainty_vs_error")),
            "AUROC_input": None, "AUROC_by_input": {}, "error_map": None,
            "budget": None, "seconds_per_case": None, "pareto": False}


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def pareto_front(rows: list) -> list:
    """Names of the timed rows no other timed row beats: none has Dice >= and seconds <= with one of them strict."""
    timed = [r for r in rows if r["seconds_per_case"] is not None and r["Dice"] is not None]
    front = []
    for r in timed:
        dominated = any(o is not r and o["Dice"] >= r["Dice"] and o["seconds_per_case"] <= r["seconds_per_case"]
                        and (o["Dice"] > r["Dice"] or o["seconds_per_case"] < r["seconds_per_case"]) for o in timed)
        if not dominated:
            front.append(r["name"])
    return front


def choose(rows: list, tolerance: float = DEFAULT_TOLERANCE) -> tuple:
    """(best row by Dice: a single model before an ensemble on a tie, as nnU-Net; the cheapest timed row whose
    Dice is within ``tolerance`` of the best, or None without timings)."""
    scored = [r for r in rows if r["Dice"] is not None]
    if not scored:
        raise ValueError("no model has a validation Dice (every case empty in reference and prediction?)")
    best = max(scored, key=lambda r: (r["Dice"], r["kind"] == "model"))
    near = [r for r in scored if r["Dice"] >= best["Dice"] - tolerance and r["seconds_per_case"] is not None]
    cheapest = min(near, key=lambda r: (r["seconds_per_case"], -r["Dice"])) if near else None
    return best, cheapest


def _fmt(x, digits=4):
    return "–" if x is None else f"{x:.{digits}f}"


def _auroc_text(row: dict) -> str:
    """The AUROC and the input its error map reads: ``map`` (a model's native map), ``pooled map`` (an ensemble's
    U), ``margin`` (the exported probabilities')."""
    if row["AUROC"] is None or row.get("AUROC_input") is None:
        return _fmt(row["AUROC"])
    source = "margin" if row["AUROC_input"] == "confidence" else (
        "pooled map" if row["kind"] == "ensemble" else "map")
    return f"{_fmt(row['AUROC'])} ({source})"


def _budget_text(budget) -> str:
    if not budget:
        return "–"
    parts = []
    for member in budget:
        if member["validated"] is None and member["tuned"] is None:
            parts.append("nnU-Net")
            continue
        v = "{} x {}".format(*member["validated"]) if member["validated"] else "plans"
        t = "{} x {}".format(*member["tuned"]) if member["tuned"] else v  # untuned: timed at the plans' budget
        parts.append(v if t == v else f"{v}, tuned {t}")
    return " + ".join(parts)


def markdown_table(rows: list, best=None, cheapest=None) -> str:
    """The report's table: Dice (mean and per label), HD95, NSD, ECE, AUROC, budget, seconds per case, Pareto."""
    labels = sorted({k for r in rows for k in r["Dice_per_label"]}, key=str)
    head = (["model or ensemble", "Dice"] + [f"Dice {k}" for k in labels]
            + ["HD95", "NSD", "ECE", "AUROC", "steps x samples", "s/case", "Pareto"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " **(best)**" if best is r else ""
        mark += " **(cheapest)**" if cheapest is r and cheapest is not best else ""
        cells = ([r["name"] + mark, _fmt(r["Dice"])] + [_fmt(r["Dice_per_label"].get(k)) for k in labels]
                 + [_fmt(r["HD95"], 2), _fmt(r["NSD"]), _fmt(r["ECE"]), _auroc_text(r), _budget_text(r["budget"]),
                    _fmt(r["seconds_per_case"], 2), "yes" if r["pareto"] else ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_dice_vs_time(rows: list, path: str) -> bool:
    """PNG of validation Dice against predict seconds per case (log x), the Pareto front joined and marked; False
    (nothing written) when no row is timed."""
    timed = [r for r in rows if r["seconds_per_case"] is not None and r["Dice"] is not None]
    if not timed:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in timed:
        ax.scatter(r["seconds_per_case"], r["Dice"], marker="o" if r["kind"] == "model" else "s",
                   color="tab:red" if r["pareto"] else "tab:gray", zorder=3)
        label = " + ".join(f"{m['trainer']} {m['configuration']}" for m in r["members"])
        ax.annotate(label, (r["seconds_per_case"], r["Dice"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r in timed if r["pareto"]), key=lambda r: r["seconds_per_case"])
    ax.step([r["seconds_per_case"] for r in front], [r["Dice"] for r in front], where="post", color="tab:red",
            marker="o", label="Pareto front (squares: ensembles)")
    ax.margins(x=0.25, y=0.1)
    ax.set_xscale("log")
    ax.set_xlabel("predict seconds per case (log)")
    ax.set_ylabel("validation Dice (foreground mean)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    return True


def predict_command(dataset: str, member: dict, folds, output: str, save_npz: bool) -> str:
    return (f"diffnnunet_predict -d {dataset} -i INPUT_FOLDER -o {output} -f {' '.join(str(f) for f in folds)} "
            f"-tr {member['trainer']} -c {member['configuration']} -p {member['plans_identifier']} --save_uncertainty"
            + (" --save_probabilities" if save_npz else ""))


def instructions(dataset: str, folds, choice: dict, num_processes: int) -> list:
    """Command lines for one chosen row (``choice``: members, postprocessing), nnU-Net's instructions with ours."""
    members = choice["members"]
    outs = ["OUTPUT_FOLDER"] if len(members) == 1 else [f"OUTPUT_FOLDER_MODEL_{i + 1}" for i in range(len(members))]
    lines = ["Run inference like this:", ""]
    lines += [predict_command(dataset, m, folds, o, len(members) > 1) for m, o in zip(members, outs)]
    if len(members) > 1:
        error_map = choice.get("error_map")
        lines += ["", "Then ensemble the members (mean probabilities, pooled uncertainty maps"
                  + (", recalibrated by the ensemble's error map into P(wrong label)) with:" if error_map else
                     ": a ranking score, no error map was fitted) with:"), "",
                  f"diffnnunet_ensemble -i {' '.join(outs)} -o OUTPUT_FOLDER -np {num_processes}"
                  + (f" --error_map {error_map}" if error_map else "")]
    pp = choice["postprocessing"]
    steps = [f"{fn}({', '.join(f'{k}={v}' for k, v in kw.items())})" for fn, kw in zip(pp["functions"], pp["kwargs"])]
    lines += ["", "Once inference is completed, run postprocessing like this "
              f"({'; '.join(steps) or 'none chosen: the files are copied'}):", "",
              f"diffnnunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_pkl_file {pp['pkl']} "
              f"-np {num_processes} -plans_json {pp['plans']}"]
    return lines


def write_report(out_dir: str, result: dict, num_processes: int) -> dict:
    """Write find_best_report.md / .json, find_best_dice_vs_time.png, inference_instructions.txt and
    inference_information.json (nnU-Net's file, ours in content) into ``out_dir``; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    rows, best, cheapest = result["rows"], result["best"], result["cheapest"]
    paths = {"md": os.path.join(out_dir, "find_best_report.md"), "json": os.path.join(out_dir, "find_best_report.json"),
             "png": os.path.join(out_dir, "find_best_dice_vs_time.png"),
             "instructions": os.path.join(out_dir, "inference_instructions.txt"),
             "information": os.path.join(out_dir, "inference_information.json")}
    text = []
    for title, choice in (("Best by validation Dice", best), ("Cheapest within "
                          f"{100 * result['tolerance']:g} Dice points of the best", cheapest)):
        if choice is None:
            text += [f"{title}: not determined (no predict timings; run without --no_timing)", ""]
            continue
        if title.startswith("Cheapest") and choice is best:
            text += [f"{title}: the best itself", ""]
            continue
        pp = choice["postprocessing"]
        text += [f"{title}: {choice['name']} (Dice {_fmt(choice['Dice'])}, after postprocessing "
                 f"{_fmt(pp['dice_after'])}; {_fmt(choice['seconds_per_case'], 2)} s per case)", ""]
        text += instructions(result["dataset"], result["folds"], choice, num_processes) + [""]
    write_text(paths["instructions"], "\n".join(text))
    drawn = plot_dice_vs_time(rows, paths["png"])
    md = [f"# find_best_configuration: {result['dataset_name']}", "",
          f"Validation cases compared: {result['n_shared']} (shared by every model; folds "
          f"{' '.join(str(f) for f in result['folds'])}). Dice, HD95, NSD: foreground means over the cases; ECE "
          "pooled over voxels; AUROC of the uncertainty against the errors, held out: every row's error map (as the "
          "end-of-training tuning fits one) fitted on half of the cases scores the other half, the input it reads "
          "in brackets (documentation/which_method.md). s/case: diffnnunet_predict --save_uncertainty at "
          f"the tuned budget, {result['timing_note']}.", "",
          markdown_table(rows, best, cheapest), "",
          f"Best by Dice: {best['name']}.",
          ("Cheapest within tolerance: " + cheapest["name"] + ".") if cheapest else "Cheapest: not timed.", ""]
    md += [f"![Dice against predict seconds]({os.path.basename(paths['png'])})", ""] if drawn else []
    md += ["Commands: inference_instructions.txt.", ""]
    write_text(paths["md"], "\n".join(md))
    if not drawn:
        paths.pop("png")
    public = {k: v for k, v in result.items() if k not in ("best", "cheapest")}
    public["best"] = best["name"]
    public["cheapest"] = cheapest["name"] if cheapest else None
    write_json(paths["json"], public)
    information = {"dataset_name_or_id": result["dataset"], "folds": list(result["folds"]),
                   "all_results": {r["name"]: r["Dice"] for r in rows}}
    for key, choice in (("best_model_or_ensemble", best), ("cheapest_within_tolerance", cheapest)):
        if choice is not None:
            information[key] = {"name": choice["name"], "result_on_crossval_pre_pp": choice["Dice"],
                                "result_on_crossval_post_pp": choice["postprocessing"]["dice_after"],
                                "postprocessing_file": choice["postprocessing"]["pkl"],
                                "some_plans_file": choice["postprocessing"]["plans"],
                                "selected_model_or_models": choice["members"]}
    write_json(paths["information"], information)
    return paths
