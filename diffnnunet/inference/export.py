"""Export of one case: nnU-Net's resampling to the original geometry, then every file written under a temporary
name and renamed, so an interrupted run never leaves a half-written output (``--continue_prediction`` trusts
whatever exists). Optionally writes ``CASE_uncertainty`` beside ``CASE``."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from batchgenerators.utilities.file_and_folder_operations import load_json, save_pickle
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

from diffnnunet.config import UNCERTAINTY_SUFFIX
from diffnnunet.evaluation.uncertainty import normalized_entropy
from diffnnunet.utils import atomic_outputs, partial_path

__all__ = ["UNCERTAINTY_SUFFIX", "normalized_entropy", "export_prediction_atomically"]

def uncertainty_to_original_geometry(uncertainty, properties: dict, configuration_manager,
                                     plans_manager) -> np.ndarray:
    """A native uncertainty map ``(1, *preprocessed spatial)`` -> ``(*original spatial)``: the same resampling,
    un-cropping (0 outside the crop) and transposition nnU-Net applies to probabilities."""
    spacing_t = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = (configuration_manager.spacing if len(configuration_manager.spacing) == len(shape)
               else [spacing_t[0], *configuration_manager.spacing])
    resampled = configuration_manager.resampling_fn_probabilities(uncertainty, shape, current, spacing_t)
    resampled = resampled.cpu().numpy() if hasattr(resampled, "cpu") else np.asarray(resampled)
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full = insert_crop_into_image(full, np.clip(resampled[0], 0, None).astype(np.float32),
                                  properties["bbox_used_for_cropping"])
    return full.transpose(plans_manager.transpose_backward)


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


def write_probabilities(output_truncated: str, probabilities: np.ndarray, properties: dict, written: list) -> None:
    """nnU-Net's ``CASE.npz`` (``probabilities`` ``(C, *spatial)``) and ``CASE.pkl`` under their partial names,
    appended to ``written`` (:func:`~diffnnunet.utils.atomic_outputs`)."""
    npz, pkl = output_truncated + ".npz", output_truncated + ".pkl"
    written += [npz, pkl]
    with open(partial_path(npz), "wb") as f:  # a file object: numpy must not append its own suffix
        np.savez_compressed(f, probabilities=probabilities)
    save_pickle(properties, partial_path(pkl))


def export_prediction_atomically(predicted_logits, properties: dict, configuration_manager, plans_manager,
                                 dataset_json, output_file_truncated: str, save_probabilities: bool = False,
                                 save_uncertainty: bool = False, native_only: bool = False) -> None:
    """Drop-in for nnU-Net's ``export_prediction_from_logits`` (same positional arguments). A channel beyond the
    label manager's heads is the method's native uncertainty (see DiffusionPredictor); without one the uncertainty
    map is the normalized entropy of the exported probabilities (with ``native_only``: no map is written then)."""
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    label_manager = plans_manager.get_label_manager(dataset_json)
    native = None
    if predicted_logits.shape[0] > label_manager.num_segmentation_heads:
        native = predicted_logits[label_manager.num_segmentation_heads:]
        predicted_logits = predicted_logits[:label_manager.num_segmentation_heads]
    need_probs = save_probabilities or save_uncertainty
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, label_manager, properties,
        return_probabilities=need_probs)
    segmentation, probabilities = ret if need_probs else (ret, None)
    ending = dataset_json["file_ending"]
    with atomic_outputs() as written:
        if save_probabilities:
            write_probabilities(output_file_truncated, probabilities, properties, written)
        if save_uncertainty and (native is not None or not native_only):
            unc = output_file_truncated + UNCERTAINTY_SUFFIX + ending
            written.append(unc)
            uncertainty = (normalized_entropy(probabilities, label_manager.has_regions) if native is None else
                           uncertainty_to_original_geometry(native, properties, configuration_manager, plans_manager))
            write_float_image(uncertainty, partial_path(unc), properties)
        seg_file = output_file_truncated + ending
        written.append(seg_file)  # renamed last: the segmentation's presence marks a finished case
        plans_manager.image_reader_writer_class().write_seg(segmentation, partial_path(seg_file), properties)
