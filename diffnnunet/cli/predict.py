"""diffnnunet_predict: sliding-window diffusion inference on a folder of images (stock nnU-Net models too)."""
from __future__ import annotations

import argparse
import os
import sys

from diffnnunet.cli.common import UserError, cli_entry, parse_device, require_env, resolve_dataset_name

#: diffnnunet.methods.uncertainty.MEASURES, spelled out so that parsing arguments imports no torch
UNCERTAINTY_MEASURES = ("entropy", "mutual_information", "std")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_predict", description="Predict a folder of CASE_XXXX images.",
                                allow_abbrev=False)
    p.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", default=None, help="dataset ID or name (required unless -m is given)")
    p.add_argument("-m", default=None,
                   help="model folder TRAINER__PLANS__CONFIG (dataset.json, plans.json, fold_X/), e.g. an installed "
                        "or copied one: replaces -d, -tr, -c and -p and needs no nnUNet_results")
    p.add_argument("-tr", default=None, help="trainer the model was trained with (default DiffUNetTrainer)")
    p.add_argument("-c", default=None, help="configuration (default: the first trained of 3d_fullres, 2d, "
                                            "3d_lowres, i.e. 3d_fullres for 3D data and 2d for 2D data)")
    p.add_argument("-p", default=None, help="plans identifier (default depends on the trainer)")
    p.add_argument("-f", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model folder's tuned sampling.json, else the plans')")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per step (default: the model folder's tuned sampling.json, else the plans')")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the plans')")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--mirror", action="store_true",
                   help="test-time mirroring for diffusion models (off by default: the samples already ensemble)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring for nnUNetTrainer models")
    p.add_argument("-device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="sampler autocast (default auto: bf16 on CUDA where supported, else fp16; fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the per-step networks (pays off on CUDA for many windows; also "
                        "nnUNet_compile=true)")
    p.add_argument("--save_probabilities", action="store_true", help="also write nnU-Net's .npz/.pkl")
    p.add_argument("--save_uncertainty", action="store_true",
                   help="also write CASE_uncertainty (float32, larger = less certain: the --uncertainty map of the "
                        "sampling chains for diffusion models, the normalized softmax entropy for nnU-Net models)")
    p.add_argument("--uncertainty", default=None, choices=UNCERTAINTY_MEASURES,
                   help="the diffusion models' native map, from the sampling chains of each window: entropy "
                        "(predictive entropy of their mean), mutual_information (the chains' disagreement) or std "
                        "(their per-voxel standard deviation); default: the plans' `uncertainty` key "
                        "(mutual_information for every method)")
    p.add_argument("--raw_uncertainty", action="store_true",
                   help="write the --uncertainty map as the chains give it, not the probability that the voxel is "
                        "wrong fitted to it on the validation cases by the tuning (sampling.json's error_map)")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases that are already predicted")
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the cases into this many disjoint parts (one per machine / job), as nnU-Net")
    p.add_argument("-part_id", type=int, default=0, help="which part this run predicts, 0 <= part_id < num_parts")
    p.add_argument("-npp", type=int, default=int(os.environ.get("nnUNet_npp", 2)),
                   help="preprocessing processes (default: nnUNet_npp, else 2); 0: no worker processes at all, "
                        "each case preprocessed, predicted and exported in turn in this process (nnU-Net's "
                        "predict_from_files_sequential: slower for many cases, no start-up cost for a few)")
    p.add_argument("-nps", type=int, default=int(os.environ.get("nnUNet_nps", 2)),
                   help="export processes (default: nnUNet_nps, else 2)")
    return p


def model_folder(dataset_name: str, trainer: str, plans: str, configuration: str) -> str:
    return os.path.join(require_env("nnUNet_results"), dataset_name, f"{trainer}__{plans}__{configuration}")


def resolve_model(args):
    """-> (model folder, configuration, folds), with one-line errors for everything that is missing."""
    from diffnnunet.trainers import default_plans_for, get_trainer_class

    if getattr(args, "m", None) is not None:
        return resolve_model_folder(args)
    if args.d is None:
        raise UserError("give the model: -d DATASET [-tr TRAINER -c CONFIGURATION -p PLANS], or -m MODEL_FOLDER")
    args.tr = args.tr or "DiffUNetTrainer"
    try:
        cls = get_trainer_class(args.tr)
    except ValueError as e:
        raise UserError(str(e)) from None
    name = resolve_dataset_name(args.d)
    plans = args.p or default_plans_for(cls)
    configuration = args.c
    if configuration is None:
        base = os.path.join(require_env("nnUNet_results"), name)
        trained = [c for c in ("3d_fullres", "2d", "3d_lowres")
                   if os.path.isdir(os.path.join(base, f"{args.tr}__{plans}__{c}"))]
        if not trained:
            raise UserError(f"no trained {args.tr} model for {name} in {base} (train with diffnnunet_train)")
        configuration = trained[0]
    folder = model_folder(name, args.tr, plans, configuration)
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no trained model (train with diffnnunet_train {args.d} {args.tr} FOLD "
                        f"-c {configuration})")
    return folder, configuration, resolve_folds(folder, args)


def resolve_model_folder(args):
    """-m MODEL_FOLDER: the folder as given, nothing looked up in nnUNet_results; the configuration is the folder
    name's last ``__`` part (None for another name: the predictor reads it from the checkpoint)."""
    given = [o for o in ("d", "tr", "c", "p") if getattr(args, o, None) is not None]
    if given:
        raise UserError(f"-m names the model folder; it cannot be combined with {', '.join('-' + o for o in given)}")
    folder = os.path.abspath(args.m)
    if not os.path.isdir(folder):
        raise UserError(f"{args.m}: model folder not found")
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(args.m, name)}: missing, -m needs a model folder TRAINER__PLANS__CONFIG "
                            "with dataset.json, plans.json and fold_X/")
    parts = os.path.basename(folder).split("__")
    return folder, parts[2] if len(parts) == 3 else None, resolve_folds(folder, args)


def resolve_folds(folder: str, args) -> list:
    """-f as given, else every fold of ``folder`` with the checkpoint; each must have it."""
    if args.f is None:
        folds = sorted((int(d[5:]) if d[5:].isdigit() else d[5:] for d in os.listdir(folder)
                        if d.startswith("fold_") and os.path.isfile(os.path.join(folder, d, args.chk))),
                       key=lambda f: (isinstance(f, str), str(f) if isinstance(f, str) else f))  # 0..4, then all
        if not folds:
            raise UserError(f"{folder}: no fold has {args.chk} (is training finished?)")
    else:
        folds = [f if f == "all" else int(f) for f in args.f]
    missing = [os.path.join(folder, f"fold_{f}", args.chk) for f in folds
               if not os.path.isfile(os.path.join(folder, f"fold_{f}", args.chk))]
    if missing:
        raise UserError(f"{missing[0]}: checkpoint not found (train this fold first)")
    return folds


@cli_entry("diffnnunet_predict")
def main(argv=None):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from diffnnunet.cli.checks import screen_prediction_inputs
    from diffnnunet.inference import DiffusionPredictor
    from diffnnunet.methods.uncertainty import SPREAD_MEASURES

    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1 or args.samples is not None and args.samples < 1:
        raise UserError("--steps and --samples must be >= 1")
    if args.npp < 0 or args.nps < 1:
        raise UserError(f"-npp {args.npp} -nps {args.nps}: need -npp >= 0 and -nps >= 1")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise UserError(f"-part_id {args.part_id} -num_parts {args.num_parts}: need 0 <= part_id < num_parts")
    device = parse_device(args.device)
    folder, configuration, folds = resolve_model(args)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    # this part's share of the cases (nnU-Net's split: every num_parts-th case), checked case by case
    input_lists, bad = screen_prediction_inputs(args.i, dataset_json, model_reader(folder),
                                                part=(args.num_parts, args.part_id))
    predictor = DiffusionPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                   use_mirroring=(args.mirror or not args.disable_tta), device=device,
                                   steps=args.steps, samples=args.samples, seed=args.seed,
                                   save_uncertainty=args.save_uncertainty, allow_tqdm=True,
                                   precision=args.precision, compile=args.compile or None,
                                   uncertainty=args.uncertainty, raw_uncertainty=args.raw_uncertainty)
    predictor.initialize_from_trained_model_folder(folder, folds, args.chk)
    if predictor.diffusion is not None:
        predictor.use_mirroring = args.mirror
        tuned = predictor.tuned_sampling or {}
        source = ("plans" if not tuned.get("sampling_steps") else
                  "the plans', kept by the tuning, sampling.json" if tuned.get("budget") == "plans"
                  else "tuned, sampling.json")
        print(f"diffusion sampling: {predictor.sampling_steps} steps x {predictor.samples_per_step} samples "
              f"({'command line' if args.steps or args.samples else source}), "
              f"mirroring {'on' if args.mirror else 'off'}")
        if (args.save_uncertainty and predictor.samples_per_step == 1 and len(folds) == 1
                and predictor.uncertainty_measure in SPREAD_MEASURES):
            print(f"warning: with 1 sample the '{predictor.uncertainty_measure}' map measures nothing (one chain has "
                  "no spread); use --samples 2 or more, or --uncertainty entropy", file=sys.stderr)
    elif predictor.tuned_sampling:
        print(f"calibration (sampling.json): temperature {predictor.tuned_sampling.get('temperature', 1.0):.3f}"
              + (", uncertainty = the error map of the margin" if predictor.tuned_sampling.get("error_map")
                 and args.save_uncertainty and not args.raw_uncertainty else ""))
    os.makedirs(args.o, exist_ok=True)
    if input_lists and args.npp == 0:
        predictor.predict_from_files_sequential(input_lists, args.o, save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction)
    elif input_lists:
        predictor.predict_from_files(input_lists, args.o, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps)
    report_bad_inputs(bad, len(input_lists))


def model_reader(folder: str):
    """The image reader the model was planned with (plans' ``image_reader_writer``), the one nnU-Net's predictor
    will use; None when the plans do not name one."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    name = load_json(os.path.join(folder, "plans.json")).get("image_reader_writer")
    try:
        return recursive_find_reader_writer_by_name(name) if name else None
    except RuntimeError:
        return None


def report_bad_inputs(bad: list, n_good: int) -> None:
    """After the good cases are written: list every bad input with its reason on stderr, then fail (non-zero)
    with one line that names the first bad file and counts the rest."""
    if not bad:
        return
    if len(bad) > 1:
        for _, reason in bad:
            print(f"  not predicted: {reason}", file=sys.stderr)
    listed = "; all listed above" if len(bad) > 1 else ""
    raise UserError(f"{bad[0][1]} ({len(bad)} input(s) not predicted, {n_good} case(s) predicted{listed}; fix "
                    "them and rerun with --continue_prediction to predict only what is missing)")


if __name__ == "__main__":
    main()
