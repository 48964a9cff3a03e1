"""diffnnunet_train DATASET TRAINER FOLD: nnU-Net's training loop with a diffusion (or the stock) trainer."""
from __future__ import annotations

import argparse
import os

from diffnnunet.cli.common import UserError, cli_entry, parse_device, require_env, resolve_dataset_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_train", description="Train one fold of a diffnnunet trainer.",
                                allow_abbrev=False)
    p.add_argument("dataset", help="dataset ID or name")
    p.add_argument("trainer", help="trainer name (DiffUNetTrainer, nnUNetTrainer, ...) or dotted path")
    p.add_argument("fold", help="fold 0-4, or 'all'")
    p.add_argument("-c", "--configuration", default=None, help="default: 3d_fullres for 3D data, 2d for 2D data")
    p.add_argument("-p", "--plans", default=None, help="plans identifier (default: the trainer's method's plans, "
                                                       "e.g. DiffnnUNetPlans for DiffUNetTrainer; nnUNetPlans for "
                                                       "nnUNetTrainer)")
    p.add_argument("-device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("-num_gpus", type=int, default=1,
                   help="data-parallel processes on this machine (DDP; NCCL on cuda, gloo on cpu); the plans' batch "
                        "size is split across them. Under torchrun leave it at 1 (documentation/scaling.md)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the trainer's)")
    p.add_argument("--iterations-per-epoch", type=int, default=None)
    p.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch")
    p.add_argument("--continue", "--c", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest (or best/final); --c as in nnU-Net")
    p.add_argument("-pretrained_weights", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's network weights (nnU-Net's semantics: same names "
                        "and shapes, nnU-Net's segmentation layers excepted; for diffusion trainers a run of the "
                        "same method and plans); not with --continue")
    p.add_argument("--val_best", action="store_true",
                   help="run the final validation (and the tuning) with checkpoint_best instead of checkpoint_final")
    p.add_argument("--disable_checkpointing", action="store_true",
                   help="write no checkpoints (testing; no tuning then, nothing to resume)")
    p.add_argument("--val", dest="only_val", action="store_true", help="only run the final validation")
    p.add_argument("--npz", action="store_true", help="save validation probabilities")
    p.add_argument("--no-tune", "--no_tune", dest="no_tune", action="store_true",
                   help="diffusion trainers: skip the sampling tuning that follows the final validation by default "
                        "(steps x samples and the temperature, chosen on this fold's validation cases and stored in "
                        "the model folder's sampling.json, which diffnnunet_predict uses; diffnnunet_tune_sampling "
                        "does it later)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed torch, numpy and random before the network is built (the weights' initialisation; "
                        "nnU-Net's augmentation workers stay unseeded, as in nnU-Net)")
    p.add_argument("--tune-max-cases", type=int, default=None,
                   help="validation cases the tuning uses (default: all of the fold's)")
    return p


def default_configuration(plans: dict) -> str:
    return "3d_fullres" if "3d_fullres" in plans["configurations"] else "2d"


def load_trainer(dataset: str, trainer_name: str, fold, configuration=None, plans_identifier=None,
                 device="cpu", continue_training: bool = False, check_only: bool = False):
    """Instantiate a registered trainer on preprocessed data (no class-name scan). ``check_only``: validate the
    inputs (one-line errors) and return None, e.g. once before spawning the ranks of a distributed run."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    from diffnnunet.trainers import default_plans_for, get_trainer_class

    try:
        cls = get_trainer_class(trainer_name)
    except ValueError as e:
        raise UserError(str(e)) from None
    name = resolve_dataset_name(dataset)
    folder = join(require_env("nnUNet_preprocessed"), name)
    require_env("nnUNet_results")
    plans_identifier = plans_identifier or default_plans_for(cls)
    plans_file = join(folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UserError(f"{plans_file}: plans not found (run diffnnunet_plan_and_preprocess -d {dataset})")
    plans = load_json(plans_file)
    configuration = configuration or default_configuration(plans)
    if configuration not in plans["configurations"]:
        raise UserError(f"unknown configuration '{configuration}' for {name} (plans {plans_identifier} have: "
                        f"{', '.join(plans['configurations'])})")
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise UserError(f"fold must be 0-4 or 'all', got '{fold}'") from None
        if not 0 <= fold <= 4:
            raise UserError(f"fold {fold} out of range (nnU-Net uses folds 0-4, or 'all')")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_folder = join(folder, PlansManager(plans).get_configuration(configuration).data_identifier)
    if not os.path.isdir(data_folder):
        raise UserError(f"{data_folder}: preprocessed data missing (run diffnnunet_plan_and_preprocess -d "
                        f"{dataset} -c {configuration})")
    if check_only:
        return None
    plans["continue_training"] = continue_training  # nnUNetTrainer.__init__ pops it
    trainer = cls(plans=plans, configuration=configuration, fold=fold,
                  dataset_json=load_json(join(folder, "dataset.json")), device=device)
    return trainer


def find_resume_checkpoint(output_folder: str) -> str | None:
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        path = os.path.join(output_folder, name)
        if os.path.isfile(path):
            return path
    return None


@cli_entry("diffnnunet_train")
def main(argv=None):
    import torch

    from diffnnunet.trainers.distributed import launch, under_torchrun

    args = build_parser().parse_args(argv)
    device = parse_device(args.device)
    if args.num_gpus < 1:
        raise UserError(f"-num_gpus must be >= 1, got {args.num_gpus}")
    if args.tune_max_cases is not None and args.tune_max_cases < 1:
        raise UserError(f"--tune-max-cases must be >= 1, got {args.tune_max_cases}")
    if args.pretrained_weights and args.continue_training:
        raise UserError("-pretrained_weights and --continue exclude each other (a resumed run has its own weights)")
    if args.pretrained_weights and not os.path.isfile(args.pretrained_weights):
        raise UserError(f"{args.pretrained_weights}: pretrained weights not found")
    if args.val_best and args.disable_checkpointing:
        raise UserError("--val_best needs checkpoint_best: not with --disable_checkpointing")
    if args.num_gpus == 1 and not under_torchrun():
        return train(args, device)
    if args.num_gpus > 1 and under_torchrun():
        raise UserError("-num_gpus: torchrun already started the processes (--nproc_per_node); drop -num_gpus")
    if device.type == "mps":
        raise UserError("distributed training runs on cuda (NCCL) or cpu (gloo), not mps")
    if device.type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise UserError(f"-num_gpus {args.num_gpus}: only {torch.cuda.device_count()} CUDA devices visible")
    load_trainer(args.dataset, args.trainer, args.fold, args.configuration, args.plans, check_only=True)
    launch(_rank_main, (args, device), args.num_gpus, device.type)


def _rank_main(args, device):
    """One rank of a distributed run (picklable for spawning): errors as one line naming the rank."""
    cli_entry(f"diffnnunet_train (rank {os.environ.get('RANK', 0)})")(lambda _argv: train(args, device))()


def train(args, device):
    """Train (and validate) one fold: one process, or one rank of a distributed run (global rank 0 reports)."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if args.seed is not None:
        import random

        import numpy as np
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    trainer = load_trainer(args.dataset, args.trainer, args.fold, args.configuration, args.plans, device,
                           args.continue_training)
    if args.epochs is not None:
        trainer.num_epochs = args.epochs
    if args.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = args.iterations_per_epoch
    if args.val_iterations is not None:
        trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.disable_checkpointing = args.disable_checkpointing
    if args.pretrained_weights:
        from diffnnunet.trainers.pretrained import load_pretrained_weights
        try:
            n = load_pretrained_weights(trainer, args.pretrained_weights)
        except (ValueError, RuntimeError) as e:
            raise UserError(str(e)) from None
        if trainer.local_rank == 0:
            print(f"fine-tuning from {args.pretrained_weights} ({n} weight tensors)")
    if args.continue_training or args.only_val:
        ckpt = find_resume_checkpoint(trainer.output_folder)
        if args.only_val:
            final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
            if not os.path.isfile(final):
                raise UserError(f"{final}: not found (train this fold first)")
            ckpt = final
        if ckpt is None:
            if trainer.local_rank == 0:  # nnU-Net's local_rank is the global rank
                print(f"no checkpoint in {trainer.output_folder}; starting a new training")
        else:
            trainer.load_checkpoint(ckpt)  # every rank loads the same checkpoint
    if not args.only_val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_best.pth"))
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    from diffnnunet.evaluation.metrics import compute_metrics_on_folder_with_surfaces
    from diffnnunet.utils import swapped
    # every trainer's final validation (the nnU-Net baseline too) reports HD95 and NSD beside Dice and IoU
    with swapped(trainer_module, "compute_metrics_on_folder", compute_metrics_on_folder_with_surfaces):
        trainer.perform_actual_validation(args.npz)
    if trainer.local_rank == 0 and not args.no_tune:  # after the validation's final barrier; one rank tunes
        if args.disable_checkpointing:
            print("sampling tuning skipped: --disable_checkpointing left no checkpoint to tune")
        else:
            tune_after_training(args, trainer)


def tune_after_training(args, trainer) -> None:
    """The default last step of every trainer's run: :func:`~diffnnunet.cli.tune_sampling.run_tuning` on this fold's
    validation cases (a diffusion model's budget; every model's temperature and error map, the stock nnU-Net
    model's too, into the model folder's sampling.json). Skipped with one line for fold 'all' and a fold without
    validation cases. A failed tuning leaves the trained model (checkpoints, validation) as it is and raises one
    :class:`UserError` naming the step and the command that retries it (exit status 2)."""
    from diffnnunet.cli.tune_sampling import run_tuning
    from diffnnunet.inference.tuning import validation_keys
    if args.fold == "all":
        print("sampling tuning skipped: fold 'all' has no validation cases (diffnnunet_tune_sampling tunes on a "
              "model of folds 0-4)")
        return
    try:
        keys = validation_keys(trainer.preprocessed_dataset_folder_base, int(args.fold))
    except (RuntimeError, IndexError, KeyError) as e:
        keys, why = [], str(e)
    else:
        why = f"fold {args.fold} has no validation cases in splits_final.json"
    if not keys:
        print(f"sampling tuning skipped: {why}")
        return
    print(f"sampling tuning on {min(len(keys), args.tune_max_cases or len(keys))} validation case(s) of fold "
          f"{args.fold} (skip with --no-tune)")
    try:
        run_tuning(args.dataset, args.trainer, trainer.configuration_name, trainer.plans_manager.plans_name,
                   [str(args.fold)], checkpoint=_checkpoint(args), max_cases=args.tune_max_cases,
                   device=trainer.device)
    except Exception as e:  # noqa: BLE001 - whatever breaks the tuning, the trained model stays as it is
        why = " ".join(str(e).split()) or "(no message)"
        why = why if isinstance(e, UserError) else f"{type(e).__name__}: {why}"
        raise UserError(f"the sampling tuning failed after training ({why}); the trained model in "
                        f"{trainer.output_folder} is kept and predicts with the plans' sampling; retry the tuning "
                        f"with: {retune_command(args, trainer)}") from None


def _checkpoint(args) -> str:
    """The checkpoint the final validation used, which the tuning tunes."""
    return "checkpoint_best.pth" if getattr(args, "val_best", False) else "checkpoint_final.pth"


def retune_command(args, trainer) -> str:
    """The ``diffnnunet_tune_sampling`` command that redoes the end-of-training tuning of this run."""
    cmd = (f"diffnnunet_tune_sampling -d {args.dataset} -tr {args.trainer} -c {trainer.configuration_name} "
           f"-p {trainer.plans_manager.plans_name} -f {args.fold}")
    cmd += " -chk checkpoint_best.pth" if _checkpoint(args) != "checkpoint_final.pth" else ""
    return cmd + (f" --max_cases {args.tune_max_cases}" if args.tune_max_cases else "")


if __name__ == "__main__":
    main()
