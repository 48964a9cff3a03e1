"""The embedded default dataset: axial slices of the MNI ICBM152 2009 (sym) T1 template with grey- and white-
matter labels, as shipped inside the nilearn wheel (BSD; template by the McConnell Brain Imaging Centre / ICBM,
Fonov et al. 2009/2011). Training slices and test slices come from spatially separate slabs."""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk

FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def template_folder() -> str:
    try:
        import nilearn
    except ImportError:
        raise RuntimeError("the demo dataset needs nilearn (pip install nilearn), which ships the ICBM152 "
                           "template") from None
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def _load(name: str, factor: int):
    import nibabel as nib
    img = nib.load(os.path.join(template_folder(), FILES[name]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    crop = tuple(slice(0, (n // factor) * factor) for n in data.shape)
    data = data[crop]
    data = data.reshape(data.shape[0] // factor, factor, data.shape[1] // factor, factor,
                        data.shape[2] // factor, factor).mean((1, 3, 5))
    return data, img.affine


def make_icbm152_dataset(raw_root: str, dataset_id: int = 990, factor: int = 3, train_slab=(0.25, 0.55),
                         test_slab=(0.62, 0.72), step: int = 1, seed: int = 0) -> str:
    """Write ``DatasetXXX_ICBM152Slices`` (2D, 1 channel, labels background/grey matter/white matter).

    The volume is averaged down by ``factor`` (1 mm -> ``factor`` mm). Slices whose relative axial position is in
    ``train_slab`` go to imagesTr, those in ``test_slab`` to imagesTs/labelsTs (a gap keeps them apart). Mild
    Rician-like noise (seeded) makes the slices differ from the noise-free template.
    """
    t1, affine = _load("t1", factor)
    gm, _ = _load("gm", factor)
    wm, _ = _load("wm", factor)
    label = np.zeros(t1.shape, np.uint8)
    brain = (gm + wm) > 127.5
    label[brain & (gm >= wm)] = 1
    label[brain & (wm > gm)] = 2
    rng = np.random.default_rng(seed)
    name = f"Dataset{dataset_id:03d}_ICBM152Slices"
    folder = os.path.join(raw_root, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    nz = t1.shape[2]
    spacing = tuple(float(abs(affine[i, i]) * factor) for i in range(2))
    origin = tuple(float(affine[i, 3]) for i in range(2))
    n_train = 0
    for z in range(0, nz, step):
        rel = z / nz
        split = "Tr" if train_slab[0] <= rel < train_slab[1] else "Ts" if test_slab[0] <= rel < test_slab[1] else None
        if split is None or not label[:, :, z].any():
            continue
        n_train += split == "Tr"
        image = t1[:, :, z] + rng.normal(0, 4.0, t1.shape[:2])
        for arr, path in ((image.astype(np.float32), f"images{split}/slice_{z:03d}_0000.nii.gz"),
                          (label[:, :, z], f"labels{split}/slice_{z:03d}.nii.gz")):
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))  # numpy (x, y) -> sitk index (x, y)
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            sitk.WriteImage(img, os.path.join(folder, path), True)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1"}, "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
                   "numTraining": n_train, "file_ending": ".nii.gz", "name": name,
                   "licence": "ICBM152 2009 template, via nilearn (BSD); see diffnnunet/datasets/icbm152.py"}, f,
                  indent=2)
    return folder
