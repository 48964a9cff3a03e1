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


def _truncate(path, drop=0.4):
    """Cut the last ``drop`` (fraction, or a byte count when >= 1) of the file, as an interrupted copy does."""
    data = open(path, "rb").read()
    cut = int(drop) if drop >= 1 else int(len(data) * drop)
    open(path, "wb").write(data[:len(data) - cut])


def _write_voxel(path, indices, value, dtype=np.float32):
    """Set the voxels at ``indices`` (one index tuple or a list) to ``value``; one read and one write, because
    SimpleITK reads a stored NaN back as 0."""
    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img).astype(dtype)
    for index in indices if isinstance(indices, list) else [indices]:
        arr[index] = value
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, path)


@pytest.mark.parametrize("folder,name", [("imagesTr", "case_001_0000.nii.gz"), ("imagesTr", "case_000_0001.nii.gz"),
                                         ("labelsTr", "case_002.nii.gz")])
def test_truncated_gzip_nifti_is_refused(raw, folder, name):
    path = os.path.join(raw, folder, name)
    _truncate(path, 12)  # the gzip trailer and the last compressed bytes
    assert sitk.ReadImage(path) is not None  # the trap: SimpleITK reads it and pads with zeros
    with pytest.raises(UserError, match=f"{name}: truncated file"):
        check_raw_dataset(raw, 1)


def test_truncated_uncompressed_nifti_is_refused(tmp_path):
    from diffnnunet.cli.integrity import check_file_whole
    path = str(tmp_path / "img.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 5, 4), np.float32)), path)
    check_file_whole(path)  # whole: passes
    _truncate(path, 0.2)
    with pytest.raises(UserError, match=r"img.nii: truncated file \(\d+ bytes of data, the NIfTI header promises "):
        check_file_whole(path)


def test_corrupt_gzip_stream_is_refused(tmp_path):
    from diffnnunet.cli.integrity import check_file_whole
    path = str(tmp_path / "img.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(400, dtype=np.float32).reshape(20, 20)), path)
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF  # damage the CRC/length trailer: every byte is there but the stream is not the one written
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match="img.nii.gz: corrupt compressed data"):
        check_file_whole(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_image_names_file_and_count(raw, value):
    path = os.path.join(raw, "imagesTr", "case_001_0001.nii.gz")
    _write_voxel(path, [(0, 0), (3, 4)], value)
    with pytest.raises(UserError, match=r"case_001_0001.nii.gz: 2 non-finite voxel value\(s\)"):
        check_raw_dataset(raw, 1)


def test_nonfinite_or_fractional_label_is_refused(raw):
    path = os.path.join(raw, "labelsTr", "case_000.nii.gz")
    _write_voxel(path, (1, 1), np.nan)
    with pytest.raises(UserError, match=r"case_000.nii.gz: 1 non-finite voxel value\(s\) \(NaN/Inf\) in the label"):
        check_raw_dataset(raw, 1)
    _write_voxel(path, (1, 1), 1.5)
    with pytest.raises(UserError, match=r"case_000.nii.gz: 1 label voxel\(s\) are not whole numbers"):
        check_raw_dataset(raw, 1)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "plain"])
def test_planning_refuses_nan_with_and_without_verify(raw, tmp_path, monkeypatch, capsys, verify):
    monkeypatch.setenv("nnUNet_raw", os.path.dirname(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    _write_voxel(os.path.join(raw, "imagesTr", "case_002_0000.nii.gz"), (2, 2), np.nan)
    with pytest.raises(SystemExit) as e:
        plan_and_preprocess.main(["-d", "820", "-np", "1"] + (["--verify_dataset_integrity"] if verify else []))
    assert e.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "case_002_0000.nii.gz: 1 non-finite voxel" in last
    assert not os.path.exists(tmp_path / "pre" / os.path.basename(raw))


def _convert(raw, ending, reader=None):
    """Rewrite the dataset in another file format (and optionally force nnU-Net's reader in dataset.json)."""
    for folder in ("imagesTr", "labelsTr"):
        for f in os.listdir(os.path.join(raw, folder)):
            src = os.path.join(raw, folder, f)
            sitk.WriteImage(sitk.ReadImage(src), src[:-len(".nii.gz")] + ending)
            if ending != ".nii.gz":
                os.remove(src)
    dj = json.load(open(os.path.join(raw, "dataset.json")))
    dj["file_ending"] = ending
    if reader:
        dj["overwrite_image_reader_writer"] = reader
    json.dump(dj, open(os.path.join(raw, "dataset.json"), "w"))


READERS = [(".nii.gz", "SimpleITKIO"), (".nii.gz", "NibabelIO"), (".nii.gz", "NibabelIOWithReorient"),
           (".nii", None), (".mha", None), (".nrrd", None)]


@pytest.mark.parametrize("ending,reader", READERS, ids=[f"{e}-{r}" for e, r in READERS])
def test_every_reader_refuses_truncated_and_nonfinite_images(tmp_path, ending, reader):
    raw = make_dataset(str(tmp_path), 821, dim=3, num_train=2, num_test=0, shape=(4, 12, 10))
    _convert(raw, ending, reader)
    assert check_raw_dataset(raw, 1)["file_ending"] == ending
    image = os.path.join(raw, "imagesTr", "case_000_0001" + ending)
    whole = open(image, "rb").read()
    _write_voxel(image, [(1, 2, 3), (2, 2, 2), (3, 0, 0)], np.nan)
    with pytest.raises(UserError, match=f"case_000_0001{ending}: 3 non-finite voxel value"):
        check_raw_dataset(raw, 1)
    open(image, "wb").write(whole)
    _truncate(image, 0.3)
    with pytest.raises(UserError, match=f"case_000_0001{ending}: (truncated file|cannot read image)"):
        check_raw_dataset(raw, 1)
