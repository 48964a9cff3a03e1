"""The AUROC column of ``diffnnunet_find_best_configuration`` and the ensembles' error maps.

Every row, a single model (nnU-Net's included) or an ensemble of models, gets on the validation cases the rows
share the calibration a single model gets at the end of its training
(:func:`~diffnnunet.inference.calibration.fit_error_map`), and the row's AUROC is that fit's held-out AUROC
(``validation_auroc`` of the chosen input): the curves fitted on one half of the cases (even / odd places in the
sorted case list) score the other half, so no voxel is scored by a curve fitted on it. Every row reads the same
voxels: per case one seeded subset (:func:`~diffnnunet.inference.calibration.voxel_subset`, the seed the case's
place; at most :data:`~diffnnunet.inference.calibration.VOXELS_PER_CASE` per case and :data:`ROW_VOXELS` per row,
which bounds the memory).

Per case and row, the samples the fit reads are (labels, map, wrong, h), each ``(n,)``:

* **probabilities** p_T: each model's validation ``.npz`` at its tuned temperature T (``sampling.json``; the fold
  validation runs before the tuning and exports at T = 1), p_T = nonlin(z / T) with z = log p (labels) or logit p
  (regions), which is what ``diffnnunet_predict`` exports (nnU-Net's resampling to the original geometry is linear,
  so it commutes with 1 / T; :func:`tempered`). An ensemble's are the mean of its members' p_T, as
  ``diffnnunet_ensemble`` averages the members' exports.
* **labels**: their segmentation (nnU-Net's ``convert_probabilities_to_segmentation``); **wrong**: labels differ
  from the reference (raw labelsTr, the ignore label left out); **h** = 1 - (p_(1) - p_(2)) of them
  (:func:`~diffnnunet.inference.calibration.exported_margin`).
* **map**, a single model: its native map from its fold validation (``CASE_uncertainty`` beside the ``.npz``, which
  the validation writes with ``--npz`` since 2026-12-03, at the plans' budget); None for nnU-Net, for methods
  without a map and for folds validated earlier, so that such a row competes with h alone, as in its tuning.
  An ensemble: the pooled map U (:func:`~diffnnunet.inference.ensembling.pooled_uncertainty`) of its members' p_T
  and of the maps each member's ``diffnnunet_predict --save_uncertainty`` would write (:func:`exported_map`): the
  member's error map applied to its validation map or margin; where that error map reads a map the validation
  lacks, the member's margin curves stored beside it (``control``) stand in; without an error map the raw native
  map, else H(p_T). The ensemble's fit (:func:`store_ensemble_error_map`) is what ``diffnnunet_ensemble
  --error_map`` applies to U or to the margin of the mean.

Caveats (documentation/which_method.md): the members' own error maps were fitted on (up to ``--tune-max-cases`` of)
these validation cases, so an ensemble's map input is held out only in the ensemble's own curves; the Dice and ECE
columns come from the fold validation's own probabilities (T = 1), so where the temperatures move the argmax of an
ensemble's mean, its labels here differ from its Dice row's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from diffnnunet.inference.ensembling import ERROR_MAP_FILE, export_logits, pooled_uncertainty
from diffnnunet.utils import write_json

#: validation voxels kept per row over all cases (each case keeps at most VOXELS_PER_CASE of them)
ROW_VOXELS = 2_000_000


@dataclass(frozen=True)
class Calibration:
    """What ``diffnnunet_predict --save_uncertainty`` applies to one model's export: the tuned ``temperature``, the
    ``error_map`` (None without one) and the plans' native-map ``measure`` (None: the stock nnU-Net model)."""
    temperature: float = 1.0
    error_map: dict | None = None
    measure: str | None = None


def model_calibration(folder: str, configuration: str) -> Calibration:
    """A model folder's :class:`Calibration` (its ``sampling.json`` and plans)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from diffnnunet.config import resolve_diffusion
    from diffnnunet.inference.calibration import load_tuned_sampling
    from diffnnunet.methods.uncertainty import plans_measure
    section = load_json(os.path.join(folder, "plans.json"))["configurations"][configuration].get("diffusion")
    tuned = load_tuned_sampling(folder) or {}
    return Calibration(float(tuned.get("temperature", 1.0)), tuned.get("error_map"),
                       None if section is None else plans_measure(resolve_diffusion(section)["uncertainty"]))


def tempered(probabilities: np.ndarray, temperature: float, label_manager) -> np.ndarray:
    """Exported probabilities ``(C, n)`` (T = 1) -> the export at ``temperature``, float32 ``(C, n)``: nnU-Net's
    nonlinearity of z / T, z their logits (:func:`~diffnnunet.inference.ensembling.export_logits`); unchanged at
    T = 1."""
    if temperature == 1.0:
        return np.asarray(probabilities, np.float32)
    z = export_logits(probabilities, label_manager.has_regions) / temperature
    return label_manager.apply_inference_nonlin(z).numpy().astype(np.float32)


def margin(probabilities: np.ndarray, has_regions: bool) -> np.ndarray:
    """h float32 ``(n,)`` or ``(*spatial)`` of exported probabilities ``(C, n)`` or ``(C, *spatial)``
    (:func:`~diffnnunet.inference.calibration.exported_margin` of their logits)."""
    from diffnnunet.inference.calibration import exported_margin
    return exported_margin(export_logits(probabilities, has_regions), has_regions).numpy().astype(np.float32)


def exported_map(calibration: Calibration, probabilities: np.ndarray, native: np.ndarray | None,
                 label_manager) -> np.ndarray:
    """The map ``(n,)`` a member's ``diffnnunet_predict --save_uncertainty`` writes, from its exported (tempered)
    ``probabilities`` ``(C, n)`` and its native map ``(n,)`` or None (module docstring): its error map applied
    (the predictor's ``_apply_error_map``; a map-reading error map without the map: its ``control`` margin curves,
    when stored), else the native map, else the normalised entropy (what the export writes without a map)."""
    import torch

    from diffnnunet.evaluation.uncertainty import normalized_entropy
    from diffnnunet.inference.calibration import apply_error_map, error_map_input
    curves = calibration.error_map
    if curves is not None and curves["inputs"] == "map":
        if native is not None and curves["measure"] != calibration.measure:
            curves = None  # fitted for another measure: the predictor writes the raw map
        elif native is None:
            curves = {"inputs": "confidence", **curves["control"]} if "control" in curves else None
    if curves is not None:
        labels = np.asarray(label_manager.convert_probabilities_to_segmentation(probabilities))
        x = error_map_input(curves, None if native is None else torch.from_numpy(np.asarray(native, np.float32)),
                            export_logits(probabilities, label_manager.has_regions), label_manager.has_regions)
        return apply_error_map(x, labels, curves).numpy()
    if native is not None:
        return np.asarray(native, np.float32)
    return normalized_entropy(np.asarray(probabilities), label_manager.has_regions)


def case_samples(rows: dict, probabilities: dict, natives: dict, calibrations: dict, reference: np.ndarray,
                 label_manager) -> dict:
    """One case's samples per row. ``rows``: {name: [model keys]} (one key: the model, several: their ensemble);
    ``probabilities``: {key: validation probabilities ``(C, n)`` at T = 1}; ``natives``: {key: native map ``(n,)``
    or None}; ``calibrations``: {key: :class:`Calibration`}; ``reference``: label ids ``(n,)`` at the same voxels.
    Returns {name: (labels ``(n,)`` int16, map ``(n,)`` float32 or None, wrong ``(n,)`` bool, h ``(n,)``
    float32)}, the tuple :func:`~diffnnunet.inference.calibration.fit_error_map` reads per case."""
    has_regions = label_manager.has_regions
    p_t = {k: tempered(p, calibrations[k].temperature, label_manager) for k, p in probabilities.items()}
    exported = {}
    out = {}
    for name, keys in rows.items():
        if len(keys) == 1:
            p, u = p_t[keys[0]], natives[keys[0]]
            u = None if u is None else np.asarray(u, np.float32)
        else:
            for k in keys:
                if k not in exported:
                    exported[k] = exported_map(calibrations[k], p_t[k], natives[k], label_manager)
            p = np.mean([p_t[k] for k in keys], axis=0, dtype=np.float64).astype(np.float32)
            u = pooled_uncertainty([p_t[k] for k in keys], [exported[k] for k in keys], has_regions)
        labels = np.asarray(label_manager.convert_probabilities_to_segmentation(p)).astype(np.int16)
        out[name] = (labels, u, labels != np.asarray(reference), margin(p, has_regions))
    return out


def fit_rows(samples: dict, measures: dict) -> dict:
    """{name: per-case samples (:func:`case_samples`)} -> {name: :func:`~diffnnunet.inference.calibration.
    fit_error_map` with ``measures[name]``, or None where the cases hold no error or nothing but errors}."""
    from diffnnunet.inference.calibration import fit_error_map
    fits = {}
    for name, per_case in samples.items():
        wrong = [s[2] for s in per_case]
        usable = any(w.any() for w in wrong) and not all(w.all() for w in wrong)
        fits[name] = fit_error_map(per_case, measures[name]) if usable else None
    return fits


def held_out_auroc(fit: dict | None) -> float | None:
    """The row's AUROC: the held-out AUROC of the input its fit chose (None without a fit)."""
    if fit is None:
        return None
    value = fit["validation_auroc"][fit["inputs"]]
    return None if value is None or np.isnan(value) else float(value)


def _read_map(path: str, shape: tuple, image_reader_writer) -> np.ndarray:
    u = image_reader_writer.read_images((path,))[0][0]
    if u.shape != shape:
        raise ValueError(f"{path}: shape {u.shape} differs from its probabilities' {shape}")
    return u


def validation_uncertainty(rows: dict, cases: dict, shared, reference: str) -> dict:
    """The fits of every row on the ``shared`` validation cases (module docstring). ``rows``: {name: [Model, ...]}
    (``inference.find_best.Model``); ``cases``: {Model: {case: fold}}; ``reference``: the folder of the reference
    segmentations. Returns {name: fit or None}; ValueError naming a file whose shape disagrees."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from diffnnunet.inference.calibration import VOXELS_PER_CASE, voxel_subset
    from diffnnunet.inference.ensembling import uncertainty_file

    models = list(dict.fromkeys(m for ms in rows.values() for m in ms))
    dataset_json = load_json(os.path.join(models[0].folder, "dataset.json"))
    plans = PlansManager(os.path.join(models[0].folder, "plans.json"))
    lm, rw, ending = (plans.get_label_manager(dataset_json), plans.image_reader_writer_class(),
                      dataset_json["file_ending"])
    calibrations = {m: model_calibration(m.folder, m.configuration) for m in models}
    shared = sorted(shared)
    per_case = max(1, min(VOXELS_PER_CASE, ROW_VOXELS // len(shared)))
    samples = {name: [] for name in rows}
    for i, case in enumerate(shared):
        ref = rw.read_seg(os.path.join(reference, case + ending))[0][0]
        idx = voxel_subset(ref, lm, np.random.default_rng(i), per_case)
        probabilities, natives = {}, {}
        for m in models:
            val = os.path.join(m.folder, f"fold_{cases[m][case]}", "validation")
            p = np.load(os.path.join(val, case + ".npz"))["probabilities"]
            if p.shape[1:] != ref.shape:
                raise ValueError(f"{os.path.join(val, case + '.npz')}: shape {p.shape[1:]} differs from the "
                                 f"reference's {ref.shape}")
            probabilities[m] = p.reshape(p.shape[0], -1)[:, idx]
            path = uncertainty_file(os.path.join(val, case), ending)
            natives[m] = _read_map(path, ref.shape, rw).reshape(-1)[idx] if os.path.isfile(path) else None
        for name, sample in case_samples(rows, probabilities, natives, calibrations, ref.reshape(-1)[idx],
                                         lm).items():
            samples[name].append(sample)
    measures = {name: "pooled" if len(ms) > 1 else (calibrations[ms[0]].measure or "margin")
                for name, ms in rows.items()}
    return fit_rows(samples, measures)


def store_ensemble_error_map(folder: str, fit: dict | None, members: list, folds, n_cases: int) -> str | None:
    """The ensemble's fit as ``folder/error_map.json`` (atomically; with ``members`` and the ``folds`` and case
    count it was fitted on) and its path; without a fit, a stale file is removed and None returned."""
    path = os.path.join(folder, ERROR_MAP_FILE)
    if fit is None:
        if os.path.isfile(path):
            os.remove(path)
        return None
    write_json(path, {**fit, "members": members, "folds": list(folds), "cases": int(n_cases)})
    return path
