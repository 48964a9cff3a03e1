"""Model sharing end to end on a tiny 2D synthetic dataset: export a tuned model to a zip, install it into another
nnUNet_results, predict it with ``diffnnunet_predict -m`` (no nnU-Net variables set) and get the original's
segmentations and uncertainty maps; the one-line errors of the three commands."""
import json
import os
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from diffnnunet.cli import model_sharing, predict, train
from tests.helpers import ENV_KEYS, STANDARD_IDS, dataset_names, module_cli_env
from tests.helpers import fail_one_line as _fail

IDS = {2: STANDARD_IDS[2]}
NAMES = dataset_names(IDS)
TRAINER = "DiffUNetTrainer"
MODEL = f"{TRAINER}__DiffnnUNetPlans__2d"


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet"), "DiffnnUNetPlans", ids=IDS,
                              sampling_steps=2, samples_per_step=2)


@pytest.fixture(scope="module")
def trained(env):
    """DiffUNetTrainer fold 0, 1 epoch x 2 iterations, with the default tuning on one validation case (so the model
    folder has a sampling.json: the tuned budget, the temperature and the error map)."""
    train.main([str(IDS[2]), TRAINER, "0", "-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--tune-max-cases", "1"])
    return env




def _arrays(folder):
    """{file name: voxel array} of every image in a prediction folder."""
    return {f: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f)))
            for f in sorted(os.listdir(folder)) if f.endswith(".nii.gz")}


def test_export_install_predict_from_model_folder(trained, tmp_path, monkeypatch, capsys):
    """The zip holds what the predictor reads; the installed copy, predicted with -m and no nnU-Net variables set,
    gives the original's segmentations and (calibrated) uncertainty maps voxel for voxel; without its
    sampling.json it would not."""
    original = os.path.join(trained["nnUNet_results"], NAMES[2], MODEL)
    zip_file = str(tmp_path / "share" / "model.zip")
    model_sharing.export_main(["-d", str(IDS[2]), "-o", zip_file])  # the default trainer, configuration, folds
    assert os.listdir(tmp_path / "share") == ["model.zip"]  # no temporary file left
    with zipfile.ZipFile(zip_file) as zf:
        names = set(zf.namelist())
    for f in ("sampling.json", "plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        assert f"{NAMES[2]}/{MODEL}/{f}" in names, f

    other = str(tmp_path / "other_results")
    monkeypatch.setenv("nnUNet_results", other)
    model_sharing.install_main([zip_file])
    installed = os.path.join(other, NAMES[2], MODEL)
    assert f"installed {installed}" in capsys.readouterr().out
    with open(os.path.join(original, "sampling.json")) as a, open(os.path.join(installed, "sampling.json")) as b:
        assert json.load(a) == json.load(b)

    images = os.path.join(trained["nnUNet_raw"], NAMES[2], "imagesTs")
    common = ["-i", images, "-device", "cpu", "--seed", "7", "--save_uncertainty", "-npp", "0"]
    monkeypatch.setenv("nnUNet_results", trained["nnUNet_results"])
    predict.main([*common, "-o", str(tmp_path / "a"), "-d", str(IDS[2]), "-tr", TRAINER])
    for key in ENV_KEYS:
        monkeypatch.delenv(key)
    capsys.readouterr()
    predict.main([*common, "-o", str(tmp_path / "b"), "-m", installed])
    assert "(tuned, sampling.json)" in capsys.readouterr().out
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 4  # 2 cases: segmentation and uncertainty map each
    for f in a:
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    # what the identity rests on: the same checkpoint and seed without sampling.json give other maps
    os.remove(os.path.join(installed, "sampling.json"))
    predict.main([*common, "-o", str(tmp_path / "c"), "-m", installed])
    c = _arrays(tmp_path / "c")
    assert any(not np.array_equal(b[f], c[f]) for f in b if "_uncertainty" in f)


def test_export_errors_leave_no_zip(trained, tmp_path, capsys):
    out = str(tmp_path / "m.zip")
    err = _fail(model_sharing.export_main, ["-d", str(IDS[2]), "-o", out, "-f", "3"], capsys)
    assert "fold_3" in err and "checkpoint_final.pth: missing" in err
    err = _fail(model_sharing.export_main, ["-d", str(IDS[2]), "-o", out, "-c", "3d_fullres"], capsys)
    assert "configuration 3d_fullres" in err and "--not_strict" in err
    err = _fail(model_sharing.export_main, ["-d", str(IDS[2]), "-o", out, "-tr", "NoSuchTrainer"], capsys)
    assert "unknown trainer 'NoSuchTrainer'" in err
    assert os.listdir(tmp_path) == []
    model_sharing.export_main(["-d", str(IDS[2]), "-o", out, "-c", "3d_fullres", "2d", "--not_strict"])
    with zipfile.ZipFile(out) as zf:
        assert {n.split("/")[1] for n in zf.namelist() if n.count("/") > 1} == {MODEL}


def test_install_refuses_what_is_not_a_model(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    assert _fail(model_sharing.install_main, [str(text)], capsys).endswith(f"{text}: not a zip file")
    stray = str(tmp_path / "stray.zip")
    with zipfile.ZipFile(stray, "w") as zf:
        zf.writestr("README.txt", "hello")
    assert "'README.txt' is not inside a DatasetXXX_NAME/" in _fail(model_sharing.install_main, [stray], capsys)
    plans_only = str(tmp_path / "plans_only.zip")
    with zipfile.ZipFile(plans_only, "w") as zf:
        zf.writestr(f"{NAMES[2]}/DiffUNetTrainer__DiffnnUNetPlans__2d/plans.json", "{}")
        zf.writestr(f"{NAMES[2]}/DiffUNetTrainer__DiffnnUNetPlans__2d/dataset.json", "{}")
    assert f"{plans_only}: not a model zip" in _fail(model_sharing.install_main, [plans_only], capsys)
    assert not results.exists()  # nothing installed


def test_predict_model_folder_errors(tmp_path, monkeypatch, capsys):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    base = ["-i", str(tmp_path), "-o", str(tmp_path / "out")]
    missing = str(tmp_path / "nope")
    assert _fail(predict.main, [*base, "-m", missing], capsys).endswith(f"{missing}: model folder not found")
    assert "cannot be combined with -d, -tr" in _fail(predict.main, [*base, "-m", missing, "-d", "1", "-tr", "x"],
                                                      capsys)
    assert "-m MODEL_FOLDER" in _fail(predict.main, base, capsys)
    empty = tmp_path / "A__B__2d"
    empty.mkdir()
    assert f"{empty}/plans.json: missing" in _fail(predict.main, [*base, "-m", str(empty)], capsys)
