"""Export of one case: nnU-Net's resampling to the original geometry, then every file written under a temporary
name and renamed, so an interrupted run never leaves a half-written output (``--continue_prediction`` trusts
whatever exists). Optionally writes ``CASE_uncertainty`` beside ``CASE``."""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json, save_pickle
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

from diffnnunet.utils import partial_path

UNCERTAINTY_SUFFIX = "_uncertainty"


def normalized_entropy(probabilities: np.ndarray, has_regions: bool) -> np.ndarray:
    """Voxelwise predictive uncertainty in [0, 1] from class probabilities ``(C, *spatial)``.

    Mutually exclusive labels: H(p) / log C with H(p) = -sum_c p_c log p_c. Regions (independent sigmoids): the
    mean over regions of the binary entropy divided by log 2.
    """
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    if has_regions:
        q = np.clip(1.0 - probabilities.astype(np.float64), 1e-12, 1.0)
        h = -(p * np.log(p) + q * np.log(q)) / np.log(2.0)
        return np.clip(h.mean(0), 0, 1).astype(np.float32)
    if probabilities.shape[0] < 2:
        return np.zeros(probabilities.shape[1:], np.float32)
    h = -(p * np.log(p)).sum(0) / np.log(probabilities.shape[0])
    return np.clip(h, 0, 1).astype(np.float32)


def write_float_image(array: np.ndarray, fname: str, properties: dict) -> None:
    """Write a float32 map ``(x, y[, z])`` with the geometry nnU-Net recorded when it read the case."""
    stuff = properties.get("sitk_stuff")
    if stuff is None:
        raise RuntimeError(f"{fname}: uncertainty maps need a SimpleITK-read dataset (no 'sitk_stuff' in properties)")
    if len(stuff["spacing"]) == 2:
        array = array[0]
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.SetSpacing(stuff["spacing"])
    image.SetOrigin(stuff["origin"])
    image.SetDirection(stuff["direction"])
    if "original_orientation" in stuff:
        image = sitk.DICOMOrient(image, stuff["original_orientation"])
    sitk.WriteImage(image, fname, True)


def export_prediction_atomically(predicted_logits, properties: dict, configuration_manager, plans_manager,
                                 dataset_json, output_file_truncated: str, save_probabilities: bool = False,
                                 save_uncertainty: bool = False) -> None:
    """Drop-in for nnU-Net's ``export_prediction_from_logits`` (same positional arguments)."""
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    label_manager = plans_manager.get_label_manager(dataset_json)
    need_probs = save_probabilities or save_uncertainty
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, label_manager, properties,
        return_probabilities=need_probs)
    segmentation, probabilities = ret if need_probs else (ret, None)
    ending = dataset_json["file_ending"]
    written = []  # final paths, each first written as partial_path(path)
    try:
        if save_probabilities:
            npz, pkl = output_file_truncated + ".npz", output_file_truncated + ".pkl"
            written += [npz, pkl]
            with open(partial_path(npz), "wb") as f:  # a file object: numpy must not append its own suffix
                np.savez_compressed(f, probabilities=probabilities)
            save_pickle(properties, partial_path(pkl))
        if save_uncertainty:
            unc = output_file_truncated + UNCERTAINTY_SUFFIX + ending
            written.append(unc)
            uncertainty = normalized_entropy(probabilities, label_manager.has_regions)
            write_float_image(uncertainty, partial_path(unc), properties)
        seg_file = output_file_truncated + ending
        written.append(seg_file)  # renamed last: the segmentation's presence marks a finished case
        plans_manager.image_reader_writer_class().write_seg(segmentation, partial_path(seg_file), properties)
        for path in written:
            os.replace(partial_path(path), path)
    finally:
        for path in written:
            if os.path.exists(partial_path(path)):
                os.remove(partial_path(path))
