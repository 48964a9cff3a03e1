"""Bad raw datasets are refused before any work with one line naming the file and the problem."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from diffnnunet.cli import plan_and_preprocess
from diffnnunet.cli.checks import check_raw_dataset
from diffnnunet.cli.common import UserError
from diffnnunet.datasets.synthetic import make_dataset


@pytest.fixture
def raw(tmp_path):
    return make_dataset(str(tmp_path), 820, dim=2, num_train=3, num_test=0, shape=(12, 10))


def _rewrite(path, fn):
    img = sitk.ReadImage(path)
    new = fn(img)
    sitk.WriteImage(new, path)


def test_good_dataset_passes(raw):
    assert check_raw_dataset(raw, 1)["numTraining"] == 3


def test_missing_channel(raw):
    os.remove(os.path.join(raw, "imagesTr", "case_001_0001.nii.gz"))
    with pytest.raises(UserError, match="case_001.*channel"):
        check_raw_dataset(raw, 1)


def test_corrupt_image(raw):
    open(os.path.join(raw, "imagesTr", "case_002_0000.nii.gz"), "wb").write(b"garbage")
    with pytest.raises(UserError, match="case_002_0000.nii.gz: cannot read"):
        check_raw_dataset(raw, 1)


def test_shape_mismatch(raw):
    label = os.path.join(raw, "labelsTr", "case_000.nii.gz")
    _rewrite(label, lambda img: sitk.Image([5, 5], img.GetPixelID()))
    with pytest.raises(UserError, match="case_000.nii.gz: label shape"):
        check_raw_dataset(raw, 1)


def test_spacing_mismatch(raw):
    label = os.path.join(raw, "labelsTr", "case_000.nii.gz")

    def respace(img):
        img.SetSpacing((3.0, 3.0))
        return img
    _rewrite(label, respace)
    with pytest.raises(UserError, match="case_000.nii.gz: label spacing"):
        check_raw_dataset(raw, 1)


def test_label_value_not_declared(raw):
    label = os.path.join(raw, "labelsTr", "case_001.nii.gz")

    def add_label(img):
        arr = sitk.GetArrayFromImage(img)
        arr[0, 0] = 7
        out = sitk.GetImageFromArray(arr.astype(np.uint8))
        out.CopyInformation(img)
        return out
    _rewrite(label, add_label)
    with pytest.raises(UserError, match=r"case_001.nii.gz: label value\(s\) \[7\]"):
        check_raw_dataset(raw, 1)


def test_bad_dataset_json(raw):
    dj = json.load(open(os.path.join(raw, "dataset.json")))
    del dj["labels"]
    json.dump(dj, open(os.path.join(raw, "dataset.json"), "w"))
    with pytest.raises(UserError, match="dataset.json: missing key"):
        check_raw_dataset(raw, 1)


def test_cli_refuses_bad_dataset_without_writing_plans(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", os.path.dirname(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    os.remove(os.path.join(raw, "labelsTr", "case_002.nii.gz"))
    with pytest.raises(SystemExit) as e:
        plan_and_preprocess.main(["-d", "820", "-np", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars may precede it on stderr
    assert last.startswith("diffnnunet_plan_and_preprocess: error:") and "case_002" in last
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "pre" / os.path.basename(raw) / "DiffnnUNetPlans.json")


def test_channels_of_one_case_disagree(raw):
    path = os.path.join(raw, "imagesTr", "case_000_0001.nii.gz")
    _rewrite(path, lambda img: sitk.Image([7, 7], img.GetPixelID()))
    with pytest.raises(UserError, match="case_000_0001.nii.gz: shape/spacing"):
        check_raw_dataset(raw, 1)
