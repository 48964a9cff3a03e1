"""Shared by the end-to-end CLI tests: temporary nnU-Net folders with planned synthetic datasets."""
import importlib.util
import json
import os

import SimpleITK as sitk

from diffnnunet.cli import plan_and_preprocess
from diffnnunet.datasets.synthetic import dataset_name, make_dataset

ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: the configuration each CLI test trains per dimension
CONFIG = {2: "2d", 3: "3d_fullres"}


def dataset_names(ids: dict) -> dict:
    """{dim: dataset id} -> {dim: folder name of the synthetic dataset}."""
    return {dim: dataset_name(i, dim) for dim, i in ids.items()}


def synthetic_cli_env(root, ids: dict, plan_argvs, plans_name: str, dataset_kwargs=None, **diffusion):
    """Generator for a module fixture: points the nnU-Net variables at ``root``, writes one synthetic dataset per
    dimension (``ids`` = {dim: dataset id}), runs ``diffnnunet_plan_and_preprocess`` once per argv of
    ``plan_argvs`` (``dataset_kwargs`` go to ``make_dataset``), updates every diffusion section of ``plans_name``
    with ``diffusion`` (cheap sampling keeps the CPU tests fast), yields the paths and restores the environment."""
    paths = {k: str(root / k) for k in ENV_KEYS}
    old = {k: os.environ.get(k) for k in paths}
    os.environ.update(paths)
    try:
        names = {d: os.path.basename(make_dataset(paths["nnUNet_raw"], i, dim=d, seed=d,
                                                              **(dataset_kwargs or {}))) for d, i in ids.items()}
        for argv in plan_argvs:
            plan_and_preprocess.main(list(argv))
        for name in names.values():
            plans_file = os.path.join(paths["nnUNet_preprocessed"], name, plans_name + ".json")
            with open(plans_file) as f:
                plans = json.load(f)
            for cfg in plans["configurations"].values():
                if "diffusion" in cfg:
                    cfg["diffusion"].update(diffusion)
            with open(plans_file, "w") as f:
                json.dump(plans, f)
        yield paths
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
