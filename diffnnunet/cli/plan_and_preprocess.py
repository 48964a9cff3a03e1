"""diffnnunet_plan_and_preprocess: nnU-Net fingerprint -> nnU-Net baseline plans + one plans file per diffusion method
(``METHODS[m].plans_name``) -> preprocessing (2d/3d_fullres data shared by all plans)."""
from __future__ import annotations

import argparse
import os

from diffnnunet.cli.common import UserError, cli_entry, require_env, resolve_dataset_name

ALL_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
#: nnU-Net's planners for the baseline plans (-pl), by nnU-Net's class names; the ResEnc presets write
#: nnUNetResEncUNet{M,L,XL}Plans (2d/3d_fullres data shared with nnUNetPlans)
BASELINE_PLANNERS = ("ExperimentPlanner", "nnUNetPlannerResEncM", "nnUNetPlannerResEncL", "nnUNetPlannerResEncXL",
                     "ResEncUNetPlanner")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_plan_and_preprocess",
                                description="Fingerprint, plan (nnU-Net baseline + diffusion plans) and preprocess.",
                                allow_abbrev=False)
    p.add_argument("-d", nargs="+", required=True, help="dataset IDs or names")
    p.add_argument("-c", nargs="+", default=list(ALL_CONFIGURATIONS), help="configurations to preprocess")
    p.add_argument("-np", type=int, default=None, help="processes (default: nnUNet_def_n_proc or 2)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="also run nnU-Net's own integrity check (diffnnunet's checks always run)")
    p.add_argument("-gpu_memory_target", type=float, default=None,
                   help="VRAM target in GB (default: 8, or the -pl preset's own for the baseline: ResEnc L 24, XL 40)")
    p.add_argument("-pl", default="ExperimentPlanner", choices=BASELINE_PLANNERS,
                   help="nnU-Net's planner for the baseline plans (nnUNetPlans; the ResEnc presets write "
                        "nnUNetResEncUNet{M,L,XL}Plans: train them with -p, e.g. diffnnunet_train D nnUNetTrainer 0 "
                        "-p nnUNetResEncUNetMPlans)")
    p.add_argument("-methods", "-method", nargs="+", default=None,
                   help="diffusion methods to plan, one plans file each (default: every registered method)")
    p.add_argument("--recipe", default="default", choices=("default", "paper"),
                   help="training recipe written into the diffusion plans: the configured default (lr 1e-3, "
                        "warm-up, EMA of the weights) or each paper's published one (documentation/planner.md)")
    p.add_argument("--no_baseline", action="store_true", help="skip nnU-Net's own nnUNetPlans")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if it exists")
    return p


def baseline_planner_class(name: str):
    """nnU-Net's planner class of ``-pl`` (explicit imports: nnU-Net's class scan would import timm)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as res
    if name == "ExperimentPlanner":
        return ExperimentPlanner
    if name not in BASELINE_PLANNERS:
        raise UserError(f"unknown planner '{name}' (known: {', '.join(BASELINE_PLANNERS)})")
    return getattr(res, name)


def plan_and_preprocess_dataset(name: str, configurations, num_processes: int, verify: bool = False,
                                gpu_memory_target: float | None = None, methods=None, baseline: bool = True,
                                preprocess: bool = True, clean: bool = False, recipe: str = "default",
                                baseline_planner: str = "ExperimentPlanner") -> dict:
    """Runs the whole pipeline for one dataset; returns {plans identifier: plans dict}."""
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from diffnnunet.cli.checks import check_raw_dataset
    from diffnnunet.methods import METHODS
    from diffnnunet.planners import DiffusionPlanner

    methods = list(METHODS) if methods is None else ([methods] if isinstance(methods, str) else list(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown diffusion method(s) {unknown} (known: {', '.join(METHODS)})")

    raw = join(require_env("nnUNet_raw"), name)
    require_env("nnUNet_preprocessed")
    if not os.path.isdir(raw):
        raise UserError(f"{raw}: dataset folder not found in nnUNet_raw")
    check_raw_dataset(raw, num_processes)
    dataset_id = int(name[7:10])
    fingerprint = join(os.environ["nnUNet_preprocessed"], name, "dataset_fingerprint.json")
    if clean or not os.path.isfile(fingerprint):
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=verify,
                                    clean=True, verbose=False)
    planners = [baseline_planner_class(baseline_planner)(name, *([] if gpu_memory_target is None
                                                                 else [gpu_memory_target]))] if baseline else []
    planners += [DiffusionPlanner(name, 8.0 if gpu_memory_target is None else gpu_memory_target, method=m,
                                  recipe=recipe) for m in methods]
    plans = {}
    for planner in planners:
        plans[planner.plans_identifier] = planner.plan_experiment()
    if preprocess:
        done = set()
        for identifier in plans:
            manager = PlansManager(join(os.environ["nnUNet_preprocessed"], name, identifier + ".json"))
            for c in configurations:
                if c not in manager.available_configurations:
                    continue
                data_id = manager.get_configuration(c).data_identifier
                if data_id in done:  # shared with the nnU-Net baseline: preprocess once
                    continue
                manager.get_configuration(c).preprocessor_class(verbose=False).run(
                    dataset_id, c, identifier, num_processes=num_processes)
                done.add(data_id)
        # copies the ground truth segmentations (gt_segmentations) for the final validation
        preprocess_dataset(dataset_id, next(iter(plans)), configurations=(), num_processes=[num_processes])
    return plans


def summarize(plans: dict) -> str:
    rows = []
    for identifier, p in plans.items():
        for c, cfg in p["configurations"].items():
            if "patch_size" not in cfg:
                continue
            rows.append(f"  {identifier:16s} {c:11s} patch {cfg['patch_size']} batch {cfg['batch_size']} "
                        f"spacing {[round(s, 3) for s in cfg['spacing']]} "
                        f"stages {cfg['architecture']['arch_kwargs']['n_stages']}")
    return "\n".join(rows)


@cli_entry("diffnnunet_plan_and_preprocess")
def main(argv=None):
    args = build_parser().parse_args(argv)
    unknown = [c for c in args.c if c not in ALL_CONFIGURATIONS]
    if unknown:
        raise UserError(f"unknown configuration(s) {unknown} (known: {', '.join(ALL_CONFIGURATIONS)})")
    num_processes = args.np or int(os.environ.get("nnUNet_def_n_proc", 2))
    for d in args.d:
        name = resolve_dataset_name(d)
        plans = plan_and_preprocess_dataset(name, args.c, num_processes, args.verify_dataset_integrity,
                                            args.gpu_memory_target, args.methods, not args.no_baseline,
                                            not args.no_pp, args.clean, args.recipe, args.pl)
        print(f"\n{name}: plans\n{summarize(plans)}")


if __name__ == "__main__":
    main()
