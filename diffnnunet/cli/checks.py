"""Input validation that runs before any work starts, so bad input fails fast with one clear line."""
from __future__ import annotations

import os
import re
from multiprocessing import get_context

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from tqdm import tqdm

from diffnnunet.cli.common import UserError
from diffnnunet.cli.integrity import check_file_whole, require_finite

REQUIRED_KEYS = ("labels", "file_ending")


def load_dataset_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        dj = load_json(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    missing = [k for k in REQUIRED_KEYS if k not in dj]
    if "channel_names" not in dj and "modality" not in dj:
        missing.append("channel_names")
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    return dj


def channel_names(dataset_json: dict) -> dict:
    return dataset_json.get("channel_names", dataset_json.get("modality"))


def allowed_label_values(dataset_json: dict) -> set:
    values = set()
    for v in dataset_json["labels"].values():
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(v) for v in values}


def _reader(dataset_json: dict, example_file: str):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    try:
        return determine_reader_writer_from_dataset_json(dataset_json, example_file,
                                                         allow_nonmatching_filename=True, verbose=False)()
    except Exception:  # noqa: BLE001 - nnU-Net tries every reader on the file; none could open it
        pass
    check_file_whole(example_file)  # a truncated file says so, rather than "no reader can open it"
    raise UserError(f"{example_file}: cannot read image (no reader can open it; corrupt or wrong format?)")


def _read_image(rw, path: str):
    """Whole file, readable, finite voxels -> (shape, spacing)."""
    stored_nonfinite = check_file_whole(path)
    try:
        data, props = rw.read_images([path])
    except Exception as e:  # noqa: BLE001
        detail = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{path}: cannot read image ({detail})") from None
    require_finite(data, path, "image", stored_nonfinite)
    return data.shape[1:], np.asarray(props["spacing"], float)


def _read_label(rw, path: str):
    """Whole file, readable, finite integer values -> (label array (1, *spatial), properties)."""
    stored_nonfinite = check_file_whole(path)
    try:
        seg, props = rw.read_seg(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read label ({' '.join(str(e).split()) or type(e).__name__})") from None
    require_finite(seg, path, "label", stored_nonfinite)
    if np.issubdtype(seg.dtype, np.inexact):
        fractional = int(np.count_nonzero(seg != np.round(seg)))
        if fractional:
            raise UserError(f"{path}: {fractional} label voxel(s) are not whole numbers (labels are integer ids)")
    return seg, props


def _check_channels(rw, files: list[str]) -> tuple:
    """Read every channel of one case; all must share shape and spacing. Returns channel 0's (shape, spacing)."""
    geo = [_read_image(rw, f) for f in files]
    for f, (shape, spacing) in zip(files[1:], geo[1:]):
        if shape != geo[0][0] or not np.allclose(spacing, geo[0][1], rtol=1e-3):
            raise UserError(f"{f}: shape/spacing {shape}/{tuple(spacing)} differs from channel 0 "
                            f"{geo[0][0]}/{tuple(geo[0][1])}")
    return geo[0]


def _check_case(args) -> str | None:
    """Returns an error line for one training case, or None."""
    dataset_json, case, images, label = args
    try:
        rw = _reader(dataset_json, images[0])
        n = len(channel_names(dataset_json))
        if len(images) != n:
            return (f"{case}: {len(images)} image file(s) in imagesTr but dataset.json declares {n} channel(s) "
                    f"({images[0] if images else case})")
        shape, spacing = _check_channels(rw, images)
        if label is None or not os.path.isfile(label):
            return f"{label or case}: label file missing"
        seg, seg_props = _read_label(rw, label)
        if seg.shape[1:] != shape:
            return f"{label}: label shape {seg.shape[1:]} does not match image shape {shape}"
        if not np.allclose(seg_props["spacing"], spacing, rtol=1e-3):
            return (f"{label}: label spacing {tuple(seg_props['spacing'])} does not match image spacing "
                    f"{tuple(spacing)}")
        allowed = allowed_label_values(dataset_json)
        bad = sorted(set(np.unique(seg).astype(int).tolist()) - allowed)
        if bad:
            return f"{label}: label value(s) {bad} not in dataset.json labels {sorted(allowed)}"
    except UserError as e:
        return str(e)
    return None


def check_raw_dataset(raw_folder: str, num_processes: int = 2) -> dict:
    """Validate ``nnUNet_raw/DatasetXXX``: dataset.json, one file per channel per case, readable images and labels,
    matching shapes and spacings, label values declared in dataset.json. Returns the dataset.json."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dj = load_dataset_json(os.path.join(raw_folder, "dataset.json"))
    if "dataset" not in dj and not os.path.isdir(os.path.join(raw_folder, "imagesTr")):
        raise UserError(f"{os.path.join(raw_folder, 'imagesTr')}: folder not found")
    ending = dj["file_ending"]
    if "dataset" not in dj:
        names = sorted(os.listdir(os.path.join(raw_folder, "imagesTr")))
        pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
        stray = [f for f in names if f.endswith(ending) and not pattern.match(f)]
        if stray:
            raise UserError(f"{os.path.join(raw_folder, 'imagesTr', stray[0])}: file name must be CASE_XXXX{ending}")
    try:
        dataset = get_filenames_of_train_images_and_targets(raw_folder, dj)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{raw_folder}: cannot list training cases ({' '.join(str(e).split())})") from None
    if not dataset:
        raise UserError(f"{raw_folder}: no training cases found (imagesTr/*{ending})")
    if "numTraining" in dj and int(dj["numTraining"]) != len(dataset):
        raise UserError(f"{os.path.join(raw_folder, 'dataset.json')}: numTraining is {dj['numTraining']} but "
                        f"{len(dataset)} case(s) were found")
    jobs = [(dj, k, v["images"], v.get("label")) for k, v in dataset.items()]
    if num_processes > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            errors = list(tqdm(pool.imap(_check_case, jobs), total=len(jobs), desc="checking dataset"))
    else:
        errors = [_check_case(j) for j in tqdm(jobs, desc="checking dataset")]
    errors = [e for e in errors if e]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UserError(errors[0] + more)
    return dj


def screen_prediction_inputs(input_folder: str, dataset_json: dict, reader_class=None, part: tuple = (1, 0)
                             ) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """Validate a folder of CASE_XXXX files to predict, case by case.

    Returns ``(good, bad)``: nnU-Net's list of per-case file lists for the cases that are whole, readable, finite
    and complete in channels, and ``(case or file, one-line reason)`` for every other case or stray file. Only a
    problem with the folder itself (missing, no images at all) raises ``UserError``. ``reader_class``: the model's
    reader (plans' ``image_reader_writer``); default: nnU-Net's choice for the dataset.json and the first file.
    ``part = (num_parts, part_id)``: only every num_parts-th case (sorted by name) from ``part_id`` on is checked
    and returned, as nnU-Net splits a prediction into parts; stray files are reported by part 0 only.
    """
    if not os.path.isdir(input_folder):
        raise UserError(f"{input_folder}: input folder not found")
    ending = dataset_json["file_ending"]
    n = len(channel_names(dataset_json))
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    cases: dict[str, dict[int, str]] = {}
    bad: list[tuple[str, str]] = []
    for f in sorted(os.listdir(input_folder)):
        if not f.endswith(ending) or f.startswith("."):
            continue
        m = pattern.match(f)
        if m is None:
            bad.append((f, f"{os.path.join(input_folder, f)}: file name must be CASE_XXXX{ending} "
                           "(XXXX = channel index)"))
            continue
        cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(input_folder, f)
    if not cases and not bad:
        raise UserError(f"{input_folder}: no input images ending with {ending}")
    num_parts, part_id = part
    cases = dict(list(cases.items())[part_id::num_parts])
    bad = bad if part_id == 0 else []
    good = []
    rw = reader_class() if reader_class is not None else None
    for case, channels in tqdm(cases.items(), desc="checking inputs", disable=len(cases) < 10):
        if sorted(channels) != list(range(n)):
            want = ", ".join(f"{case}_{i:04d}{ending}" for i in range(n))
            bad.append((case, f"{os.path.join(input_folder, case)}: has channel(s) {sorted(channels)} but the "
                              f"model expects {n} ({want})"))
            continue
        files = [channels[i] for i in range(n)]
        try:
            rw = rw or _reader(dataset_json, files[0])
            _check_channels(rw, files)
        except UserError as e:
            bad.append((case, str(e)))
            continue
        good.append(files)
    return good, bad


def check_prediction_inputs(input_folder: str, dataset_json: dict, reader_class=None) -> list[list[str]]:
    """Like :func:`screen_prediction_inputs`, but any bad case raises (for callers that need every case)."""
    good, bad = screen_prediction_inputs(input_folder, dataset_json, reader_class)
    if bad:
        more = f" (and {len(bad) - 1} more bad input(s))" if len(bad) > 1 else ""
        raise UserError(bad[0][1] + more)
    return good
