"""benchmarks/quality.py and suite.py bookkeeping: the --set overrides, the worst-gap lines, the uncertainty
verdicts."""
import pytest

from tests.helpers import load_benchmark


def test_overrides_reach_into_sections():
    q = load_benchmark("quality")
    over = q.parse_overrides(["ema.enabled=false", "optimizer.initial_lr=1e-4", "uncertainty=entropy"])
    assert over == {"ema": {"enabled": False}, "optimizer": {"initial_lr": 1e-4}, "uncertainty": "entropy"}
    section = {"ema": {"enabled": True, "horizon_fraction": 0.1}, "optimizer": {"name": "AdamW", "initial_lr": 1e-3}}
    merged = q.merge(section, over)
    assert merged["ema"] == {"enabled": False, "horizon_fraction": 0.1}
    assert merged["optimizer"] == {"name": "AdamW", "initial_lr": 1e-4} and merged["uncertainty"] == "entropy"
    assert section["ema"]["enabled"] is True  # the plans' own dict is not modified


def test_worst_gap_and_ece_ratio_over_trainers_and_budgets():
    q = load_benchmark("quality")

    def run(trainer, budget, seed, dice, ece):
        return {"trainer": trainer, "budget": budget, "seed": seed, "Dice": dice, "HD95": 1.0, "NSD": 0.9,
                "ECE": ece, "AUROC": 0.9, "train_s": 1.0, "predict_s": 1.0}

    runs = [run("nnUNetTrainer", 1, 0, 0.80, 0.02), run("nnUNetTrainer", 1, 1, 0.84, 0.02),
            run("A", 1, 0, 0.79, 0.03), run("A", 1, 1, 0.81, 0.05),      # mean 0.80: gap -0.02, ECE ratio 2.0
            run("nnUNetTrainer", 4, 0, 0.90, 0.01), run("A", 4, 0, 0.91, 0.012)]  # gap +0.01, ratio 1.2
    table, gap, ratio = q.summarise(runs)
    assert gap == pytest.approx(-0.02) and ratio == pytest.approx(2.0)
    assert "0.8200±0.0200" in table  # the baseline's mean ± half-range at budget 1


def test_uncertainty_verdict_needs_both_nnunet_and_the_control_beaten_beyond_the_spread():
    """Exported AUROC means: nnU-Net 0.90 (sd 0.01), A 0.93 (sd 0.01) with control 0.925 (sd 0.01): +0.03 over
    nnU-Net is beyond the larger sd (better), +0.005 over the control is inside it (tie) -> not better. B: 0.95
    against a control of 0.92 and nnU-Net's 0.90 -> better. C: 0.895 -> tie with nnU-Net, not better."""
    def runs(trainer, exported, control):
        return [{"trainer": trainer, "AUROC": e, "AUROC_control": c} for e, c in zip(exported, control)]
    rows = (runs("nnUNetTrainer", [0.89, 0.91], [0.89, 0.91]) + runs("A", [0.92, 0.94], [0.915, 0.935])
            + runs("B", [0.94, 0.96], [0.91, 0.93]) + runs("C", [0.885, 0.905], [0.88, 0.90]))
    lines = load_benchmark("suite").uncertainty_verdicts(rows)
    assert lines == [
        "uncertainty A: exported AUROC vs nnU-Net's exported +0.0300 (better), vs its own control +0.0050 (tie): "
        "not better",
        "uncertainty B: exported AUROC vs nnU-Net's exported +0.0500 (better), vs its own control +0.0300 (better): "
        "better",
        "uncertainty C: exported AUROC vs nnU-Net's exported -0.0050 (tie), vs its own control +0.0050 (tie): "
        "not better"]


def test_suite_variant_is_a_plans_copy_with_the_overrides(tmp_path):
    """``--set`` in the suite: a copy of the trainer's plans named after the overrides, the diffusion section of
    every configuration merged (nested keys too), the default plans untouched; nothing for the baseline."""
    import json
    suite = load_benchmark("suite")
    plans = {"plans_name": "MedSegDiffV2Plans", "configurations": {
        "2d": {"diffusion": {"fusion": "staple", "ema": {"enabled": True, "horizon_fraction": 0.1}}},
        "3d_lowres": {"data_identifier": "x"}}}
    (tmp_path / "MedSegDiffV2Plans.json").write_text(json.dumps(plans))
    name, tag = suite.variant_plans(str(tmp_path), "MedSegDiffV2Trainer", ["fusion=mean", "ema.enabled=false"])
    assert (name, tag) == ("MedSegDiffV2Plans_set_ema.enabled-false_fusion-mean", "_set_ema.enabled-false_fusion-mean")
    copy = json.loads((tmp_path / f"{name}.json").read_text())
    assert copy["plans_name"] == name
    assert copy["configurations"]["2d"]["diffusion"] == {"fusion": "mean",
                                                         "ema": {"enabled": False, "horizon_fraction": 0.1}}
    assert copy["configurations"]["3d_lowres"] == {"data_identifier": "x"}
    assert json.loads((tmp_path / "MedSegDiffV2Plans.json").read_text()) == plans
    assert suite.variant_plans(str(tmp_path), "nnUNetTrainer", ["fusion=mean"]) == (None, "")
    assert suite.variant_plans(str(tmp_path), "MedSegDiffV2Trainer", []) == (None, "")


def test_reused_runs_fill_only_what_the_work_folder_lacks(tmp_path):
    """``--runs-from``: committed run files are copied where the work folder has none of that name (a run done
    there wins), other files are ignored, and a JSON that is not a run, not the run its folder (dataset) and
    name (trainer, seed) say, or of another training budget than asked, is refused naming the file."""
    import json
    suite = load_benchmark("suite")
    source, runs = tmp_path / "brain3d", tmp_path / "work" / "runs"
    source.mkdir()
    row = {"dataset": "brain3d", "trainer": "LDSegTrainer", "seed": 0, "Dice": 0.8}
    (source / "LDSegTrainer_s0.json").write_text(json.dumps(row))
    (source / "nnUNetTrainer_s0.json").write_text(json.dumps({**row, "trainer": "nnUNetTrainer", "Dice": 0.7}))
    (source / "notes.txt").write_text("not a run")
    runs.mkdir(parents=True)
    (runs / "nnUNetTrainer_s0.json").write_text(json.dumps({**row, "trainer": "nnUNetTrainer", "Dice": 0.75}))
    assert suite.reuse_runs(str(source), str(runs)) == ["LDSegTrainer_s0.json"]
    assert json.loads((runs / "LDSegTrainer_s0.json").read_text()) == row
    assert json.loads((runs / "nnUNetTrainer_s0.json").read_text())["Dice"] == 0.75
    assert suite.reuse_runs(str(tmp_path / "absent"), str(runs)) == []
    (source / "cDALTrainer_s0.json").write_text(json.dumps({"Dice": 0.7}))
    with pytest.raises(ValueError, match="cDALTrainer_s0.json: not a suite run"):
        suite.reuse_runs(str(source), str(runs))
    (source / "cDALTrainer_s0.json").write_text(json.dumps({**row, "dataset": "demo", "trainer": "cDALTrainer"}))
    with pytest.raises(ValueError, match="cDALTrainer_s0.json: the run of demo cDALTrainer seed 0"):
        suite.reuse_runs(str(source), str(runs))
    (source / "cDALTrainer_s0.json").write_text(json.dumps({**row, "trainer": "cDALTrainer", "seed": 2}))
    with pytest.raises(ValueError, match="the run of brain3d cDALTrainer seed 2, not what"):
        suite.reuse_runs(str(source), str(runs))
    # the training budget: a run of another budget, or one that does not record it, is refused when one is asked
    fresh, budget = tmp_path / "fresh" / "runs", [8, 20, 2]
    nnunet = {**row, "trainer": "nnUNetTrainer"}
    (source / "LDSegTrainer_s0.json").write_text(json.dumps({**row, "training": budget}))
    (source / "nnUNetTrainer_s0.json").write_text(json.dumps({**nnunet, "training": budget}))
    (source / "cDALTrainer_s0.json").write_text(json.dumps({**row, "trainer": "cDALTrainer", "training": [16, 20, 2]}))
    other = r"cDALTrainer_s0.json: trained at \[16, 20, 2\], not this suite's \[8, 20, 2\]"
    with pytest.raises(ValueError, match=other):
        suite.reuse_runs(str(source), str(fresh), budget)
    (source / "cDALTrainer_s0.json").write_text(json.dumps({**row, "trainer": "cDALTrainer", "training": budget}))
    (source / "nnUNetTrainer_s0.json").write_text(json.dumps(nnunet))
    unrecorded = r"nnUNetTrainer_s0.json: trained at not recorded, not this suite's \[8, 20, 2\]"
    with pytest.raises(ValueError, match=unrecorded):
        suite.reuse_runs(str(source), str(fresh), budget)
    (source / "nnUNetTrainer_s0.json").write_text(json.dumps({**nnunet, "training": budget}))
    assert suite.reuse_runs(str(source), str(fresh), budget) == ["nnUNetTrainer_s0.json"]
    assert sorted(p.name for p in fresh.iterdir()) == [
        "LDSegTrainer_s0.json", "cDALTrainer_s0.json", "nnUNetTrainer_s0.json"]
    from types import SimpleNamespace
    assert suite.training_budget(SimpleNamespace(epochs=8, iterations_per_epoch=20, val_iterations=2)) == [8, 20, 2]
    # the work folder's own runs: another budget stops the suite; a run that predates the record is taken
    assert suite.stored_run(str(fresh / "cDALTrainer_s0.json"), budget)["trainer"] == "cDALTrainer"
    with pytest.raises(SystemExit, match=r"cDALTrainer_s0.json: trained at \[8, 20, 2\], not this suite's \[16"):
        suite.stored_run(str(fresh / "cDALTrainer_s0.json"), [16, 20, 2])
    assert suite.stored_run(str(runs / "LDSegTrainer_s0.json"), [16, 20, 2]) == row
