"""diffnnunet_demo: the main job on the embedded default dataset, on CPU in minutes.

plan -> train (short budget) -> tune the sampling (budget, temperature and error map, as diffnnunet_train does by
default) -> predict -> evaluate, for DiffUNetTrainer, BerDiffTrainer, MedSegDiffV2Trainer and the nnUNetTrainer
baseline side by side, on 2D slices of the ICBM152 T1 template with grey/white matter labels (see
datasets/icbm152.py). Prints one table per trainer and writes pictures (image | ground truth | prediction |
uncertainty, and training curves). Uncertainty is reported for the raw map, the exported (calibrated) map and
its control (:mod:`diffnnunet.inference.uncertainty_control`), every trainer calibrated the same way.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

from diffnnunet.cli.common import cli_entry

DATASET_ID = 990
#: the baseline and the three diffusion trainers that beat it at this budget (benchmarks.md; LDSegTrainer and
#: cDALTrainer through --trainers: LDSeg lags, cDAL's discriminator makes it 5x slower to train)
TRAINERS = ("nnUNetTrainer", "DiffUNetTrainer", "BerDiffTrainer", "MedSegDiffV2Trainer")


def build_parser():
    p = argparse.ArgumentParser(prog="diffnnunet_demo", description=__doc__, allow_abbrev=False)
    p.add_argument("--workdir", default="diffnnunet_demo", help="where raw/preprocessed/results/predictions go")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iterations-per-epoch", type=int, default=25)
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the plans')")
    p.add_argument("--samples", type=int, default=None, help="samples per step (default: the plans')")
    p.add_argument("--no-tune", "--no_tune", dest="no_tune", action="store_true",
                   help="skip the sampling tuning after training (as diffnnunet_train does by default: budget and "
                        "temperature chosen on fold 0's validation slices, used by the prediction)")
    p.add_argument("-device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--factor", type=int, default=3, help="downsampling of the 1 mm template (3 -> 3 mm)")
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS))
    return p


def _set_paths(workdir: str) -> dict:
    paths = {k: os.path.abspath(os.path.join(workdir, k)) for k in
             ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in paths.values():
        os.makedirs(v, exist_ok=True)
    os.environ.update(paths)
    return paths


def _train(trainer_name: str, args, device, seed: int = 0, dataset: str = str(DATASET_ID),
           configuration: str = "2d") -> float:
    """Train fold 0 at the budget of ``args`` (epochs, iterations per epoch, validation iterations); seconds."""
    import torch

    from diffnnunet.cli.train import load_trainer
    trainer = load_trainer(dataset, trainer_name, "0", configuration, None, device)
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = args.val_iterations
    torch.manual_seed(seed)
    start = time.perf_counter()
    trainer.run_training()
    return time.perf_counter() - start


def _tune(trainer_name: str, device, dataset: str = f"Dataset{DATASET_ID}_ICBM152Slices",
          configuration: str = "2d") -> tuple[float, str]:
    """diffnnunet_train's default last step (sampling.json: a diffusion model's budget; every model's temperature and
    error map); returns (seconds, one line)."""
    from diffnnunet.inference.tuning import tune_sampling
    pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    start = time.perf_counter()
    s = tune_sampling(_model_folder(trainer_name, dataset, configuration), pre, [0], device=device)
    cal = s["calibration"]
    budget = (f"{s['sampling_steps']} steps x {s['samples_per_step']} samples (validation Dice {s['dice']:.4f}, "
              f"best {s['best']['dice']:.4f} at {s['best']['steps']} x {s['best']['samples']}); "
              if "sampling_steps" in s else "")
    em = cal.get("error_map")
    return time.perf_counter() - start, (
        f"tuned on {s['cases']} validation slices: {budget}temperature {cal['temperature']:.3f}, validation ECE "
        f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}" + (
            f"; error map of the {em['inputs']}, validation AUROC {em['auroc_before']:.4f} (raw) -> "
            f"{em['auroc_after']:.4f} (held out)" if em else ""))


def _model_folder(trainer_name: str, dataset: str = f"Dataset{DATASET_ID}_ICBM152Slices",
                  configuration: str = "2d") -> str:
    from diffnnunet.cli.predict import model_folder
    from diffnnunet.trainers import default_plans_for, get_trainer_class
    return model_folder(dataset, trainer_name, default_plans_for(get_trainer_class(trainer_name)), configuration)


def _predict(trainer_name: str, images: str, out: str, args, device, folder: str | None = None,
             raw: bool = False) -> float:
    """diffnnunet_predict --save_uncertainty --save_probabilities (``raw``: with --raw_uncertainty); seconds."""
    from diffnnunet.cli.checks import check_prediction_inputs
    from diffnnunet.inference import DiffusionPredictor

    folder = folder or _model_folder(trainer_name)
    predictor = DiffusionPredictor(use_mirroring=False, device=device, steps=args.steps, samples=args.samples,
                                   save_uncertainty=True, raw_uncertainty=raw, allow_tqdm=False, verbose=False)
    predictor.initialize_from_trained_model_folder(folder, [0], "checkpoint_final.pth")
    predictor.use_mirroring = predictor.diffusion is None  # as diffnnunet_predict: stock nnU-Net with its TTA
    lists = check_prediction_inputs(images, predictor.dataset_json)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    predictor.predict_from_files(lists, out, save_probabilities=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=2)
    return time.perf_counter() - start


def _figure(raw: str, predictions: dict, out_png: str, n_cases: int = 3) -> None:
    """Rows: test slices. Columns: image, ground truth, then per trainer its prediction, its errors (voxels whose
    label differs from the ground truth) and its uncertainty map; a legend for the labels and a colour bar for
    the uncertainty (all on one scale, [0, 1])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.patches import Patch

    def read(path):
        return np.rot90(sitk.GetArrayFromImage(sitk.ReadImage(path)).T)

    cases = sorted(f[:-12] for f in os.listdir(os.path.join(raw, "imagesTs")))
    cases = [cases[i] for i in np.linspace(0, len(cases) - 1, min(n_cases, len(cases))).astype(int)]
    cols = 2 + 3 * len(predictions)
    fig, axes = plt.subplots(len(cases), cols, figsize=(2.0 * cols + 0.8, 2.2 * len(cases) + 0.6), squeeze=False)
    labels = {"viridis": 2}
    unc_image = None
    for r, case in enumerate(cases):
        truth = read(os.path.join(raw, "labelsTs", case + ".nii.gz"))
        panels = [("image", read(os.path.join(raw, "imagesTs", case + "_0000.nii.gz")), "gray", None),
                  ("ground truth", truth, "viridis", labels["viridis"])]
        for name, folder in predictions.items():
            pred = read(os.path.join(folder, case + ".nii.gz"))
            panels += [(f"{name}\nprediction", pred, "viridis", labels["viridis"]),
                       (f"{name}\nerrors", (pred != truth).astype(np.uint8), "Reds", 1),
                       (f"{name}\nuncertainty", read(os.path.join(folder, case + "_uncertainty.nii.gz")), "magma",
                        1)]
        for c, (title, arr, cmap, vmax) in enumerate(panels):
            ax = axes[r, c]
            shown = ax.imshow(arr, cmap=cmap, vmin=0 if vmax else None, vmax=vmax, interpolation="nearest")
            unc_image = shown if "uncertainty" in title else unc_image
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=8)
    cmap = plt.get_cmap("viridis")
    handles = [Patch(color=cmap(v / 2), label=t) for v, t in ((0, "background"), (1, "grey matter"),
                                                              (2, "white matter"))]
    handles.append(Patch(color=plt.get_cmap("Reds")(1.0), label="error (prediction != ground truth)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 0.93, 1))
    if unc_image is not None:
        bar = fig.colorbar(unc_image, cax=fig.add_axes((0.945, 0.15, 0.012, 0.7)))
        bar.set_label("uncertainty (0 = certain)", fontsize=8)
    from diffnnunet.evaluation.plots import save_png
    save_png(fig, out_png)


def comparison_table(summaries: dict, raw_summaries: dict, controls: dict) -> str:
    """One line per trainer: foreground Dice and HD95, ECE, Brier, and the AUROC of uncertainty against the errors
    for the raw map (``raw_summaries``: predicted with --raw_uncertainty), the exported map and the control
    (``controls``: :func:`~diffnnunet.inference.uncertainty_control.control_auroc`), pooled and within predicted
    labels, then the exported map's AURC."""
    names = ("Dice", "HD95", "ECE", "Brier", "AUROC raw", "exported", "control", "within", "ctl within", "AURC")
    lines = [f"{'trainer':>16s} " + " ".join(f"{n:>10s}" for n in names)]
    for trainer, s in summaries.items():
        fg, unc = s["foreground_mean"], s.get("uncertainty") or {}
        raw = raw_summaries[trainer].get("uncertainty") or {}
        values = [fg.get("Dice"), fg.get("HD95"), unc.get("ECE"), unc.get("Brier"),
                  raw.get("AUROC_uncertainty_vs_error"), unc.get("AUROC_uncertainty_vs_error"),
                  controls[trainer]["AUROC_control"], unc.get("AUROC_within_label_mean"),
                  controls[trainer]["AUROC_control_within"], unc.get("AURC")]
        lines.append(f"{trainer:>16s} " + " ".join(f"{float('nan') if v is None else v:10.4f}" for v in values))
    return "\n".join(lines)


def _raw_prediction(trainer: str, raw: str, out_root: str, args, device) -> str:
    """The same prediction with the raw map (``--raw_uncertainty``; the same seed, so the same segmentation)."""
    folder = os.path.join(out_root, "raw_maps", trainer)
    _predict(trainer, os.path.join(raw, "imagesTs"), folder, args, device, raw=True)
    return folder


@cli_entry("diffnnunet_demo")
def main(argv=None):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from diffnnunet.cli.common import parse_device
    from diffnnunet.cli.plan_and_preprocess import plan_and_preprocess_dataset
    from diffnnunet.datasets.icbm152 import make_icbm152_dataset
    from diffnnunet.evaluation import evaluate_folder
    from diffnnunet.evaluation.report import format_summary
    from diffnnunet.inference.uncertainty_control import control_auroc, control_curves

    args = build_parser().parse_args(argv)
    device = parse_device(args.device)
    paths = _set_paths(args.workdir)
    t0 = time.perf_counter()
    raw = make_icbm152_dataset(paths["nnUNet_raw"], DATASET_ID, factor=args.factor)
    name = os.path.basename(raw)
    plan_and_preprocess_dataset(name, ["2d"], 2, clean=True)  # default plans: the configured training recipe
    t_plan = time.perf_counter() - t0
    out_root = os.path.join(args.workdir, "predictions")
    report, predictions, summaries, raw_summaries, controls = [], {}, {}, {}, {}
    for trainer in args.trainers:
        t_train = _train(trainer, args, device)
        t_tune, tuned = (0.0, "") if args.no_tune else _tune(trainer, device)
        pred = os.path.join(out_root, trainer)
        t_pred = _predict(trainer, os.path.join(raw, "imagesTs"), pred, args, device)
        summary, raw_summaries[trainer] = (
            evaluate_folder(os.path.join(raw, "labelsTs"), folder, os.path.join(folder, "summary.json"),
                            SimpleITKIO(), ".nii.gz", [1, 2], num_processes=2)
            for folder in (pred, _raw_prediction(trainer, raw, out_root, args, device)))
        controls[trainer] = control_auroc(pred, os.path.join(raw, "labelsTs"), control_curves(_model_folder(trainer)))
        predictions[trainer] = pred
        summaries[trainer] = summary
        n_test = len(os.listdir(os.path.join(raw, "labelsTs")))
        report.append(format_summary(summary, f"\n== {trainer}: {args.epochs} epochs x {args.iterations_per_epoch}"
                                              f" iterations, {n_test} test slices (labels 1 = grey, 2 = white "
                                              f"matter)")
                      + (f"\n{tuned}" if tuned else "")
                      + f"\ntime: training {t_train:.1f} s, " + (f"tuning {t_tune:.1f} s, " if tuned else "")
                      + f"prediction {t_pred:.1f} s")
        shutil.copy(os.path.join(_model_folder(trainer), "fold_0", "progress.png"),
                    os.path.join(args.workdir, f"progress_{trainer}.png"))
    figure = os.path.join(args.workdir, "predictions.png")
    _figure(raw, predictions, figure)
    print("\n".join(report))
    print("\n== side by side (foreground mean; uncertainty of the pooled test voxels, exact AUROC of the raw map, "
          "the exported map and its control: the exported margin through the validation error curves)\n"
          + comparison_table(summaries, raw_summaries, controls))
    print(f"\nplanning + preprocessing {t_plan:.1f} s; total {time.perf_counter() - t0:.1f} s")
    print(f"pictures: {figure}, " + ", ".join(os.path.join(args.workdir, f"progress_{t}.png")
                                              for t in args.trainers))


if __name__ == "__main__":
    main()
