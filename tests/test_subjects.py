"""The development suite's datasets (diffnnunet.datasets.subjects): independent warped subjects of the ICBM152
template with exact labels, a zero background where asked, and nnU-Net's raw layout; and the suite's bookkeeping of
validation figures (benchmarks/quality.py)."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from diffnnunet.datasets.subjects import downsample, make_subjects_dataset, random_subject, template_labels
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def template():
    return downsample(*template_labels(), 6)


def test_template_labels_are_nested_and_small_structures_exist(template):
    t1, label = template
    counts = np.bincount(label.ravel(), minlength=5)
    assert counts.size == 5 and (counts[1:] > 0).all()
    assert counts[3] < counts[1] / 3 and counts[4] < counts[2] / 3  # nuclei and ventricles are the small ones
    # the deep grey nuclei lie inside the brain, away from the outer cortex: their mean distance to the volume's
    # centre is below the cortical grey matter's
    centre = (np.array(label.shape) - 1) / 2

    def mean_radius(c):
        return np.linalg.norm(np.argwhere(label == c) - centre, axis=1).mean()
    assert mean_radius(3) < 0.7 * mean_radius(1) and mean_radius(4) < 0.7 * mean_radius(1)
    assert t1[label == 4].mean() < t1[label == 2].mean()  # ventricles are dark on T1


def test_subjects_differ_and_keep_their_labels_exact(template):
    t1, label = template
    rng = np.random.default_rng(0)
    (a, la), (b, lb) = random_subject(t1, label, rng), random_subject(t1, label, rng)
    assert a.shape == b.shape == t1.shape and a.dtype == np.float32
    assert not np.array_equal(la, lb) and np.mean(la != lb) > 0.01  # another subject, not a copy
    assert set(np.unique(la)) <= set(range(5))  # nearest-neighbour warping: no blended label values
    assert abs(int((la > 0).sum()) - int((label > 0).sum())) < 0.25 * (label > 0).sum()
    zero, lz = random_subject(t1, label, np.random.default_rng(1), zero_background=True)
    assert (zero[lz > 0] > 0).all()  # tissue keeps its intensities
    outside = zero == 0
    assert outside.mean() > 0.3 and not (lz[outside] > 0).any()  # exactly 0 outside the brain, no label there
    noisy, _ = random_subject(t1, label, np.random.default_rng(1))
    assert (noisy > 0).mean() > 0.99  # without the option the background carries Rician noise


@pytest.mark.parametrize("dim,labels", [(2, "four"), (3, "two")])
def test_dataset_layout(tmp_path, dim, labels):
    folder = make_subjects_dataset(str(tmp_path), 984, "Tiny", dim=dim, factor=8, n_train=3, n_test=1,
                                   labels=labels, seed=2)
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["numTraining"] == 3 and len(dj["labels"]) == (5 if labels == "four" else 3)
    assert sorted(os.listdir(os.path.join(folder, "labelsTs"))) == ["subject_003.nii.gz"]
    img = sitk.ReadImage(os.path.join(folder, "imagesTr", "subject_000_0000.nii.gz"))
    seg = sitk.ReadImage(os.path.join(folder, "labelsTr", "subject_000.nii.gz"))
    assert img.GetDimension() == dim and img.GetSpacing() == (8.0,) * dim and img.GetSize() == seg.GetSize()
    values = set(np.unique(sitk.GetArrayFromImage(seg)).tolist())
    assert values <= set(dj["labels"].values()) and max(values) > 0


def test_suite_reads_the_validation_figures(tmp_path):
    """The protocol's figures come from fold 0's validation summary and the tuning's sampling.json."""
    q = load_benchmark("quality")
    folder = tmp_path / "DiffUNetTrainer__DiffnnUNetPlans__2d"
    (folder / "fold_0" / "validation").mkdir(parents=True)
    (folder / "fold_0" / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.8}}))
    (folder / "sampling.json").write_text(json.dumps({
        "sampling_steps": 2, "samples_per_step": 4,
        "calibration": {"ece_after": 0.01, "error_map": {"auroc_after": 0.9, "inputs": "map"}}}))
    got = q.validation_figures(str(tmp_path), "DiffUNetTrainer", "2d")
    assert got == {"val_Dice": 0.8, "val_ECE": 0.01, "val_AUROC": 0.9, "budget_tuned": [2, 4],
                   "error_map_input": "map"}
    assert q.validation_figures(str(tmp_path), "nnUNetTrainer", "2d") == {}  # not trained: nothing
