"""Tiny synthetic datasets in nnU-Net's raw format, for tests and smoke runs (no download needed).

Each case holds two blobs (label 1: a sphere/disc, label 2: a box) at random positions; the image channels are
noisy functions of the labels with different contrasts. Geometry is deliberately awkward: anisotropic spacing,
a rotated direction matrix and a non-zero origin. With ``zero_background`` every channel is exactly 0 outside an
elliptic "body" (as in skull-stripped MRI), so nnU-Net crops to the body and writes -1 into the preprocessed
segmentation outside it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk


def _rotation(dim: int, angle: float = 0.3) -> tuple:
    c, s = np.cos(angle), np.sin(angle)
    if dim == 2:
        return (c, -s, s, c)
    return tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel())


def body_mask(shape) -> np.ndarray:
    """An ellipse in the last two axes, extruded along the first axis in 3D, that leaves the corners of the
    in-plane field of view empty: ``(*shape)`` bool."""
    yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in shape[-2:]], indexing="ij")
    inside = (yy / 0.47) ** 2 + (xx / 0.47) ** 2 <= 1
    return np.broadcast_to(inside, shape).copy()


def make_case(shape, rng: np.random.Generator, num_channels: int = 2, zero_background: bool = False):
    """Return ``(images list of arrays, label array)`` with ``shape`` in numpy (z, y, x) / (y, x) order; with
    ``zero_background`` images and labels are 0 outside :func:`body_mask`."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    radius = max(2.0, min(shape[-2:]) * 0.18)
    center = np.array([rng.uniform(0.3, 0.7) * n for n in shape])
    scale = np.array([max(1.0, shape[-1] / n) if i < len(shape) - 2 else 1.0 for i, n in enumerate(shape)])
    dist = np.sqrt((((grid - center.reshape(-1, *[1] * len(shape))) / scale.reshape(-1, *[1] * len(shape)))
                    ** 2).sum(0))
    label[dist < radius] = 1
    lo = [int(rng.uniform(0.1, 0.25) * n) for n in shape]
    hi = [max(lo_i + 2, int(rng.uniform(0.3, 0.45) * n)) for lo_i, n in zip(lo, shape)]
    label[tuple(slice(a, b) for a, b in zip(lo, hi))] = 2
    images = []
    for c in range(num_channels):
        contrast = np.array([0.0, 1.0, 2.0]) if c == 0 else np.array([0.5, -0.5, 1.5])
        img = contrast[label] * 100 + rng.normal(0, 15, shape) + 50 * c
        images.append(img.astype(np.float32))
    if zero_background:
        body = body_mask(shape)
        label[~body] = 0
        images = [np.where(body, img, np.float32(0)) for img in images]
    return images, label


def _write(array, path, spacing, origin, direction):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(direction)
    sitk.WriteImage(image, path, True)


def dataset_name(dataset_id: int, dim: int) -> str:
    """The folder name ``make_dataset`` gives a synthetic dataset: ``DatasetXXX_Synthetic{dim}D``."""
    return f"Dataset{dataset_id:03d}_Synthetic{dim}D"


def make_dataset(raw_root: str, dataset_id: int, dim: int = 3, num_train: int = 6, num_test: int = 2,
                 num_channels: int = 2, shape=None, spacing=None, seed: int = 0, name: str | None = None,
                 zero_background: bool = False) -> str:
    """Write ``DatasetXXX_Synthetic{dim}D`` under ``raw_root``; returns its folder. ``imagesTs``/``labelsTs`` hold
    the held-out cases. ``spacing`` is given in SimpleITK (x, y[, z]) order; ``zero_background``: see the module."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape or ((10, 32, 28) if dim == 3 else (40, 36)))
    spacing = tuple(spacing or ((0.8, 0.7, 2.5) if dim == 3 else (0.7, 1.1)))
    origin = (12.5, -3.0, 7.0)[:dim]
    direction = _rotation(dim)
    name = name or dataset_name(dataset_id, dim)
    folder = os.path.join(raw_root, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(num_train + num_test):
        split = "Tr" if i < num_train else "Ts"
        case = f"case_{i:03d}"
        images, label = make_case(shape, rng, num_channels, zero_background)
        for c, img in enumerate(images):
            _write(img, os.path.join(folder, f"images{split}", f"{case}_{c:04d}.nii.gz"), spacing, origin, direction)
        _write(label, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), spacing, origin, direction)
    dataset_json = {
        "channel_names": {str(c): ("CT" if c == 0 else "MR") for c in range(num_channels)},
        "labels": {"background": 0, "sphere": 1, "box": 2},
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "name": name,
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder
