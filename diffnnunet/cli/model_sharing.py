"""diffnnunet_export_model_to_zip and diffnnunet_install_pretrained_model_from_zip: nnU-Net's model sharing
(``nnunetv2.model_sharing``) with diffnnunet's defaults, the model folder's ``sampling.json`` (tuned budget and
calibration) in the zip, one-line errors, and a zip that appears only when it is complete.

The zip has nnU-Net's layout (paths relative to nnUNet_results: ``DatasetXXX_NAME/TRAINER__PLANS__CONFIG/...``),
so nnU-Net's own installer reads it too, and this installer reads nnU-Net's zips.
"""
from __future__ import annotations

import argparse
import os
import zipfile

from diffnnunet.cli.common import UserError, cli_entry, require_env, resolve_dataset_name

#: nnU-Net's exporter's configurations, in its order
CONFIGURATIONS = ("3d_lowres", "3d_fullres", "2d", "3d_cascade_fullres")


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_export_model_to_zip", allow_abbrev=False,
                                description="Export a trained model (checkpoints, plans.json, dataset.json, "
                                            "sampling.json, ...) as a zip file for "
                                            "diffnnunet_install_pretrained_model_from_zip.")
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-o", required=True, help="output zip file")
    p.add_argument("-c", nargs="+", default=None,
                   help=f"configurations (default: every trained one of {', '.join(CONFIGURATIONS)})")
    p.add_argument("-tr", default="DiffUNetTrainer", help="trainer class (default %(default)s)")
    p.add_argument("-p", default=None, help="plans identifier (default depends on the trainer, as "
                                            "diffnnunet_predict)")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds (default: every fold with the checkpoint(s), the same in every configuration)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                   help="checkpoint file names to export (default: checkpoint_final.pth)")
    p.add_argument("--not_strict", action="store_true",
                   help="skip requested configurations that are not trained instead of failing")
    p.add_argument("--exp_cv_preds", action="store_true",
                   help="also export the cross-validation predictions (validation/ of each fold)")
    return p


def build_install_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_install_pretrained_model_from_zip", allow_abbrev=False,
                                description="Install a zip file of a trained model (from "
                                            "diffnnunet_export_model_to_zip or nnUNetv2_export_model_to_zip) into "
                                            "nnUNet_results.")
    p.add_argument("zip", help="zip file")
    return p


def _fold_list(folds) -> list:
    return [f if f == "all" else int(f) for f in folds]


def _trained_folds(folder: str, checkpoints) -> list:
    """Folds of ``folder`` with every checkpoint in ``checkpoints``."""
    found = [d[5:] for d in os.listdir(folder) if d.startswith("fold_") and (d[5:].isdigit() or d[5:] == "all")
             and all(os.path.isfile(os.path.join(folder, d, c)) for c in checkpoints)]
    return sorted(_fold_list(found), key=lambda f: (isinstance(f, str), f))


def _required_files(folder: str, folds, checkpoints, crossval_predictions: bool) -> list:
    """The files nnU-Net's exporter reads unconditionally (it fails on the first one missing); with
    ``crossval_predictions`` each fold's validation folder instead of its summary.json."""
    files = [os.path.join(folder, n) for n in ("plans.json", "dataset_fingerprint.json", "dataset.json")]
    for f in folds:
        fold = os.path.join(folder, f"fold_{f}")
        files += [os.path.join(fold, c) for c in checkpoints] + [os.path.join(fold, "progress.png")]
        files.append(os.path.join(fold, "validation", "" if crossval_predictions else "summary.json"))
    return files


def resolve_export(dataset: str, trainer: str, plans, configurations, folds, checkpoints, strict: bool,
                   crossval_predictions: bool = False):
    """-> (dataset name, plans identifier, {configuration: model folder}, folds), with one-line errors for what
    nnU-Net's exporter would fail on with a traceback."""
    from diffnnunet.trainers import default_plans_for, get_trainer_class

    results = require_env("nnUNet_results")
    try:
        plans = plans or default_plans_for(get_trainer_class(trainer))
    except ValueError as e:
        raise UserError(str(e)) from None
    name = resolve_dataset_name(dataset)
    folder = {c: os.path.join(results, name, f"{trainer}__{plans}__{c}") for c in configurations or CONFIGURATIONS}
    trained = {c: f for c, f in folder.items() if os.path.isdir(f)}
    missing = [c for c in folder if c not in trained]
    if configurations and strict and missing:
        raise UserError(f"{folder[missing[0]]}: no trained model of configuration {missing[0]} (--not_strict skips "
                        "it)")
    if not trained:
        raise UserError(f"no trained {trainer} model ({plans}) of {name} in {os.path.join(results, name)}")
    if folds is None:
        per_config = {c: _trained_folds(f, checkpoints) for c, f in trained.items()}
        folds = next(iter(per_config.values()))
        if not folds or any(v != folds for v in per_config.values()):
            listed = "; ".join(f"{c}: {' '.join(map(str, v)) or 'none'}" for c, v in per_config.items())
            raise UserError(f"{os.path.join(results, name)}: folds with {' '.join(checkpoints)} differ between "
                            f"configurations or there are none ({listed}); choose them with -f")
    else:
        try:
            folds = _fold_list(folds)
        except ValueError:
            raise UserError(f"-f {' '.join(folds)}: folds are integers or 'all'") from None
    for f in trained.values():
        absent = [p for p in _required_files(f, folds, checkpoints, crossval_predictions) if not os.path.exists(p)]
        if absent:
            raise UserError(f"{absent[0]}: missing (nnU-Net's export needs it; is training of this fold finished?)")
    return name, plans, trained, folds


def export_model(dataset: str, output: str, configurations=None, trainer: str = "DiffUNetTrainer", plans=None,
                 folds=None, checkpoints=("checkpoint_final.pth",), strict: bool = True,
                 crossval_predictions: bool = False) -> str:
    """nnU-Net's ``export_pretrained_model`` into a temporary zip next to ``output``, then what it leaves out of
    each exported model folder and the predictor reads (the tuning's ``sampling.json``: budget and calibration)
    added, then renamed to ``output``; returns ``output``. Nothing is left behind on failure."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    from diffnnunet.inference.tuning import SAMPLING_FILE

    results = require_env("nnUNet_results")
    name, plans, trained, folds = resolve_export(dataset, trainer, plans, configurations, folds, list(checkpoints),
                                                 strict, crossval_predictions)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    partial = os.path.join(os.path.dirname(output), f".partial_{os.getpid()}_{os.path.basename(output)}")
    try:
        export_pretrained_model(name, partial, configurations=tuple(trained), trainer=trainer,
                                plans_identifier=plans, folds=tuple(folds), strict=True,
                                save_checkpoints=tuple(checkpoints), export_crossval_predictions=crossval_predictions)
        with zipfile.ZipFile(partial, "a", zipfile.ZIP_DEFLATED) as zf:
            present = set(zf.namelist())
            for folder in trained.values():
                path = os.path.join(folder, SAMPLING_FILE)
                arcname = os.path.relpath(path, results).replace(os.sep, "/")
                if os.path.isfile(path) and arcname not in present:
                    zf.write(path, arcname)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return output


def model_folders_in(names) -> list:
    """The model folders ``DatasetXXX_NAME/TRAINER__PLANS__CONFIG`` among zip entry ``names`` that have plans.json,
    dataset.json and at least one ``fold_X/*.pth``."""
    names = set(names)
    out = []
    for n in sorted(names):
        parts = n.split("/")
        if (len(parts) == 3 and parts[2] == "plans.json" and parts[0].startswith("Dataset")
                and len(parts[1].split("__")) == 3):
            folder = "/".join(parts[:2])
            has_checkpoint = any(m.startswith(folder + "/fold_") and m.endswith(".pth") for m in names)
            if f"{folder}/dataset.json" in names and has_checkpoint:
                out.append(folder)
    return out


def install_model(zip_file: str) -> list:
    """Check that ``zip_file`` holds a model (and nothing outside ``DatasetXXX_NAME/``, no corrupt member), then
    nnU-Net's ``install_model_from_zip_file`` (extracts into nnUNet_results). Returns the installed model
    folders."""
    from nnunetv2.model_sharing.model_import import install_model_from_zip_file

    results = require_env("nnUNet_results")
    if not os.path.isfile(zip_file):
        raise UserError(f"{zip_file}: file not found")
    if not zipfile.is_zipfile(zip_file):
        raise UserError(f"{zip_file}: not a zip file")
    try:
        with zipfile.ZipFile(zip_file) as zf:
            names = zf.namelist()
            corrupt = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{zip_file}: unreadable zip file ({' '.join(str(e).split())})") from None
    if corrupt is not None:
        raise UserError(f"{zip_file}: member {corrupt} is corrupt (CRC mismatch); nothing installed")
    outside = [n for n in names if ".." in n.replace("\\", "/").split("/")
               or not (n.startswith("Dataset") and "/" in n)]
    if outside:
        raise UserError(f"{zip_file}: entry '{outside[0]}' is not inside a DatasetXXX_NAME/ folder; not a model zip, "
                        "nothing installed")
    folders = model_folders_in(names)
    if not folders:
        raise UserError(f"{zip_file}: not a model zip (no DatasetXXX_NAME/TRAINER__PLANS__CONFIG/ with plans.json, "
                        "dataset.json and a fold_X/ checkpoint); nothing installed")
    install_model_from_zip_file(zip_file)
    return [os.path.join(results, *f.split("/")) for f in folders]


@cli_entry("diffnnunet_export_model_to_zip")
def export_main(argv=None):
    args = build_export_parser().parse_args(argv)
    out = export_model(args.d, args.o, args.c, args.tr, args.p, args.f, args.chk, strict=not args.not_strict,
                       crossval_predictions=args.exp_cv_preds)
    print(f"{out}: written")


@cli_entry("diffnnunet_install_pretrained_model_from_zip")
def install_main(argv=None):
    args = build_install_parser().parse_args(argv)
    for folder in install_model(args.zip):
        print(f"installed {folder} (predict with: diffnnunet_predict -i INPUT -o OUTPUT -m {folder})")
