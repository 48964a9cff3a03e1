"""Ensembles of prediction folders that keep the uncertainty: nnU-Net's mean of the members' probabilities, plus one
pooled uncertainty map per case that counts the members' disagreement.

The pooled map (documentation/which_method.md, "The ensemble's uncertainty map") for M members with class
probabilities p_m ``(C, *spatial)`` (their ``CASE.npz``) and maps u_m (their ``CASE_uncertainty`` files) is

    U = clip( (1/M) sum_m u_m + max(0, H(p_mean) - (1/M) sum_m H(p_m)), 0, 1 ),   p_mean = (1/M) sum_m p_m,

with H the normalised entropy of the export (``inference.export.normalized_entropy``: -sum_c p_c log p_c / log C,
for regions the mean binary entropy / log 2). The second term is the members' Jensen-Shannon divergence: 0 where
they agree, larger where they give different probabilities. It is the decomposition
``FoldStatistics`` uses for the folds of one model (within-fold maps averaged, plus the folds' JSD), applied to the
members' exported probabilities. Members without maps enter with u_m = H(p_m), so U is then exactly H(p_mean),
what the evaluation reads from the ensemble's ``.npz``. When the members' maps are their calibrated error maps
(the estimated P(wrong) that ``diffnnunet_predict --save_uncertainty`` writes after tuning), U is the members' mean
P(wrong) raised by their disagreement: a ranking score in [0, 1], no longer a calibrated probability.

**The ensemble's error map.** ``diffnnunet_find_best_configuration`` fits, for every ensemble of two models, the
error map a single model gets at the end of training (:func:`~diffnnunet.inference.calibration.fit_error_map`) on
the validation cases, with U and the margin of p_mean as its two inputs
(:mod:`~diffnnunet.inference.find_best_uncertainty`), and stores it as ``error_map.json``
(:data:`ERROR_MAP_FILE`) in the ensemble's folder. Given that file (``diffnnunet_ensemble --error_map``),
:func:`merge_case` writes instead of U the estimated probability that the ensemble's label is wrong: the curve of
the voxel's predicted label at U (input ``map``) or at h = 1 - (p_(1) - p_(2)) of p_mean (input ``confidence``),
as :func:`~diffnnunet.inference.calibration.apply_error_map` does for a single model.
"""
from __future__ import annotations

import functools
import os
from itertools import starmap

import numpy as np

from diffnnunet.utils import atomic_outputs, partial_path

#: the ensemble's error map, written by diffnnunet_find_best_configuration into the ensemble's folder
ERROR_MAP_FILE = "error_map.json"


def jensen_shannon(probabilities: list, has_regions: bool) -> np.ndarray:
    """The members' disagreement H(p_mean) - mean_m H(p_m) >= 0, float32 ``(*spatial)``, from M arrays
    ``(C, *spatial)`` of class probabilities (regions: per-region probabilities)."""
    from diffnnunet.evaluation.uncertainty import normalized_entropy
    mean = np.mean([np.asarray(p, np.float64) for p in probabilities], axis=0)
    within = np.mean([normalized_entropy(np.asarray(p), has_regions).astype(np.float64) for p in probabilities],
                     axis=0)
    return np.clip(normalized_entropy(mean, has_regions).astype(np.float64) - within, 0, None).astype(np.float32)


def pooled_uncertainty(probabilities: list, maps: list | None, has_regions: bool) -> np.ndarray:
    """The ensemble's map U (module docstring), float32 ``(*spatial)`` in [0, 1]. ``probabilities``: M arrays
    ``(C, *spatial)``; ``maps``: M arrays ``(*spatial)`` (the members' own maps) or None (each member's H(p_m))."""
    from diffnnunet.evaluation.uncertainty import normalized_entropy
    if maps is None:
        maps = [normalized_entropy(np.asarray(p), has_regions) for p in probabilities]
    within = np.mean([np.asarray(u, np.float64) for u in maps], axis=0)
    return np.clip(within + jensen_shannon(probabilities, has_regions), 0, 1).astype(np.float32)


def export_logits(probabilities: np.ndarray, has_regions: bool):
    """Exported probabilities ``(C, *spatial)`` (nnU-Net's softmax for labels, sigmoids for regions) -> logits
    ``(C, *spatial)`` float32 tensor that nnU-Net's nonlinearity maps back onto them: log p (labels) or logit p
    (regions), p clamped to [1e-6, 1 - 1e-6] (:func:`~diffnnunet.inference.predictor.probabilities_to_logits`)."""
    import torch

    from diffnnunet.inference.predictor import probabilities_to_logits
    return probabilities_to_logits(torch.as_tensor(np.asarray(probabilities, np.float32)), has_regions,
                                   "categorical")


def calibrated_map(pooled: np.ndarray, probabilities: np.ndarray, segmentation: np.ndarray, has_regions: bool,
                   error_map: dict) -> np.ndarray:
    """The ensemble's error map applied (module docstring): the pooled map U ``(*spatial)``, the mean probabilities
    ``(C, *spatial)`` and their segmentation ``(*spatial)`` -> float32 ``(*spatial)`` in [0, 1]."""
    import torch

    from diffnnunet.inference.calibration import apply_error_map, error_map_input
    x = error_map_input(error_map, torch.from_numpy(np.asarray(pooled, np.float32)),
                        export_logits(probabilities, has_regions), has_regions)
    return apply_error_map(x, np.asarray(segmentation), error_map).numpy()


def load_error_map(path: str) -> dict:
    """An ensemble's ``error_map.json`` (written by diffnnunet_find_best_configuration), checked
    (:func:`~diffnnunet.inference.calibration.checked_error_map`); ValueError naming ``path`` otherwise."""
    import json

    from diffnnunet.inference.calibration import checked_error_map
    try:
        with open(path) as f:
            return checked_error_map(json.load(f))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the error map ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ValueError(f"{path}: not an ensemble error map ({what}; diffnnunet_find_best_configuration writes "
                         f"it as ensembles/ENSEMBLE/{ERROR_MAP_FILE})") from None


def uncertainty_file(truncated: str, file_ending: str) -> str:
    """``CASE_uncertainty<ending>`` beside ``CASE<ending>`` (``truncated`` = the path without the ending)."""
    from diffnnunet.config import UNCERTAINTY_SUFFIX
    return truncated + UNCERTAINTY_SUFFIX + file_ending


def merge_case(list_of_files, output_filename_truncated: str, output_file_ending: str, image_reader_writer,
               label_manager, save_probabilities: bool = False, always_save_probabilities: bool = False,
               member_maps: bool = True, error_map: dict | None = None) -> None:
    """Drop-in for nnU-Net's ``ensembling.ensemble.merge_files`` (same positional arguments): the mean of the
    members' probabilities (nnU-Net's ``average_probabilities``) -> segmentation, plus the pooled uncertainty map
    (float32, the geometry of the members' ``.pkl``; with ``error_map``, that map recalibrated,
    :func:`calibrated_map`) and, with ``save_probabilities`` (or ``always_save_probabilities``, which the
    cross-validation ensembles use for their ECE), ``.npz``/``.pkl``. ``member_maps=False`` leaves the members'
    ``CASE_uncertainty`` files unread (each member enters with H(p_m)). Every file goes through a temporary name,
    the segmentation renamed last."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.ensembling.ensemble import average_probabilities

    from diffnnunet.inference.export import write_float_image, write_probabilities

    properties = load_pickle(list_of_files[0][:-4] + ".pkl")
    probabilities = average_probabilities(list_of_files)
    members = [np.load(f)["probabilities"] for f in list_of_files]
    map_files = [uncertainty_file(f[:-4], output_file_ending) for f in list_of_files]
    present = [member_maps and os.path.isfile(f) for f in map_files]
    if any(present) and not all(present):
        missing = map_files[present.index(False)]
        raise FileNotFoundError(f"{missing}: uncertainty map missing while other members have theirs (predict "
                                "every member with --save_uncertainty, or none)")
    maps = None
    if all(present):
        maps = [image_reader_writer.read_images((f,))[0][0] for f in map_files]
        for f, u, p in zip(map_files, maps, members):
            if u.shape != p.shape[1:]:
                raise ValueError(f"{f}: shape {u.shape} differs from its probabilities' {p.shape[1:]}")
    if error_map is not None and error_map["inputs"] == "map" and maps is None:
        raise FileNotFoundError(f"{map_files[0]}: missing; the ensemble's error map reads the members' pooled maps "
                                "(predict every member with --save_uncertainty)")
    pooled = pooled_uncertainty(members, maps, label_manager.has_regions)
    segmentation = label_manager.convert_probabilities_to_segmentation(probabilities)
    if error_map is not None:
        pooled = calibrated_map(pooled, probabilities, segmentation, label_manager.has_regions, error_map)
    seg_file = output_filename_truncated + output_file_ending
    with atomic_outputs() as written:
        if save_probabilities or always_save_probabilities:
            write_probabilities(output_filename_truncated, probabilities, properties, written)
        unc = uncertainty_file(output_filename_truncated, output_file_ending)
        written.append(unc)
        write_float_image(pooled, partial_path(unc), properties)
        written.append(seg_file)
        image_reader_writer.write_seg(segmentation, partial_path(seg_file), properties)


class _SerialPool:
    """``multiprocessing.Pool`` for one process: ``starmap`` runs here (no spawned interpreter to import torch)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return list(starmap(fn, iterable))


class _SerialContext:
    def Pool(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
        return _SerialPool()


class SerialMultiprocessing:
    """Stands in for the ``multiprocessing`` module of an nnU-Net module (``swapped(module, "multiprocessing",
    SerialMultiprocessing())``) so that ``-np 1`` runs its pool's work in this process."""

    def get_context(self, *args, **kwargs):
        return _SerialContext()


def case_files(folder: str, suffix: str) -> list:
    """Visible files of ``folder`` ending with ``suffix``, without the uncertainty maps, sorted."""
    from diffnnunet.config import UNCERTAINTY_SUFFIX
    return sorted(f for f in os.listdir(folder) if f.endswith(suffix) and not f.startswith(".")
                  and not f.endswith(UNCERTAINTY_SUFFIX + suffix))


def without_uncertainty_maps(subfiles):
    """Wrap batchgenerators' ``subfiles`` so that a listing by the segmentation's ending leaves the
    ``CASE_uncertainty`` maps out (nnU-Net's postprocessing would read them as segmentations)."""
    from diffnnunet.config import UNCERTAINTY_SUFFIX

    def listing(folder, join=True, prefix=None, suffix=None, sort=True):
        files = subfiles(folder, join=join, prefix=prefix, suffix=suffix, sort=sort)
        if suffix is None or suffix == ".npz":
            return files
        return [f for f in files if not f.endswith(UNCERTAINTY_SUFFIX + suffix)]
    return listing


def ensemble_prediction_folders(folders: list, output_folder: str, save_npz: bool = False,
                                num_processes: int = 2, error_map: dict | None = None) -> list:
    """nnU-Net's ``ensemble_folders`` with :func:`merge_case` (pooled uncertainty, recalibrated by ``error_map``
    when given: :func:`load_error_map`; atomic files) after checks that name what is missing; plans.json is copied
    too. Returns the case identifiers written.
    Raises FileNotFoundError / ValueError with one line naming the folder and file."""
    import shutil

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.ensembling import ensemble as ensemble_module

    from diffnnunet.utils import swapped

    if len(folders) < 2:
        raise ValueError(f"an ensemble needs at least two prediction folders, got {len(folders)}")
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: prediction folder not found")
    for name in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(folders[0], name)):
            raise FileNotFoundError(f"{os.path.join(folders[0], name)}: missing (diffnnunet_predict writes it)")
    ending = load_json(os.path.join(folders[0], "dataset.json"))["file_ending"]
    cases = None
    for folder in folders:
        npz = case_files(folder, ".npz")
        if not npz:
            raise FileNotFoundError(f"{folder}: no CASE.npz (predict it with diffnnunet_predict ... "
                                    "--save_probabilities --save_uncertainty)")
        here = {f[:-4] for f in npz}
        for case in sorted(here):
            if not os.path.isfile(os.path.join(folder, case + ".pkl")):
                raise FileNotFoundError(f"{os.path.join(folder, case + '.pkl')}: missing beside {case}.npz")
        maps = {c for c in here if os.path.isfile(uncertainty_file(os.path.join(folder, c), ending))}
        if maps and maps != here:
            missing = sorted(here - maps)[0]
            raise FileNotFoundError(f"{uncertainty_file(os.path.join(folder, missing), ending)}: uncertainty map "
                                    "missing (predict with --save_uncertainty for every case, or for none)")
        if error_map is not None and error_map["inputs"] == "map" and not maps:
            raise FileNotFoundError(f"{uncertainty_file(os.path.join(folder, sorted(here)[0]), ending)}: missing; "
                                    "the ensemble's error map reads the members' pooled maps (predict every member "
                                    "with --save_uncertainty)")
        if cases is not None and here != cases:
            odd = sorted(here ^ cases)[0]
            where = folder if odd not in here else folders[0]
            raise FileNotFoundError(f"{os.path.join(where, odd + '.npz')}: missing; every member needs the same "
                                    "cases")
        cases = here
    os.makedirs(output_folder, exist_ok=True)
    serial = swapped(ensemble_module, "multiprocessing", SerialMultiprocessing()) if num_processes <= 1 else None
    merge = merge_case if error_map is None else functools.partial(merge_case, error_map=error_map)
    with swapped(ensemble_module, "merge_files", merge):
        if serial is None:
            ensemble_module.ensemble_folders(list(folders), output_folder, save_npz, num_processes)
        else:
            with serial:
                ensemble_module.ensemble_folders(list(folders), output_folder, save_npz, 1)
    with atomic_outputs() as written:
        written.append(os.path.join(output_folder, "plans.json"))
        shutil.copy(os.path.join(folders[0], "plans.json"), partial_path(written[-1]))
    return sorted(cases)
