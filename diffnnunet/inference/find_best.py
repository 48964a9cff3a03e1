"""diffnnunet_find_best_configuration's work, nnU-Net's ``find_best_configuration`` flow for every trainer: each
model's cross-validation results accumulated (nnU-Net's ``accumulate_cv_results``), pairs of models ensembled from
their validation ``.npz`` (``ensemble_crossvalidations``), all evaluated with diffnnunet's metrics (Dice, HD95, NSD,
ECE, uncertainty AUROC) on the validation cases every model shares, the predict time per case measured, and
nnU-Net's postprocessing determined (``determine_postprocessing``). nnU-Net's functions are called, not copied; the
seams are module attributes swapped with :func:`diffnnunet.utils.swapped` (metric function, file listings,
ensemble merge, the process pool for ``-np 1``). The AUROC column and the ensembles' error maps:
:mod:`~diffnnunet.inference.find_best_uncertainty`."""
from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from dataclasses import dataclass

from diffnnunet.inference.ensembling import (
    SerialMultiprocessing,
    merge_case,
    uncertainty_file,
    without_uncertainty_maps,
)
from diffnnunet.utils import swapped


class MissingResults(Exception):
    """A model, fold or file the comparison needs is missing; the message names it and the command that makes it."""


@dataclass(frozen=True)
class Model:
    trainer: str
    plans: str
    configuration: str
    folder: str

    @property
    def identifier(self) -> str:
        return os.path.basename(self.folder)


def train_command(dataset: str, model: Model, fold, validation_only: bool) -> str:
    """The ``diffnnunet_train`` command that makes a fold's validation results with ``.npz``."""
    return (f"diffnnunet_train {dataset} {model.trainer} {fold} -c {model.configuration} -p {model.plans}"
            + (" --val --npz" if validation_only else " --npz"))


def select_models(results_dir: str, trainers=None, configurations=None, plans=None, registered=None) -> list:
    """The trained models ``TRAINER__PLANS__CONFIG`` in ``results_dir`` (nnUNet_results/DatasetXXX), filtered by
    the given trainers (None: every one in ``registered``, the trainer registry's names, when given), configurations
    and plans (None: any). A requested trainer without any model folder raises :class:`MissingResults`."""
    found = []
    if os.path.isdir(results_dir):
        for name in sorted(os.listdir(results_dir)):
            parts = name.split("__")
            if len(parts) != 3 or not os.path.isdir(os.path.join(results_dir, name)):
                continue
            tr, pl, c = parts
            if ((trainers and tr not in trainers) or (not trainers and registered is not None and tr not in registered)
                    or (configurations and c not in configurations) or (plans and pl not in plans)):
                continue
            found.append(Model(tr, pl, c, os.path.join(results_dir, name)))
    for tr in trainers or []:
        if not any(m.trainer == tr for m in found):
            raise MissingResults(f"no trained {tr} model in {results_dir}"
                                 + (f" for configuration(s) {' '.join(configurations)}" if configurations else "")
                                 + f" (train it with: diffnnunet_train DATASET {tr} FOLD --npz)")
    order = {t: i for i, t in enumerate(trainers or [])}
    return sorted(found, key=lambda m: (order.get(m.trainer, len(order)), m.trainer, m.configuration, m.plans))


def validation_cases(model: Model, folds, dataset: str, file_ending: str) -> dict:
    """{case: fold} of the model's validation predictions with ``.npz`` over ``folds``; a fold that lacks them
    raises :class:`MissingResults` naming the fold and the command that makes them."""
    cases = {}
    for f in folds:
        fold_dir = os.path.join(model.folder, f"fold_{f}")
        val = os.path.join(fold_dir, "validation")
        trained = os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth"))
        if not os.path.isfile(os.path.join(val, "summary.json")):
            what = "no validation results" if trained else "not trained"
            raise MissingResults(f"fold {f} of {model.identifier}: {what} ({val}); make them with: "
                                 f"{train_command(dataset, model, f, trained)}")
        npz = {n[:-4] for n in os.listdir(val) if n.endswith(".npz")}
        segs = {n[: -len(file_ending)] for n in os.listdir(val) if n.endswith(file_ending)}
        if not npz & segs:
            raise MissingResults(f"fold {f} of {model.identifier}: no validation .npz in {val} (needed for the "
                                 f"ensembles); make them with: {train_command(dataset, model, f, trained)}")
        for case in sorted(npz & segs):
            cases[case] = f
    return cases


def reference_folder(dataset_name: str) -> str:
    """The references nnU-Net's ``accumulate_cv_results`` uses: raw labelsTr, else preprocessed gt_segmentations."""
    labels = os.path.join(os.environ.get("nnUNet_raw", ""), dataset_name, "labelsTr")
    if os.path.isdir(labels):
        return labels
    return os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "gt_segmentations")


def _only_cases(subfiles, shared: set, suffix_of_interest: str):
    """Wrap batchgenerators' ``subfiles``: listings by ``suffix_of_interest`` keep only the ``shared`` cases."""
    def listing(folder, join=True, prefix=None, suffix=None, sort=True):
        files = subfiles(folder, join=join, prefix=prefix, suffix=suffix, sort=sort)
        if suffix != suffix_of_interest:
            return files
        return [f for f in files if os.path.basename(f)[: -len(suffix)] in shared]
    return listing


def _pool_swap(module, num_processes: int):
    return (swapped(module, "multiprocessing", SerialMultiprocessing()) if num_processes <= 1
            else contextlib.nullcontext())


def _metrics_linking_files(model: Model, cases: dict, file_ending: str):
    """Our metric function, in place of nnU-Net's inside ``accumulate_cv_results``: first links each case's
    ``.npz`` (and uncertainty map, when the validation wrote one) beside the copied segmentation, so the merged
    folder's summary has ECE and AUROC too."""
    from diffnnunet.evaluation.metrics import compute_metrics_on_folder_with_surfaces

    def metrics(folder_ref, folder_pred, output_file, rw, ending, labels, ignore_label=None, num_processes=2,
                chill=True):
        for case, fold in cases.items():
            val = os.path.join(model.folder, f"fold_{fold}", "validation")
            for src in (os.path.join(val, case + ".npz"), uncertainty_file(os.path.join(val, case), file_ending)):
                dst = os.path.join(folder_pred, os.path.basename(src))
                if os.path.isfile(src) and not os.path.exists(dst):
                    _link_or_copy(src, dst)
        return compute_metrics_on_folder_with_surfaces(folder_ref, folder_pred, output_file, rw, ending, labels,
                                                       ignore_label, num_processes, chill)
    return metrics


def _link_or_copy(src: str, dst: str) -> None:
    import shutil
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def accumulate(model: Model, folds, cases: dict, file_ending: str, num_processes: int) -> str:
    """nnU-Net's ``accumulate_cv_results`` of ``model`` over ``folds``, restricted to ``cases`` ({case: fold}, the
    shared validation cases), evaluated with our metrics. Returns the merged folder (its summary.json written)."""
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.evaluation import accumulate_cv_results as module
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string

    merged = os.path.join(model.folder, f"crossval_results_folds_{folds_tuple_to_string(list(folds))}")
    with swapped(module, "subfiles", _only_cases(subfiles, set(cases), file_ending)), \
            swapped(module, "compute_metrics_on_folder", _metrics_linking_files(model, cases, file_ending)):
        module.accumulate_cv_results(model.folder, merged, list(folds), num_processes, overwrite=True)
    return merged


def ensemble(models: list, folds, shared: set, output_folder: str, reference: str, num_processes: int) -> str:
    """nnU-Net's ``ensemble_crossvalidations`` of ``models`` on the ``shared`` validation cases, each case merged
    by :func:`~diffnnunet.inference.ensembling.merge_case` (probabilities, ``.npz``, and as uncertainty map the
    entropy of the mean: the members' raw validation maps are left unread, they are not what the members export;
    the ensemble's AUROC and error map come from :mod:`~diffnnunet.inference.find_best_uncertainty`), then
    evaluated with our metrics into ``output_folder/summary.json``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, subfiles
    from nnunetv2.ensembling import ensemble as module
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from diffnnunet.evaluation.metrics import compute_metrics_on_folder_with_surfaces

    merge = functools.partial(merge_case, always_save_probabilities=True, member_maps=False)
    with swapped(module, "subfiles", _only_cases(subfiles, shared, ".npz")), swapped(module, "merge_files", merge), \
            _pool_swap(module, num_processes):
        module.ensemble_crossvalidations([m.folder for m in models], output_folder, list(folds),
                                         max(1, num_processes), overwrite=True)
    dataset_json = load_json(os.path.join(models[0].folder, "dataset.json"))
    plans = PlansManager(os.path.join(models[0].folder, "plans.json"))
    lm = plans.get_label_manager(dataset_json)
    compute_metrics_on_folder_with_surfaces(
        reference, output_folder, os.path.join(output_folder, "summary.json"), plans.image_reader_writer_class(),
        dataset_json["file_ending"], lm.foreground_regions if lm.has_regions else lm.foreground_labels,
        lm.ignore_label, num_processes)
    return output_folder


def determine_postprocessing(source: str, reference: str, num_processes: int) -> dict:
    """nnU-Net's ``determine_postprocessing`` on a folder of validation predictions with our metrics, the
    uncertainty maps left out of its listings. Returns {pkl, plans, dice_before, dice_after, functions}."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, subfiles
    from nnunetv2.postprocessing import remove_connected_components as module

    from diffnnunet.evaluation.metrics import compute_metrics_on_folder_with_surfaces

    with swapped(module, "compute_metrics_on_folder", compute_metrics_on_folder_with_surfaces), \
            swapped(module, "subfiles", without_uncertainty_maps(subfiles)), _pool_swap(module, num_processes), \
            contextlib.redirect_stdout(io.StringIO()) as said:
        module.determine_postprocessing(source, reference, os.path.join(source, "plans.json"),
                                        os.path.join(source, "dataset.json"), max(1, num_processes),
                                        keep_postprocessed_files=True)
    info = load_json(os.path.join(source, "postprocessing.json"))
    return {"pkl": os.path.join(source, "postprocessing.pkl"), "plans": os.path.join(source, "plans.json"),
            "dice_before": info["input_folder"]["foreground_mean"]["Dice"],
            "dice_after": info["postprocessed"]["foreground_mean"]["Dice"],
            "functions": info["postprocessing_fns"], "kwargs": info["postprocessing_kwargs"],
            "log": [line for line in said.getvalue().splitlines() if line.strip()]}


def budget(model: Model) -> dict:
    """The model's sampling: ``validated`` (the plans' steps x samples, what the fold validation used; None when the
    plans lack them), ``tuned`` (sampling.json's, None without one); stock models: both None."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from diffnnunet.inference.calibration import load_tuned_sampling

    section = load_json(os.path.join(model.folder, "plans.json"))["configurations"][model.configuration].get(
        "diffusion")
    if section is None:
        return {"validated": None, "tuned": None}
    tuned = load_tuned_sampling(model.folder) or {}
    validated = [section.get("sampling_steps"), section.get("samples_per_step")]
    return {"validated": [int(v) for v in validated] if None not in validated else None,
            "tuned": ([tuned["sampling_steps"], tuned["samples_per_step"]] if "sampling_steps" in tuned else None)}


def time_prediction(model: Model, folds, cases: list, device, checkpoint: str = "checkpoint_final.pth") -> float:
    """Seconds per case of ``diffnnunet_predict --save_uncertainty`` with the model's folds at its tuned budget
    (sampling.json, else the plans'), nnU-Net's mirroring for stock models and none for diffusion models, as the
    CLI predicts: ``cases`` read from the raw dataset's imagesTr, one after the other in this process, the model's
    loading left out. Raises :class:`MissingResults` when an image is missing."""
    import tempfile

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference import predict_from_raw_data as predict_module

    from diffnnunet.inference import DiffusionPredictor
    from diffnnunet.inference.export import export_prediction_atomically

    dataset_json = load_json(os.path.join(model.folder, "dataset.json"))
    name = load_json(os.path.join(model.folder, "plans.json"))["dataset_name"]
    images = os.path.join(os.environ.get("nnUNet_raw", ""), name, "imagesTr")
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    lists = [[os.path.join(images, f"{c}_{i:04d}{dataset_json['file_ending']}") for i in range(channels)]
             for c in cases]
    missing = [f for files in lists for f in files if not os.path.isfile(f)]
    if missing:
        raise MissingResults(f"{missing[0]}: raw image missing for the timing (or use --no_timing)")
    predictor = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=device,
                                   save_uncertainty=True, allow_tqdm=False, verbose=False)
    predictor.initialize_from_trained_model_folder(model.folder, list(folds), checkpoint)
    if predictor.diffusion is not None:
        predictor.use_mirroring = False  # diffnnunet_predict's default for diffusion models
    export = functools.partial(export_prediction_atomically, save_uncertainty=True)
    with tempfile.TemporaryDirectory() as out, swapped(predict_module, "export_prediction_from_logits", export), \
            contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        predictor.predict_from_files_sequential(lists, out, save_probabilities=False, overwrite=True)
        return (time.perf_counter() - start) / len(lists)
