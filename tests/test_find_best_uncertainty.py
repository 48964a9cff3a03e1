"""The AUROC column of diffnnunet_find_best_configuration (diffnnunet.inference.find_best_uncertainty) on hand-built
validation voxels: every row's held-out AUROC recomputed independently with numpy, the members' exported maps by
hand, the report's ensemble command with the error map."""
import math

import numpy as np
import pytest
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from diffnnunet.evaluation.find_best_report import instructions
from diffnnunet.inference.calibration import TIE_BREAK
from diffnnunet.inference.find_best_uncertainty import (
    Calibration,
    case_samples,
    exported_map,
    fit_rows,
    held_out_auroc,
)

LM = LabelManager({"background": 0, "a": 1, "b": 2, "c": 3}, None)


def _entropy(p):
    """Normalised entropy over axis 0, by hand."""
    q = np.clip(p, 1e-12, 1)
    return -(q * np.log(q)).sum(0) / math.log(p.shape[0])


def _tempered(p, t):
    q = p.astype(np.float64) ** (1 / t)
    return q / q.sum(0)


def _margin(p):
    top = np.sort(p, 0)[::-1]
    return 1 - (top[0] - top[1])


def _auroc(score, wrong):
    """P(score of a wrong voxel > score of a correct one), ties one half (Mann-Whitney), by pairs."""
    pos, neg = score[wrong][:, None], score[~wrong][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _held_out(x_cases, labels_cases, wrong_cases):
    """The held-out AUROC of an error map of input x by hand, for fewer than 100 voxels per label in each half:
    every label's curve is then one bin, i.e. the label's error rate in the fitting half (the shrinkage towards it
    changes nothing; a label absent there gets the half's rate), plus the tie-break TIE_BREAK * x; each half of
    the cases (even / odd) is scored with the other half's rates."""
    halves = [list(range(0, len(x_cases), 2)), list(range(1, len(x_cases), 2))]
    scores, wrongs = [], []
    for fit, score in ((halves[0], halves[1]), (halves[1], halves[0])):
        lab = np.concatenate([labels_cases[i] for i in fit])
        wr = np.concatenate([wrong_cases[i] for i in fit])
        assert max(np.sum(lab == c) for c in np.unique(lab)) < 100  # one bin per label
        for i in score:
            rate = np.array([wr[lab == c].mean() if (lab == c).any() else wr.mean() for c in labels_cases[i]])
            s = (rate + TIE_BREAK * np.clip(x_cases[i], 0, 1)) / (1 + TIE_BREAK)
            scores.append(s.astype(np.float32))
            wrongs.append(wrong_cases[i])
    return _auroc(np.concatenate(scores), np.concatenate(wrongs))


def _cases(n_cases=4, n=24, seed=0):
    """Per case: reference labels (n,), model A's probabilities (4, n) (tempered at T = 0.4), model B's (4, n) with
    a native map (n,) that is higher where B is wrong."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_cases):
        ref = rng.integers(0, 4, n)
        pa = rng.dirichlet(np.ones(4), n).T
        pa[ref, np.arange(n)] += rng.uniform(0, 1.2, n)
        pb = rng.dirichlet(np.ones(4), n).T
        pb[ref, np.arange(n)] += rng.uniform(0, 1.2, n)
        pa, pb = (p / p.sum(0) for p in (pa, pb))
        u = np.clip(0.5 * (pb.argmax(0) != ref) + rng.uniform(0, 0.6, n), 0, 1)
        out.append((ref, pa.astype(np.float32), pb.astype(np.float32), u.astype(np.float32)))
    return out


def test_every_row_auroc_is_the_held_out_auroc_by_hand():
    """Three rows on four hand-built cases: model A (temperature 0.4, no map: the margin is its only input), model
    B (T = 1, a native map and the margin) and their ensemble (the pooled map of A's entropy and B's map plus their
    JSD, and the margin of the mean). Each row's AUROC is the held-out AUROC of the input its fit chose, recomputed
    here without the package: temperature, argmax, margin, pooled map, per-label rates of the other half."""
    cases = _cases()
    calibrations = {"A": Calibration(temperature=0.4), "B": Calibration(measure="mutual_information")}
    rows = {"A": ["A"], "B": ["B"], "A+B": ["A", "B"]}
    per_case = [case_samples(rows, {"A": pa, "B": pb}, {"A": None, "B": u}, calibrations, ref, LM)
                for ref, pa, pb, u in cases]
    fits = fit_rows({r: [s[r] for s in per_case] for r in rows}, {"A": "margin", "B": "mutual_information",
                                                                 "A+B": "pooled"})
    by_hand = {}
    inputs = {r: {"confidence": []} for r in rows}
    inputs["B"]["map"], inputs["A+B"]["map"] = [], []
    labels, wrong = {r: [] for r in rows}, {r: [] for r in rows}
    for ref, pa, pb, u in cases:
        ta, tb = _tempered(pa, 0.4), pb.astype(np.float64)
        mean = (ta + tb) / 2
        for r, p in (("A", ta), ("B", tb), ("A+B", mean)):
            labels[r].append(p.argmax(0))
            wrong[r].append(p.argmax(0) != ref)
            inputs[r]["confidence"].append(_margin(p))
        inputs["B"]["map"].append(u)
        jsd = np.clip(_entropy(mean) - (_entropy(ta) + _entropy(tb)) / 2, 0, None)
        inputs["A+B"]["map"].append(np.clip((_entropy(ta) + u) / 2 + jsd, 0, 1))
    for r in rows:
        by_hand[r] = {k: _held_out(x, labels[r], wrong[r]) for k, x in inputs[r].items()}
        assert set(fits[r]["validation_auroc"]) == set(by_hand[r])
        for k, value in by_hand[r].items():
            assert fits[r]["validation_auroc"][k] == pytest.approx(value, abs=1e-9), (r, k)
        chosen = "map" if "map" in by_hand[r] and by_hand[r]["map"] >= by_hand[r]["confidence"] else "confidence"
        assert fits[r]["inputs"] == chosen
        assert held_out_auroc(fits[r]) == pytest.approx(by_hand[r][chosen], abs=1e-9)
    # not vacuous: the rows differ, and B's map wins over its margin (the choice is exercised both ways)
    assert len({round(held_out_auroc(f), 9) for f in fits.values()}) == 3
    assert fits["B"]["inputs"] == "map" and fits["A"]["inputs"] == "confidence"
    # a row without any error has no fit and no AUROC
    ref, pa = cases[0][0], cases[0][1]
    sure = np.eye(4, dtype=np.float32)[ref].T
    none = fit_rows({"A": [case_samples({"A": ["A"]}, {"A": sure}, {"A": None}, calibrations, ref, LM)["A"]]},
                    {"A": "margin"})
    assert none == {"A": None} and held_out_auroc(None) is None


def test_exported_map_is_what_predict_writes():
    """A member's map as diffnnunet_predict --save_uncertainty writes it, by hand on three voxels: the error map
    applied to the native map; fitted for another measure: the raw map; a map-reading error map without the map:
    its 'control' margin curves on h; no error map: the raw map, else the entropy."""
    p = np.array([[0.7, 0.2, 0.45], [0.2, 0.5, 0.45], [0.1, 0.3, 0.1]], np.float32)  # labels 0, 1, 0
    lm = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    native = np.array([0.2, 0.6, 0.9], np.float32)
    curve = {"pooled": {"u": [0.0, 1.0], "error": [0.0, 0.4]},
             "labels": {"0": {"u": [0.0, 1.0], "error": [0.0, 0.8]}}}
    control = {"pooled": {"u": [0.0, 1.0], "error": [0.1, 0.1]}, "labels": {"1": {"u": [0.5], "error": [0.3]}}}
    em = {"measure": "mutual_information", "inputs": "map", **curve, "control": control}
    cal = Calibration(error_map=em, measure="mutual_information")

    def tie(e, x):
        return (np.asarray(e) + TIE_BREAK * x) / (1 + TIE_BREAK)

    got = exported_map(cal, p, native, lm)
    np.testing.assert_allclose(got, tie([0.8 * 0.2, 0.4 * 0.6, 0.8 * 0.9], native), atol=1e-6)
    np.testing.assert_array_equal(exported_map(Calibration(error_map=em, measure="entropy"), p, native, lm), native)
    h = np.array([1 - 0.5, 1 - 0.2, 1 - 0.0])  # 1 - (p_(1) - p_(2))
    np.testing.assert_allclose(exported_map(cal, p, None, lm), tie([0.1, 0.3, 0.1], h), atol=1e-5)
    np.testing.assert_array_equal(exported_map(Calibration(), p, native, lm), native)
    np.testing.assert_allclose(exported_map(Calibration(), p, None, lm), _entropy(p.astype(np.float64)), atol=1e-6)


def test_ensemble_instructions_pass_the_error_map():
    member = {"trainer": "nnUNetTrainer", "configuration": "2d", "plans_identifier": "nnUNetPlans"}
    choice = {"members": [member, {**member, "trainer": "DiffUNetTrainer"}], "error_map": "/r/ensembles/e/em.json",
              "postprocessing": {"functions": [], "kwargs": [], "pkl": "pp.pkl", "plans": "plans.json"}}
    lines = instructions("900", [0, 1], choice, 1)
    ensemble = [line for line in lines if line.startswith("diffnnunet_ensemble")]
    assert ensemble == ["diffnnunet_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER -np 1 "
                        "--error_map /r/ensembles/e/em.json"]
    lines = instructions("900", [0, 1], {**choice, "error_map": None}, 1)
    assert [line for line in lines if line.startswith("diffnnunet_ensemble")][0].endswith("-np 1")
    assert any("a ranking score" in line for line in lines)
