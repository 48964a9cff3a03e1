"""The main job's code path at a tiny budget: real ICBM152 slices, both trainers, tables and pictures."""
import json
import os

import pytest

pytest.importorskip("nilearn")


def test_demo_tiny_budget(tmp_path, capsys, monkeypatch):
    from diffnnunet import demo
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(k, raising=False)
    work = tmp_path / "demo"
    demo.main(["--workdir", str(work), "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1",
               "--steps", "2", "--samples", "1", "--factor", "6", "-device", "cpu", "--no-tune",
               "--trainers", "nnUNetTrainer", "DiffUNetTrainer"])  # the code path; the default adds two trainers
    out = capsys.readouterr().out
    for trainer in ("nnUNetTrainer", "DiffUNetTrainer"):
        assert f"== {trainer}" in out
        summary = json.load(open(work / "predictions" / trainer / "summary.json"))
        assert {"1", "2"} == set(summary["mean"]) and "HD95" in summary["mean"]["1"]
        assert summary["uncertainty"]["n_cases"] > 0
        assert (work / f"progress_{trainer}.png").stat().st_size > 0
    assert "AUROC" in out and "time: training" in out
    table = out[out.index("== side by side"):].split("\n\n")[0].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert set(rows) >= {"nnUNetTrainer", "DiffUNetTrainer"} and all(len(v) == 10 for v in rows.values())
    exported = json.load(open(work / "predictions" / "DiffUNetTrainer" / "summary.json"))
    raw = json.load(open(work / "predictions" / "raw_maps" / "DiffUNetTrainer" / "summary.json"))
    assert float(rows["DiffUNetTrainer"][0]) == pytest.approx(exported["foreground_mean"]["Dice"], abs=1e-4)
    # raw and exported maps of the same segmentation (same seed); without tuning there is no control
    assert raw["foreground_mean"]["Dice"] == exported["foreground_mean"]["Dice"]
    assert float(rows["DiffUNetTrainer"][4]) == pytest.approx(raw["uncertainty"]["AUROC_uncertainty_vs_error"],
                                                              abs=1e-4)
    assert rows["DiffUNetTrainer"][6] == "nan"
    assert os.path.getsize(work / "predictions.png") > 10000
