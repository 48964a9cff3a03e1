"""diffnnunet_find_best_configuration, diffnnunet_ensemble and diffnnunet_apply_postprocessing end to end on a tiny
2D dataset: nnUNetTrainer and DiffUNetTrainer, two folds each (one epoch of two iterations, --npz), on CPU."""
import contextlib
import io
import json
import math
import os
import shlex

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffnnunet.cli import apply_postprocessing, ensemble, find_best, predict, train
from diffnnunet.inference.calibration import apply_error_map
from diffnnunet.inference.ensembling import ERROR_MAP_FILE, load_error_map, pooled_uncertainty
from tests.helpers import STANDARD_IDS, dataset_names, fail_one_line, image_geometry, module_cli_env

IDS = {2: STANDARD_IDS[2]}
NAME = dataset_names(IDS)[2]
DATASET = str(IDS[2])
MODELS = {"nnUNetTrainer": "nnUNetTrainer__nnUNetPlans__2d", "DiffUNetTrainer": "DiffUNetTrainer__DiffnnUNetPlans__2d"}
COMMANDS = {"diffnnunet_predict": predict.main, "diffnnunet_ensemble": ensemble.main,
            "diffnnunet_apply_postprocessing": apply_postprocessing.main}


@pytest.fixture(scope="module")
def env(planned, tmp_path_factory):
    yield from module_cli_env(planned, tmp_path_factory.mktemp("nnunet"), "DiffnnUNetPlans", ids=IDS,
                              sampling_steps=2, samples_per_step=2)


@pytest.fixture(scope="module")
def trained(env):
    """Both trainers, folds 0 and 1, validation with .npz; nnU-Net's calibration on fold 0 only (a sampling.json),
    the diffusion model untuned (none: its budget is the plans')."""
    for trainer in MODELS:
        for fold in ("0", "1"):
            tune = ["--tune-max-cases", "1"] if trainer == "nnUNetTrainer" and fold == "0" else ["--no-tune"]
            train.main([DATASET, trainer, fold, "-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2",
                        "--val-iterations", "1", "--npz", *tune])
    return env


@pytest.fixture(scope="module")
def report(trained):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        find_best.main(["-d", DATASET, "-f", "0", "1", "-np", "1", "-device", "cpu", "--timing_cases", "1"])
    folder = os.path.join(trained["nnUNet_results"], NAME)
    with open(os.path.join(folder, "find_best_report.json")) as f:
        result = json.load(f)
    return {"env": trained, "folder": folder, "result": result, "printed": out.getvalue(),
            "rows": {r["name"]: r for r in result["rows"]}}


def _fail(argv, capsys, main=find_best.main):
    return fail_one_line(main, argv, capsys)


def _entropy(p):
    """Normalised categorical entropy of one voxel's probabilities, by hand."""
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def test_pooled_uncertainty_by_hand():
    # voxel 0: the members disagree, (0.8, 0.2) against (0.2, 0.8); voxel 1: they agree on (0.9, 0.1)
    p1 = np.array([[0.8, 0.9], [0.2, 0.1]])
    p2 = np.array([[0.2, 0.9], [0.8, 0.1]])
    u1, u2 = np.array([0.1, 0.05]), np.array([0.3, 0.15])
    jsd = _entropy([0.5, 0.5]) - (_entropy([0.8, 0.2]) + _entropy([0.2, 0.8])) / 2  # 1 - 0.7219 = 0.2781
    got = pooled_uncertainty([p1, p2], [u1, u2], has_regions=False)
    assert got.dtype == np.float32 and got.shape == (2,)
    np.testing.assert_allclose(got, [0.2 + jsd, 0.1], atol=1e-6)
    assert abs(jsd - 0.2781) < 1e-4
    # without member maps: each member's entropy, so the pooled map is the entropy of the mean
    np.testing.assert_allclose(pooled_uncertainty([p1, p2], None, False), [1.0, _entropy([0.9, 0.1])], atol=1e-6)
    # error maps near 1 plus disagreement stay in [0, 1]
    np.testing.assert_allclose(pooled_uncertainty([p1, p2], [u1 + 0.85, u2 + 0.85], False), [1.0, 0.95], atol=1e-6)
    # regions: the binary entropy per region
    r1, r2 = np.array([[0.8]]), np.array([[0.2]])
    np.testing.assert_allclose(pooled_uncertainty([r1, r2], None, True), [1.0], atol=1e-6)
    np.testing.assert_allclose(pooled_uncertainty([r1, r2], [np.zeros(1), np.zeros(1)], True), [jsd], atol=1e-6)


def test_accumulated_dice_is_the_folds_by_hand(report):
    for identifier in MODELS.values():
        per_label = {}
        for fold in (0, 1):
            path = os.path.join(report["folder"], identifier, f"fold_{fold}", "validation", "summary.json")
            with open(path) as f:
                for case in json.load(f)["metric_per_case"]:
                    for label, m in case["metrics"].items():
                        per_label.setdefault(label, []).append(m["Dice"])
        means = {k: np.nanmean([np.nan if v is None else v for v in vals]) for k, vals in per_label.items()}
        row = report["rows"][identifier]
        assert row["n_cases"] == len(per_label["1"]) == report["result"]["n_shared"]
        assert row["Dice"] == pytest.approx(np.mean(list(means.values())), abs=1e-9)
        for label, value in means.items():
            assert row["Dice_per_label"][label] == pytest.approx(value, abs=1e-9)
        assert row["ECE"] is not None and row["AUROC"] is not None  # from the validation .npz
        assert row["seconds_per_case"] > 0 and row["HD95"] is not None and row["NSD"] is not None
        assert row["AUROC"] == row["AUROC_by_input"][row["AUROC_input"]]  # the held-out AUROC of the chosen input
    # nnU-Net has no native map: its error map reads the margin; Diff-UNet's validation wrote its maps (--npz)
    assert set(report["rows"][MODELS["nnUNetTrainer"]]["AUROC_by_input"]) == {"confidence"}
    assert set(report["rows"][MODELS["DiffUNetTrainer"]]["AUROC_by_input"]) == {"map", "confidence"}
    assert report["rows"][MODELS["nnUNetTrainer"]]["budget"] == [{"validated": None, "tuned": None}]
    assert report["rows"][MODELS["DiffUNetTrainer"]]["budget"] == [{"validated": [2, 2], "tuned": None}]


def test_ensemble_row_and_files(report):
    ensembles = [r for r in report["result"]["rows"] if r["kind"] == "ensemble"]
    assert len(ensembles) == 1
    row = ensembles[0]
    assert row["Dice"] is not None and row["ECE"] is not None and row["AUROC"] is not None
    assert row["seconds_per_case"] == pytest.approx(sum(report["rows"][m]["seconds_per_case"] for m in MODELS.values()))
    labels = os.path.join(report["env"]["nnUNet_raw"], NAME, "labelsTr")
    segs = sorted(f for f in os.listdir(row["source"]) if f.endswith(".nii.gz") and "_uncertainty" not in f)
    assert len(segs) == row["n_cases"] > 0
    for seg in segs:
        case = seg[: -len(".nii.gz")]
        ref = image_geometry(os.path.join(labels, seg))
        for path in (os.path.join(row["source"], seg), os.path.join(row["source"], case + "_uncertainty.nii.gz")):
            geometry = image_geometry(path)
            assert geometry[0] == ref[0]
            for a, b in zip(geometry[1:], ref[1:]):
                np.testing.assert_allclose(a, b, atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(row["source"], seg))))) <= {0, 1, 2}
        unc_image = sitk.ReadImage(os.path.join(row["source"], case + "_uncertainty.nii.gz"))
        unc = sitk.GetArrayFromImage(unc_image)
        assert unc_image.GetPixelID() == sitk.sitkFloat32 and np.isfinite(unc).all()
        assert unc.min() >= 0 and unc.max() <= 1 and unc.max() > 0
        # find_best leaves the members' raw validation maps unread: the folder's map is the entropy of the mean
        members = []
        for identifier in MODELS.values():
            for fold in (0, 1):
                npz = os.path.join(report["folder"], identifier, f"fold_{fold}", "validation", case + ".npz")
                if os.path.isfile(npz):
                    members.append(np.load(npz)["probabilities"].astype(np.float64))
        assert len(members) == 2
        mean = (members[0] + members[1]) / 2
        np.testing.assert_allclose(np.load(os.path.join(row["source"], case + ".npz"))["probabilities"], mean,
                                   atol=1e-6)
        p = np.clip(mean, 1e-12, 1)
        np.testing.assert_allclose(unc.reshape(p.shape[1:]), -(p * np.log(p)).sum(0) / math.log(p.shape[0]),
                                   atol=1e-5)


def test_ensemble_error_map_file(report):
    """The ensemble's fitted error map is stored in its folder, readable as diffnnunet_ensemble reads it, for the
    row's members; the row's AUROC is its held-out AUROC."""
    row = next(r for r in report["result"]["rows"] if r["kind"] == "ensemble")
    assert row["error_map"] == os.path.join(row["source"], ERROR_MAP_FILE)
    em = load_error_map(row["error_map"])
    assert em["members"] == row["members"] and em["folds"] == [0, 1] and em["cases"] == row["n_cases"]
    assert em["measure"] == "pooled" and set(em["validation_auroc"]) == {"map", "confidence"}
    assert row["AUROC"] == pytest.approx(em["validation_auroc"][em["inputs"]], abs=1e-12)
    assert row["AUROC_input"] == em["inputs"]


def test_fold_validation_writes_native_maps(report):
    """diffnnunet_train --npz: Diff-UNet's fold validation writes each case's native map beside its .npz (float32,
    the probabilities' grid, values >= 0); nnU-Net's writes none."""
    for identifier, has_maps in ((MODELS["DiffUNetTrainer"], True), (MODELS["nnUNetTrainer"], False)):
        for fold in (0, 1):
            val = os.path.join(report["folder"], identifier, f"fold_{fold}", "validation")
            cases = sorted(f[:-4] for f in os.listdir(val) if f.endswith(".npz"))
            assert cases
            for case in cases:
                path = os.path.join(val, case + "_uncertainty.nii.gz")
                assert os.path.isfile(path) == has_maps, path
                if has_maps:
                    image = sitk.ReadImage(path)
                    u = sitk.GetArrayFromImage(image)
                    p = np.load(os.path.join(val, case + ".npz"))["probabilities"]
                    assert image.GetPixelID() == sitk.sitkFloat32 and u.size == np.prod(p.shape[1:])
                    assert np.isfinite(u).all() and u.min() >= 0 and u.max() > 0


def test_report_files_and_printed_table(report):
    folder, result = report["folder"], report["result"]
    for name in ("find_best_report.md", "find_best_report.json", "inference_instructions.txt",
                 "inference_information.json"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    with open(os.path.join(folder, "find_best_dice_vs_time.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(folder, "find_best_report.md")) as f:
        md = f.read()
    assert "| model or ensemble | Dice | Dice 1 | Dice 2 | HD95 | NSD | ECE | AUROC |" in md
    assert "| model or ensemble | Dice |" in report["printed"] and "best by Dice: " in report["printed"]
    assert len(result["rows"]) == 3 and any(r["pareto"] for r in result["rows"])
    best = max(r["Dice"] for r in result["rows"])
    assert report["rows"][result["best"]]["Dice"] == best
    cheapest = report["rows"][result["cheapest"]]
    assert cheapest["Dice"] >= best - 0.005 and cheapest["pareto"]
    assert all(r["seconds_per_case"] >= cheapest["seconds_per_case"] for r in result["rows"]
               if r["Dice"] >= best - 0.005)


def test_inference_commands_run(report, tmp_path):
    with open(os.path.join(report["folder"], "inference_instructions.txt")) as f:
        text = f.read()
    sections, current = [], None
    for line in text.splitlines():
        if line.startswith(("Best by", "Cheapest within")):
            current = []
            sections.append(current)
        elif line.startswith("diffnnunet_"):
            current.append(shlex.split(line))
    assert sections and all(sections[0])
    assert all("--save_uncertainty" in c for s in sections for c in s if c[0] == "diffnnunet_predict")
    images = os.path.join(report["env"]["nnUNet_raw"], NAME, "imagesTs")
    for i, commands in enumerate(sections):
        if not commands:  # "the best itself"
            continue
        place = {"INPUT_FOLDER": images}
        for command in commands:
            argv = [place.setdefault(a, str(tmp_path / str(i) / a.lower())) if a.isupper() and "_FOLDER" in a
                    else a for a in command[1:]]
            COMMANDS[command[0]](argv)
        out = place["OUTPUT_FOLDER_PP"]
        cases = sorted({f[: -len("_0000.nii.gz")] for f in os.listdir(images)})
        for case in cases:
            ref = image_geometry(os.path.join(images, case + "_0000.nii.gz"))
            assert image_geometry(os.path.join(out, case + ".nii.gz"))[0] == ref[0]
            unc = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, case + "_uncertainty.nii.gz")))
            assert np.isfinite(unc).all() and unc.min() >= 0 and unc.max() <= 1


def test_missing_pieces_fail_clearly(trained, capsys, tmp_path):
    last = _fail(["-d", DATASET, "-tr", "nnUNetTrainer", "DiffUNetTrainer", "-f", "0", "1", "2", "-np", "1"], capsys)
    assert "fold 2 of nnUNetTrainer__nnUNetPlans__2d" in last
    assert last.endswith(f"diffnnunet_train {DATASET} nnUNetTrainer 2 -c 2d -p nnUNetPlans --npz")
    val = os.path.join(trained["nnUNet_results"], NAME, MODELS["DiffUNetTrainer"], "fold_1", "validation")
    os.rename(os.path.join(val, "summary.json"), os.path.join(val, "summary.json.hidden"))
    try:
        last = _fail(["-d", DATASET, "-tr", "DiffUNetTrainer", "-f", "0", "1", "-np", "1"], capsys)
    finally:
        os.rename(os.path.join(val, "summary.json.hidden"), os.path.join(val, "summary.json"))
    assert "fold 1 of DiffUNetTrainer__DiffnnUNetPlans__2d: no validation results" in last
    assert last.endswith(f"diffnnunet_train {DATASET} DiffUNetTrainer 1 -c 2d -p DiffnnUNetPlans --val --npz")
    # the ensemble command names what a member lacks
    last = _fail(["-i", val, "-o", str(tmp_path / "e")], capsys, ensemble.main)
    assert "at least two" in last
    empty = tmp_path / "member"
    empty.mkdir()
    for name in ("dataset.json", "plans.json"):
        (empty / name).write_text(json.dumps({"file_ending": ".nii.gz"}))
    last = _fail(["-i", str(empty), str(empty), "-o", str(tmp_path / "e")], capsys, ensemble.main)
    assert "no CASE.npz" in last and str(empty) in last


def test_models_compared_on_shared_cases(trained, tmp_path):
    val = os.path.join(trained["nnUNet_results"], NAME, MODELS["DiffUNetTrainer"], "fold_0", "validation")
    npz = sorted(f for f in os.listdir(val) if f.endswith(".npz"))[0]
    os.rename(os.path.join(val, npz), os.path.join(val, npz + ".hidden"))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            find_best.main(["-d", DATASET, "-f", "0", "1", "-np", "1", "--no_timing", "--disable_ensembling",
                            "-o", str(tmp_path)])
    finally:
        os.rename(os.path.join(val, npz + ".hidden"), os.path.join(val, npz))
    with open(tmp_path / "find_best_report.json") as f:
        result = json.load(f)
    n = result["n_shared"]
    assert all(r["n_cases"] == n for r in result["rows"]) and len(result["rows"]) == 2
    assert f"compared on the {n} validation cases every model has (of its {n + 1})" in out.getvalue()
    assert result["cheapest"] is None and not (tmp_path / "find_best_dice_vs_time.png").exists()


@pytest.fixture(scope="module")
def members(report, tmp_path_factory):
    """Two member folders per kind, from each model's validation .npz/.pkl: ``maps`` with a random map of their own
    each (as diffnnunet_predict --save_probabilities --save_uncertainty writes them), ``plain`` without."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("members")
    out = {"maps": [], "plain": []}
    for kind in out:
        for identifier in MODELS.values():
            member = root / kind / identifier
            member.mkdir(parents=True)
            for name in ("dataset.json", "plans.json"):
                os.link(os.path.join(report["folder"], identifier, name), member / name)
            for fold in (0, 1):
                val = os.path.join(report["folder"], identifier, f"fold_{fold}", "validation")
                for f in os.listdir(val):
                    if f.endswith((".npz", ".pkl")):
                        os.link(os.path.join(val, f), member / f)
                    if kind == "maps" and f.endswith(".nii.gz") and not f.endswith("_uncertainty.nii.gz"):
                        seg = sitk.ReadImage(os.path.join(val, f))
                        shape = sitk.GetArrayFromImage(seg).shape
                        u = sitk.GetImageFromArray(rng.uniform(0, 1, shape).astype(np.float32))
                        u.CopyInformation(seg)
                        sitk.WriteImage(u, str(member / f.replace(".nii.gz", "_uncertainty.nii.gz")))
            out[kind].append(str(member))
    return out


def _entropy(q):
    q = np.clip(q, 1e-12, 1)
    return -(q * np.log(q)).sum(0) / math.log(q.shape[0])


def _pooled_by_hand(members, case):
    """(mean probabilities ``(C, *spatial)``, the members' maps, the pooled map U, their JSD) of one case."""
    p = [np.load(os.path.join(m, case + ".npz"))["probabilities"].astype(np.float64) for m in members]
    u = [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(m, case + "_uncertainty.nii.gz"))) for m in members]
    mean = (p[0] + p[1]) / 2
    jsd = np.clip(_entropy(mean) - (_entropy(p[0]) + _entropy(p[1])) / 2, 0, None).reshape(u[0].shape)
    return mean, u, np.clip((u[0] + u[1]) / 2 + jsd, 0, 1), jsd


def test_ensemble_command_pools_member_maps(report, members, tmp_path):
    """diffnnunet_ensemble on two members with maps: mean probabilities, and the pooled map by hand."""
    members = members["maps"]
    out = str(tmp_path / "ensemble")
    ensemble.main(["-i", *members, "-o", out, "--save_npz", "-np", "1"])
    cases = sorted(f[:-4] for f in os.listdir(members[0]) if f.endswith(".npz"))
    assert len(cases) == report["result"]["n_shared"]
    assert not [f for f in os.listdir(out) if f.startswith(".partial_")]
    for case in cases:
        mean, u, expected, jsd = _pooled_by_hand(members, case)
        assert (jsd > 0.01).any()  # the members disagree somewhere: the pooled map is not the mean of their maps
        unc_image = sitk.ReadImage(os.path.join(out, case + "_uncertainty.nii.gz"))
        assert unc_image.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(sitk.GetArrayFromImage(unc_image), expected, atol=1e-5)
        np.testing.assert_allclose(np.load(os.path.join(out, case + ".npz"))["probabilities"], mean, atol=1e-6)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, case + ".nii.gz")))
        np.testing.assert_array_equal(seg.reshape(mean.shape[1:]), mean.argmax(0))
        ref = image_geometry(os.path.join(members[0], case + "_uncertainty.nii.gz"))
        for path in (os.path.join(out, case + ".nii.gz"), os.path.join(out, case + "_uncertainty.nii.gz")):
            geometry = image_geometry(path)
            assert geometry[0] == ref[0]
            for a, b in zip(geometry[1:], ref[1:]):
                np.testing.assert_allclose(a, b, atol=1e-6)


def test_ensemble_command_applies_the_error_map(report, members, tmp_path):
    """diffnnunet_ensemble --error_map: the written map is the ensemble's error map applied by hand (the curve of
    the voxel's label of the mean at the pooled map U, or at the margin of the mean), in [0, 1]; with the file
    find_best stored and with the same curves read as the other input."""
    stored = next(r for r in report["result"]["rows"] if r["kind"] == "ensemble")["error_map"]
    em = load_error_map(stored)
    other = tmp_path / "other_input.json"
    other.write_text(json.dumps({**em, "inputs": "confidence" if em["inputs"] == "map" else "map"}))
    case = sorted(f[:-4] for f in os.listdir(members["maps"][0]) if f.endswith(".npz"))[0]
    mean, _, pooled, _ = _pooled_by_hand(members["maps"], case)
    for i, path in enumerate((stored, str(other))):
        fit = load_error_map(path)
        out = str(tmp_path / f"ensemble{i}")
        ensemble.main(["-i", *members["maps"], "-o", out, "-np", "1", "--error_map", path])
        got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, case + "_uncertainty.nii.gz")))
        seg = mean.argmax(0)
        q = np.clip(mean, 1e-6, 1 - 1e-6)  # the export logits' clamp: log q, renormalised by the softmax
        top = np.sort(q / q.sum(0), 0)
        x = pooled.reshape(seg.shape) if fit["inputs"] == "map" else 1 - (top[-1] - top[-2])
        expected = apply_error_map(torch.from_numpy(x.astype(np.float32)), seg, fit).numpy()
        np.testing.assert_allclose(got.reshape(seg.shape), expected, atol=1e-5)
        assert got.min() >= 0 and got.max() <= 1
        assert np.abs(got.reshape(seg.shape) - pooled.reshape(seg.shape)).max() > 0.01  # not the raw pooled map


def test_ensemble_command_refuses_a_bad_error_map(report, members, capsys, tmp_path):
    """A bad --error_map file: one line naming it, a non-zero exit, no output folder; an error map that reads the
    pooled maps with members that have none: one line naming the missing map, nothing written."""
    em = load_error_map(next(r for r in report["result"]["rows"] if r["kind"] == "ensemble")["error_map"])
    garbage, partial = tmp_path / "garbage.json", tmp_path / "partial.json"
    garbage.write_text("{not json")
    partial.write_text(json.dumps({"inputs": "map", "labels": {}}))
    out = tmp_path / "out"
    for path, says in ((garbage, "not an ensemble error map"), (partial, "missing key 'pooled'"),
                       (tmp_path / "absent.json", "cannot read the error map")):
        last = _fail(["-i", *members["maps"], "-o", str(out), "-np", "1", "--error_map", str(path)], capsys,
                     ensemble.main)
        assert last.startswith(f"diffnnunet_ensemble: error: {path}: ") and says in last, last
        assert not out.exists()
    reads_maps = tmp_path / "reads_maps.json"
    reads_maps.write_text(json.dumps({**em, "inputs": "map"}))
    last = _fail(["-i", *members["plain"], "-o", str(out), "-np", "1", "--error_map", str(reads_maps)], capsys,
                 ensemble.main)
    assert "_uncertainty.nii.gz: missing; the ensemble's error map reads the members' pooled maps" in last
    assert members["plain"][0] in last and not out.exists()
