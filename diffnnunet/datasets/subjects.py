"""Independent synthetic subjects from the ICBM152 template that ships inside nilearn (no download): the development
benchmark suite's data (``benchmarks/quality.py --suite``).

Each subject is the template under its own random affine (rotation, anisotropic scaling, translation) and smooth
elastic deformation, with a multiplicative bias field, a gamma contrast change, a scanner gain and Rician noise, so
training, validation and test cases are different subjects rather than neighbouring slices of one volume. Labels are
warped with the image (nearest neighbour), so they stay exact for every subject.

Template labels (:func:`template_labels`, computed at 1 mm, then block-averaged one-hot and argmaxed):
1 cortical grey matter, 2 white matter, 3 deep grey nuclei (grey matter more than :data:`DEEP_MM` mm inside the
brain: thalamus, caudate, putamen, pallidum), 4 ventricles (dark CSF more than :data:`VENTRICLE_MM` mm inside the
brain). The two-label datasets merge 3 into 1 and 4 into 0.

Datasets (:data:`SUITE_DATASETS`): ``brain3d`` (3D, 6 mm, GM/WM, one volume per subject), ``skullstripped2d``
(2D axial slices, 3 mm, GM/WM, exactly 0 outside the brain mask, as after skull stripping, so nnU-Net crops and
writes -1 into the preprocessed segmentations), ``nuclei2d`` (2D slices through the deep grey nuclei, 3 mm, four
labels of which two are small). Every 2D case is one slice of its own subject.
"""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk

from diffnnunet.datasets.icbm152 import FILES, template_folder

DEEP_MM = 22.0
VENTRICLE_MM = 12.0
LABELS_4 = {"background": 0, "cortical_grey_matter": 1, "white_matter": 2, "deep_grey_nuclei": 3, "ventricles": 4}
LABELS_2 = {"background": 0, "grey_matter": 1, "white_matter": 2}


def template_labels() -> tuple[np.ndarray, np.ndarray]:
    """The template's T1 and its five-class label map (module docstring), both ``(197, 233, 189)`` at 1 mm."""
    import nibabel as nib
    from scipy import ndimage
    load = {k: np.asarray(nib.load(os.path.join(template_folder(), f)).dataobj, np.float32) for k, f in FILES.items()}
    t1, gm, wm = load["t1"], load["gm"], load["wm"]
    tissue = (gm + wm) > 127.5
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=3))
    depth = ndimage.distance_transform_edt(brain)
    label = np.zeros(t1.shape, np.uint8)
    label[tissue & (gm >= wm)] = 1
    label[tissue & (wm > gm)] = 2
    label[(label == 1) & (depth > DEEP_MM)] = 3
    csf = brain & ~tissue & (t1 < np.percentile(t1[tissue], 5)) & (depth > VENTRICLE_MM)
    label[csf] = 4
    return t1, label


def downsample(t1: np.ndarray, label: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means of the T1 and the block-wise most frequent label (argmax of the block-averaged one-hot)."""
    crop = tuple(slice(0, (n // factor) * factor) for n in t1.shape)
    t1, label = t1[crop], label[crop]
    shape = [n // factor for n in t1.shape]

    def blocks(a):
        return a.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean((1, 3, 5))
    fractions = np.stack([blocks((label == c).astype(np.float32)) for c in range(int(label.max()) + 1)])
    return blocks(t1), fractions.argmax(0).astype(np.uint8)


def random_subject(t1: np.ndarray, label: np.ndarray, rng: np.random.Generator, max_angle: float = 10.0,
                   elastic_voxels: float = 1.5, zero_background: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One subject ``(image, label)`` of the same shape as the template: affine + elastic warp, bias field, gamma
    contrast, gain and Rician noise (module docstring); with ``zero_background`` the image is exactly 0 outside the
    warped brain mask (filled, dilated by one voxel)."""
    from scipy import ndimage
    shape = np.array(t1.shape, float)
    center = (shape - 1) / 2
    angles = np.deg2rad(rng.uniform(-max_angle, max_angle, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(1 / rng.uniform(0.9, 1.1, 3))  # output -> template coordinates
    shift = rng.uniform(-0.04, 0.04, 3) * shape
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in t1.shape], indexing="ij"))
    coords = np.einsum("ij,j...->i...", matrix, grid - center.reshape(3, 1, 1, 1)) + (center + shift).reshape(
        3, 1, 1, 1)
    for axis in range(3):
        field = ndimage.gaussian_filter(rng.normal(size=t1.shape), sigma=max(2.0, t1.shape[axis] / 12))
        coords[axis] += elastic_voxels * field / max(np.abs(field).max(), 1e-6)
    image = ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
    out_label = ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0).astype(np.uint8)
    norm = [(g - c) / (n / 2) for g, c, n in zip(grid, center, shape)]
    terms = [norm[0], norm[1], norm[2], norm[0] * norm[1], norm[1] * norm[2], norm[0] ** 2, norm[2] ** 2]
    bias = np.exp(sum(rng.normal(0, 0.12) * t for t in terms))
    image = np.clip(image / max(float(t1.max()), 1e-6), 0, None) ** rng.uniform(0.75, 1.35) * bias
    sigma = rng.uniform(0.01, 0.035)
    image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    image = (image * rng.uniform(600, 1600)).astype(np.float32)
    if zero_background:
        mask = ndimage.binary_dilation(ndimage.binary_fill_holes(out_label > 0), iterations=1)
        image[~mask] = 0
    return image, out_label


def _write(array: np.ndarray, path: str, spacing) -> None:
    """numpy ``(x, y[, z])`` -> a NIfTI with SimpleITK index (x, y[, z]) and the given spacing (mm)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, path, True)


def make_subjects_dataset(raw_root: str, dataset_id: int, name: str, dim: int, factor: int, n_train: int,
                          n_test: int, labels: str = "two", zero_background: bool = False, slab=(0.35, 0.65),
                          seed: int = 0) -> str:
    """Write ``DatasetXXX_<name>`` (imagesTr/labelsTr, imagesTs/labelsTs, dataset.json) of independent subjects:
    3D volumes (``dim`` 3) or one axial slice per subject at a random relative height inside ``slab`` (``dim`` 2),
    at ``factor`` mm; ``labels`` ``"two"`` (GM/WM) or ``"four"`` (module docstring)."""
    t1, label = downsample(*template_labels(), factor)
    if labels == "two":
        label = np.where(label == 3, 1, np.where(label == 4, 0, label)).astype(np.uint8)
    label_names = LABELS_2 if labels == "two" else LABELS_4
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        image, lab = random_subject(t1, label, rng, zero_background=zero_background)
        if dim == 2:
            z = int(round(rng.uniform(*slab) * (image.shape[2] - 1)))
            image, lab = image[:, :, z], lab[:, :, z]
        case = f"subject_{i:03d}"
        _write(image, os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"), [factor] * dim)
        _write(lab, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), [factor] * dim)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1"}, "labels": label_names, "numTraining": n_train,
                   "file_ending": ".nii.gz", "name": name,
                   "licence": "ICBM152 2009 template, via nilearn (BSD); see diffnnunet/datasets/subjects.py"}, f,
                  indent=2)
    return folder


#: the suite's datasets beside the demo's: id, name and the arguments of :func:`make_subjects_dataset`
SUITE_DATASETS = {
    "brain3d": dict(dataset_id=981, name="ICBMSubjects3D", dim=3, factor=6, n_train=12, n_test=4),
    "skullstripped2d": dict(dataset_id=982, name="ICBMSkullStripped2D", dim=2, factor=3, n_train=24, n_test=8,
                            zero_background=True),
    "nuclei2d": dict(dataset_id=983, name="ICBMNuclei2D", dim=2, factor=3, n_train=24, n_test=8, labels="four",
                     slab=(0.36, 0.52)),
}
