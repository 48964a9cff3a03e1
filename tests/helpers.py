"""Shared by the end-to-end CLI tests: temporary nnU-Net folders with planned synthetic datasets."""
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager

import pytest
import SimpleITK as sitk

from diffnnunet.cli import plan_and_preprocess
from diffnnunet.datasets.synthetic import dataset_name, make_dataset

ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: the configuration each CLI test trains per dimension
CONFIG = {2: "2d", 3: "3d_fullres"}


def dataset_names(ids: dict) -> dict:
    """{dim: dataset id} -> {dim: folder name of the synthetic dataset}."""
    return {dim: dataset_name(i, dim) for dim, i in ids.items()}


#: the synthetic datasets the CLI test modules share: written and planned once per session (conftest's ``planned``
#: fixture), each module working on its own copy (:func:`module_cli_env`)
STANDARD_IDS = {2: 900, 3: 901}
#: the same with an exactly-zero background outside an elliptic body (nnU-Net writes -1 there)
ZERO_BACKGROUND_IDS = {2: 902, 3: 903}
ALL_METHODS = ("diff_unet", "berdiff", "ldseg", "medsegdiff_v2", "cdal")


@contextmanager
def nnunet_env(paths: dict):
    """The nnU-Net variables set to ``paths`` for the block, restored afterwards."""
    old = {k: os.environ.get(k) for k in paths}
    os.environ.update(paths)
    try:
        yield paths
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_session_datasets(root) -> dict:
    """Write the shared synthetic datasets under ``root`` and plan + preprocess them once (2D ones as ``2d``, 3D
    ones as ``3d_fullres``): the standard pair for every method, the zero-background pair for Diff-UNet, both with
    nnU-Net's own plans; returns the raw / preprocessed folders. The fingerprint samples 10^5 foreground voxels
    per dataset instead of nnU-Net's 10^8 (30 s per tiny dataset; the statistics of these z-scored images do not
    change)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    from diffnnunet.utils import swapped
    stock_init = DatasetFingerprintExtractor.__init__

    def quick_init(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = 1e5

    paths = {k: str(root / k) for k in ENV_KEYS[:2]}
    with nnunet_env(paths), swapped(DatasetFingerprintExtractor, "__init__", quick_init):
        for ids, kwargs, methods in ((STANDARD_IDS, {}, ALL_METHODS),
                                     (ZERO_BACKGROUND_IDS, {"zero_background": True}, ("diff_unet",))):
            for d, i in ids.items():
                make_dataset(paths["nnUNet_raw"], i, dim=d, seed=d, **kwargs)
                plan_and_preprocess.main(["-d", str(i), "-c", CONFIG[d], "-np", "2", "-methods", *methods])
    return paths


def module_cli_env(planned: dict, root, plans_name: str | None = None, ids: dict = STANDARD_IDS, **diffusion):
    """Generator for a module fixture: a private copy under ``root`` of the session's planned datasets
    (:func:`plan_session_datasets`), an empty nnUNet_results, the nnU-Net variables pointing there; ``diffusion``
    updates every diffusion section of ``plans_name`` for the datasets ``ids`` (cheap sampling keeps the CPU tests
    fast). Yields the paths and restores the environment: no module sees another's models or plan edits."""
    paths = {k: str(root / k) for k in ENV_KEYS}
    for key in ENV_KEYS[:2]:
        shutil.copytree(planned[key], paths[key])
    os.makedirs(paths["nnUNet_results"])
    if plans_name is not None and diffusion:
        for name in dataset_names(ids).values():
            update_plans(os.path.join(paths["nnUNet_preprocessed"], name, plans_name + ".json"), diffusion)
    with nnunet_env(paths):
        yield paths


def update_plans(plans_file: str, diffusion: dict) -> None:
    """``diffusion`` written into every configuration's diffusion section of ``plans_file``."""
    with open(plans_file) as f:
        plans = json.load(f)
    for cfg in plans["configurations"].values():
        if "diffusion" in cfg:
            cfg["diffusion"].update(diffusion)
    with open(plans_file, "w") as f:
        json.dump(plans, f)


def fail_one_line(main, argv, capsys) -> str:
    """Run a CLI ``main(argv)`` that must fail: non-zero exit, no traceback, and the last stderr line (progress bars
    may precede it) is its one ``PROG: error: ...`` line, which is returned."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert ": error: " in last, err
    return last


def image_geometry(path):
    """(size, spacing, origin, direction) of an image file."""
    img = sitk.ReadImage(path)
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location("bench_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
