"""Temperature scaling (diffnnunet.inference.calibration): the fit on over-confident toy data, the NLL by hand, and
the predictor dividing its exported logits by the tuned temperature."""
import math

import numpy as np
import pytest
import torch

from diffnnunet.inference.calibration import (
    apply_error_map,
    calibrate,
    expected_calibration_error,
    fit_error_map,
    fit_temperature,
    nll,
)


def test_nll_by_hand():
    """softmax([0, ln 3]) = (1/4, 3/4): NLL of class 1 is -ln(3/4) = 0.287682; at T = 2 the logits are
    [0, ln 3 / 2], softmax = (1/(1+sqrt 3), sqrt 3/(1+sqrt 3)) and the NLL is ln((1+sqrt 3)/sqrt 3) = 0.455746."""
    z = np.array([[0.0, math.log(3)]])
    assert nll(z, np.array([1]), 1.0, False) == pytest.approx(0.287682, abs=1e-6)
    assert nll(z, np.array([1]), 2.0, False) == pytest.approx(0.455746, abs=1e-6)
    # regions: sigmoid(ln 3) = 3/4, the same NLL for a positive voxel
    assert nll(np.array([[math.log(3)]]), np.array([[1.0]]), 1.0, True) == pytest.approx(0.287682, abs=1e-6)


def _overconfident(n=40_000, classes=3, sharpen=3.0, seed=0):
    """Labels drawn from true class probabilities q; the 'model' reports softmax(sharpen * log q), i.e. logits
    sharpen * log q: over-confident by exactly the temperature ``sharpen``."""
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(classes) * 0.7, size=n)
    y = np.array([rng.choice(classes, p=row) for row in q])
    return sharpen * np.log(q), y


def test_fit_recovers_the_temperature_and_lowers_ece():
    z, y = _overconfident()
    result = calibrate([(z[:20_000], y[:20_000]), (z[20_000:], y[20_000:])], has_regions=False)
    assert result["temperature_nll"] == pytest.approx(3.0, rel=0.06)
    assert result["temperature"] == pytest.approx(3.0, rel=0.15)  # the lowest-ECE candidate, near the NLL's
    assert result["ece_after"] < 0.5 * result["ece_before"]
    assert result["nll_after"] < result["nll_before"] and result["voxels"] == 40_000
    # an already calibrated model keeps T close to 1
    z1, y1 = _overconfident(sharpen=1.0, seed=1)
    assert fit_temperature(z1, y1, False) == pytest.approx(1.0, rel=0.06)


def test_near_binary_probabilities_keep_the_lowest_ece_temperature():
    """Hard exports (p in {0.001, 0.999}, 10% confidently wrong) and a calibrated bulk at p = 0.7: the NLL's T is
    driven by the wrong hard voxels and raises the ECE; the chosen T is the grid's lowest-ECE one, never worse than
    T = 1. By hand at T = 1: the hard voxels' bin has confidence 0.999 and accuracy 0.9, the bulk's 0.7 and 0.7,
    each half of the voxels: ECE = 0.5 x 0.099 = 0.0495."""
    rng = np.random.default_rng(3)
    n = 20_000
    hard_wrong = rng.uniform(size=n) < 0.1
    y_hard = np.where(hard_wrong, 0, 1)
    z_hard = np.stack([np.zeros(n), np.full(n, math.log(0.999 / 0.001))], 1)
    y_bulk = (rng.uniform(size=n) < 0.7).astype(np.int64)
    z_bulk = np.stack([np.zeros(n), np.full(n, math.log(0.7 / 0.3))], 1)
    z, y = np.concatenate([z_hard, z_bulk]), np.concatenate([y_hard, y_bulk])
    result = calibrate([(z, y)], has_regions=False)
    accuracy_hard = 1 - hard_wrong.mean()
    assert result["ece_before"] == pytest.approx(0.5 * (0.999 - accuracy_hard) + 0.5 * abs(0.7 - y_bulk.mean()),
                                                 abs=1e-9)
    assert result["temperature_nll"] > 1.5  # the NLL's T softens the hard voxels ...
    assert expected_calibration_error(z, y, result["temperature_nll"], False) > result["ece_before"] + 0.01
    # ... any T != 1 moves the calibrated bulk (0.7 / 0.7) further than it helps the hard bin: T = 1 is kept
    assert result["temperature"] == 1.0 and result["ece_after"] == result["ece_before"]


@pytest.mark.parametrize("has_regions", [False, True], ids=["labels", "regions"])
def test_twice_overconfident_model_gets_t_2_by_hand(has_regions):
    """Four groups of 1000 voxels with true foreground probabilities q = 0.65, 0.75, 0.85, 0.95 (exactly 1000 q
    foreground labels each); the model's logit is 2 logit(q), twice too confident. At T = 2, p = q in every group,
    so the NLL is minimal there and the ECE is 0: T ~ 2. At T = 1 the confidences are q^2 / (q^2 + (1 - q)^2) =
    0.775229, 0.9, 0.969799, 0.997238 in the 15 bins 11, 13, 14, 14 (bin = floor(15 p)), so
    ECE_before = 0.25 (0.775229 - 0.65) + 0.25 (0.9 - 0.75) + 0.5 |(0.969799 + 0.997238) / 2 - (0.85 + 0.95) / 2|
               = 0.031307 + 0.0375 + 0.041759 = 0.110566.
    The ECE after is recomputed here with numpy at the returned T."""
    q = np.repeat([0.65, 0.75, 0.85, 0.95], 1000)
    y = np.concatenate([np.arange(1000) < round(1000 * g) for g in (0.65, 0.75, 0.85, 0.95)]).astype(np.int64)
    a = 2 * np.log(q / (1 - q))
    z, target = (a[:, None], y[:, None].astype(np.float32)) if has_regions else (np.stack([0 * a, a], 1), y)
    result = calibrate([(z[:2000], target[:2000]), (z[2000:], target[2000:])], has_regions=has_regions)
    assert result["temperature_nll"] == pytest.approx(2.0, rel=1e-3)
    assert result["temperature"] == pytest.approx(2.0, rel=1e-3)
    assert result["ece_before"] == pytest.approx(0.110566, abs=1e-6)
    p = 1 / (1 + np.exp(-a / result["temperature"]))  # foreground probability (softmax of [0, a] / T = sigmoid)
    conf, correct = np.maximum(p, 1 - p), (p > 0.5) == (y == 1)
    bin_of = np.minimum(np.floor(conf * 15).astype(int), 14)
    ece = sum(np.sum(bin_of == b) / conf.size * abs(correct[bin_of == b].mean() - conf[bin_of == b].mean())
              for b in range(15) if np.any(bin_of == b))
    assert ece < 1e-3
    assert result["ece_after"] == pytest.approx(ece, abs=1e-9)


def test_fit_on_regions():
    rng = np.random.default_rng(2)
    q = rng.uniform(0.02, 0.98, size=(30_000, 2))
    y = (rng.uniform(size=q.shape) < q).astype(np.float32)
    z = 0.5 * np.log(q / (1 - q))  # under-confident: T = 0.5 sharpens back
    t = fit_temperature(z, y, True)
    assert t == pytest.approx(0.5, rel=0.06)
    assert expected_calibration_error(z, y, t, True) < expected_calibration_error(z, y, 1.0, True)


def test_predictor_divides_exported_logits_by_the_temperature():
    from tests.test_inference import _predictors
    _, ours = _predictors(3)
    ours.diffusion.update(sampling_steps=1, samples_per_step=1)
    image = torch.randn(2, 9, 30, 23)
    with torch.inference_mode():
        plain = ours.predict_sliding_window_return_logits(image)
        ours.tuned_sampling = {"temperature": 2.5}
        scaled = ours.predict_sliding_window_return_logits(image)
    torch.testing.assert_close(scaled, plain / 2.5)
    assert torch.equal(scaled.argmax(0), plain.argmax(0))  # the segmentation does not change


def test_stock_model_gets_the_same_temperature_and_margin_error_map():
    """Like for like: the stock nnU-Net model (no diffusion section) has its logits divided by the tuned temperature
    and, with uncertainty saved, the error map of its exported margin joined as the uncertainty channel; with
    --raw_uncertainty nothing is joined (the export writes its softmax entropy)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from tests.test_inference import _predictors
    _, ours = _predictors(2, save_uncertainty=True)
    ours.diffusion = None
    image = torch.randn(2, 2, 30, 23)  # 2D: nnU-Net slides over (z, y, x)
    with torch.inference_mode():
        plain = ours.predict_sliding_window_return_logits(image)
        ours.tuned_sampling = {"temperature": 2.0}
        torch.testing.assert_close(ours.predict_sliding_window_return_logits(image), plain / 2.0)
    ours.label_manager = LabelManager({"background": 0, "a": 1}, None)
    # margin complement h = 1 - |p1 - p0|: 100 voxels each at h = 0.1 (never wrong) and 0.9 (always wrong)
    fit = fit_error_map([(np.zeros(200, np.int64), None, np.repeat([False, True], 100), np.repeat([0.1, 0.9], 100))],
                        "margin")
    assert fit["inputs"] == "confidence" and set(fit["validation_auroc"]) == {"confidence"}
    ours.tuned_sampling["error_map"] = fit
    p0 = np.array([0.55, 0.95])  # h = 0.9 and 0.1 at label 0
    logits = torch.from_numpy(np.log(np.stack([p0, 1 - p0]))).float().reshape(2, 1, 2)
    got = ours._apply_error_map(logits)
    assert got.shape == (3, 1, 2)
    # label 0's curve: bins of 100 at h = 0.1 (0 errors) and 0.9 (100), label rate 1/2, shrunk (e + 10 / 2) / 110
    # = 5/110 and 105/110; written (e(h) + 1e-4 h) / (1 + 1e-4): (105/110 + 0.9e-4) / 1.0001, (5/110 + 0.1e-4) / 1.0001
    np.testing.assert_allclose(got[2, 0].numpy(), [0.9545400005, 0.0454599995], rtol=0, atol=1e-6)
    ours.raw_uncertainty = True
    assert ours._apply_error_map(logits).shape == (2, 1, 2)


# -- the error map ---------------------------------------------------------------------------------------------------
def _voxels(labels, u, wrong, h=None):
    return (np.asarray(labels, np.int64), np.asarray(u, np.float64), np.asarray(wrong, bool),
            None if h is None else np.asarray(h, np.float64))


def test_error_map_is_the_isotonic_error_rate_by_hand():
    """One label, 100 voxels at each u = 0.1, 0.2, 0.3, 0.4 with 0, 50, 10 and 100 errors: bins of 100, the
    label's rate r = 160/400 = 0.4, shrunk rates (e + 10 r) / (100 + 10) = 4/110, 54/110, 14/110, 104/110; pooling
    the adjacent violators (equal weights) gives 4/110, 34/110, 34/110, 104/110. At u = 0.25 the map is
    (34/110 + 1e-4 x 0.25) / (1 + 1e-4); beyond the end knots it is constant."""
    u = np.repeat([0.1, 0.2, 0.3, 0.4], 100)
    wrong = np.zeros(400, bool)
    for start, n in zip((0, 100, 200, 300), (0, 50, 10, 100)):
        wrong[start:start + n] = True
    fit = fit_error_map([_voxels(np.ones(400), u, wrong)], "entropy")
    assert fit["measure"] == "entropy" and fit["labels"]["1"]["errors"] == 160
    np.testing.assert_allclose(fit["labels"]["1"]["u"], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(fit["labels"]["1"]["error"], np.array([4, 34, 34, 104]) / 110)
    x = torch.tensor([0.25, 0.05, 0.9])
    got = apply_error_map(x, torch.ones(3, dtype=torch.long), fit)
    expected = (np.array([34 / 110, 4 / 110, 104 / 110]) + 1e-4 * x.numpy()) / (1 + 1e-4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_error_map_shrinks_a_sparse_tail():
    """The demo's validation background: 8 errors in 11,658 voxels, 2 of them among the 4 highest u. A raw
    isotonic fit puts the tail at 1/2; the binned, shrunk curve keeps the whole label below 3%."""
    rng = np.random.default_rng(1)
    u = np.sort(rng.uniform(0, 0.09, 11658))
    wrong = np.zeros(11658, bool)
    wrong[[100, 3000, 6000, 9000, 11000, 11500, 11655, 11657]] = True
    fit = fit_error_map([_voxels(np.zeros(11658), u, wrong)], "entropy")
    assert max(fit["labels"]["0"]["error"]) < 0.03 and len(fit["labels"]["0"]["u"]) <= 64


def test_error_map_ranks_errors_across_labels():
    """The demo's failure: background voxels with an entropy floor (0.11) are never wrong, some foreground errors
    sit lower (0.02). Raw, the AUROC counts those errors below the whole background; the error map puts the
    background at 0 and keeps each label's own order."""
    from diffnnunet.evaluation.uncertainty import auroc_from_histograms, uncertainty_counts
    rng = np.random.default_rng(0)
    bg_u = rng.uniform(0.10, 0.12, 4000)
    fg_u = rng.uniform(0.0, 0.6, 1000)
    fg_wrong = rng.uniform(size=1000) < np.where(fg_u < 0.1, 0.6, fg_u)  # errors at low and high u
    labels = np.r_[np.zeros(4000, np.int64), np.ones(1000, np.int64)]
    u, wrong = np.r_[bg_u, fg_u], np.r_[np.zeros(4000, bool), fg_wrong]
    fit = fit_error_map([_voxels(labels[::2], u[::2], wrong[::2])], "entropy")  # fitted on half of the voxels
    after = apply_error_map(torch.from_numpy(u), torch.from_numpy(labels), fit).numpy()

    def auroc(x):
        return auroc_from_histograms(uncertainty_counts(x, wrong)["counts"])
    assert auroc(u) < 0.75 < 0.85 < auroc(after)
    assert after[:4000].max() < 1e-3  # the background: never wrong on the validation voxels
    fg = np.argsort(fg_u)
    assert np.all(np.diff(after[4000:][fg]) >= 0)  # the foreground's own order is kept
    # a label never predicted on the validation voxels gets the pooled curve
    other = apply_error_map(torch.tensor([0.3]), torch.tensor([7]), fit)
    np.testing.assert_allclose(other.numpy(), (np.interp(0.3, fit["pooled"]["u"], fit["pooled"]["error"])
                                               + 1e-4 * 0.3) / (1 + 1e-4), rtol=1e-6)


def test_error_map_keeps_the_margin_control_when_the_map_wins():
    """200 voxels of one label, the last 100 wrong. The map separates them (u = 0.1 / 0.9); the margin h
    alternates 0.3 / 0.6 and carries no information (50 of the 100 voxels at each h are wrong). The map wins and
    the margin's curve is kept as ``control``, by hand: rate r = 1/2, each bin (50 + 10 r) / (100 + 10) = 1/2.
    With the roles swapped the margin wins and is itself the control (no ``control`` entry)."""
    wrong = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    u = np.where(wrong, 0.9, 0.1)
    h = np.tile([0.3, 0.6], 100)
    fit = fit_error_map([_voxels(np.ones(200), u, wrong, h)], "entropy")
    assert fit["inputs"] == "map" and fit["validation_auroc"]["map"] > fit["validation_auroc"]["confidence"]
    np.testing.assert_allclose(fit["control"]["labels"]["1"]["u"], [0.3, 0.6])
    np.testing.assert_allclose(fit["control"]["labels"]["1"]["error"], [0.5, 0.5])
    swapped = fit_error_map([_voxels(np.ones(200), h, wrong, u)], "entropy")
    assert swapped["inputs"] == "confidence" and "control" not in swapped


def test_predictor_writes_the_error_map_only_for_its_measure():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from tests.test_inference import _predictors
    _, ours = _predictors(2)
    ours.label_manager = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    # labels 0 / 1 / 2, 200 voxels each at u = 0.1 and 0.2: never wrong / wrong only at 0.2 / always wrong
    u = np.tile(np.repeat([0.1, 0.2], 100), 3)
    wrong = np.r_[np.zeros(200), np.zeros(100), np.ones(100), np.ones(200)].astype(bool)
    ours.save_uncertainty = True
    ours.diffusion.update(uncertainty="entropy")
    ours.tuned_sampling = {"error_map": fit_error_map([_voxels(np.repeat([0, 1, 2], 200), u, wrong)], "entropy")}
    e1 = fit_error_map([_voxels(np.ones(200), u[:200], wrong[200:400])], "entropy")["labels"]["1"]["error"][1]
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]]).reshape(3, 1, 2)  # labels 0 and 1
    out = torch.cat([logits, torch.tensor([[[0.2, 0.2]]])])
    got = ours._apply_error_map(out)
    torch.testing.assert_close(got[:3], logits)
    # label 0 at u = 0.2: rate 0 (no errors, shrunk towards 0); label 1 at u = 0.2: (100 + 10/2) / 110
    assert e1 == pytest.approx(105 / 110)
    torch.testing.assert_close(got[3, 0], (torch.tensor([0.0, 105 / 110]) + 1e-4 * 0.2) / (1 + 1e-4), rtol=0,
                               atol=1e-6)
    ours.uncertainty_override = "mutual_information"  # another measure than the one fitted: left as it is
    assert torch.equal(ours._apply_error_map(out), out)
    ours.uncertainty_override, ours.raw_uncertainty = None, True
    assert torch.equal(ours._apply_error_map(out), out)


def test_plans_of_the_removed_mi_entropy_read_the_mutual_information(monkeypatch, capsys):
    """MedSegDiff-V2 plans of the previous version store ``"uncertainty": "mi_entropy"`` (removed): the predictor
    reads the mutual information, with one warning line on stderr however often it asks; the error map fitted for
    mi_entropy no longer matches the measure and is not applied to the native map."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from diffnnunet.methods import uncertainty
    from tests.test_inference import _predictors
    monkeypatch.setattr(uncertainty, "_warned_removed", set())
    _, ours = _predictors(2, save_uncertainty=True)
    ours.label_manager = LabelManager({"background": 0, "a": 1}, None)
    ours.diffusion.update(uncertainty="mi_entropy")
    assert [ours.uncertainty_measure for _ in range(3)] == ["mutual_information"] * 3
    err = capsys.readouterr().err
    assert err == ("warning: uncertainty measure 'mi_entropy' was removed; using 'mutual_information' (re-run "
                   "diffnnunet_tune_sampling to refit the error map)\n")
    u, wrong = np.repeat([0.1, 0.9], 100), np.repeat([False, True], 100)
    fit = fit_error_map([_voxels(np.ones(200), u, wrong)], "mi_entropy")
    assert fit["inputs"] == "map"
    ours.tuned_sampling = {"error_map": fit}
    out = torch.cat([torch.tensor([[0.0, 0.0], [5.0, 5.0]]).reshape(2, 1, 2), torch.full((1, 1, 2), 0.9)])
    assert torch.equal(ours._apply_error_map(out), out)
    ours.diffusion.update(uncertainty="mutual_information")  # the same map fitted for the measure read: applied
    ours.tuned_sampling = {"error_map": {**fit, "measure": "mutual_information"}}
    assert not torch.equal(ours._apply_error_map(out), out)
    assert capsys.readouterr().err == ""


# -- the error map's second input: the exported probabilities' margin ----------------------------------------------
def test_exported_margin_by_hand():
    """Labels: softmax(log(0.5, 0.3, 0.2)) = (0.5, 0.3, 0.2), margin 0.2, h = 0.8; a certain voxel h = 0.
    Regions: sigmoid(0) = 1/2 -> 1 - |0| = 1; sigmoid(ln 3) = 3/4 -> 1 - 1/2 = 1/2; mean of the two = 3/4."""
    from diffnnunet.inference.calibration import exported_margin
    z = torch.log(torch.tensor([[0.5, 1.0], [0.3, 1e-9], [0.2, 1e-9]])).reshape(3, 1, 2)
    np.testing.assert_allclose(exported_margin(z, False).numpy(), [[0.8, 0.0]], atol=1e-6)
    regions = torch.tensor([0.0, math.log(3)]).reshape(2, 1, 1, 1)  # 3D spatial: (R, 1, 1, 1)
    got = exported_margin(regions, True)
    assert got.shape == (1, 1, 1)
    assert float(got) == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("source", ["map", "confidence"])
def test_error_map_picks_the_input_that_explains_the_errors(source):
    """Errors driven by the chains' map u only, or by the margin h only: the input is chosen by the AUROC of held-out
    cases (each half scored with the other half's curves), and the stored curves are those of that input."""
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(4):
        n = 5000
        labels = rng.integers(0, 3, n)
        u, h = rng.uniform(size=n), rng.uniform(size=n)
        wrong = rng.uniform(size=n) < 0.4 * (u if source == "map" else h) ** 3
        cases.append((labels, u, wrong, h))
    fit = fit_error_map(cases, "entropy")
    assert fit["inputs"] == source
    other = "confidence" if source == "map" else "map"
    assert fit["validation_auroc"][source] > 0.75 > 0.55 > fit["validation_auroc"][other]
    x = np.concatenate([c[1 if source == "map" else 3] for c in cases])
    lab, wrong = np.concatenate([c[0] for c in cases]), np.concatenate([c[2] for c in cases])
    assert fit["labels"]["1"]["voxels"] == int(np.sum(lab == 1))
    assert fit["labels"]["1"]["errors"] == int(np.sum(wrong[lab == 1]))
    refit = fit_error_map([(lab, x, wrong, None)], "entropy")
    assert refit["labels"] == fit["labels"] and refit["pooled"] == fit["pooled"]  # refitted on every case


def test_held_out_auroc_is_scored_on_the_other_half_by_hand():
    """Two cases of one label. Case A: 100 voxels at u = 0.2 (all right), 100 at u = 0.8 (all wrong); case B: the
    reverse. A's curve rises: shrunk rates 5/110 and 105/110. B's falls, so its isotonic fit is flat at 1/2 (plus
    the tie-break 1e-4 u). Scored with B's fit, A's voxels sit near 1/2, its wrong ones just above its right ones;
    scored with A's, B's wrong voxels sit at 5/110 and its right ones at 105/110. Pooled, only A's wrong voxels
    rank above a right voxel (A's): 100 x 100 of 200 x 200 pairs, AUROC 1/4, where the in-sample fit (flat 1/2,
    ordered by u) scores 1/2."""
    u = np.repeat([0.2, 0.8], 100)
    a = (np.zeros(200, np.int64), u, np.repeat([False, True], 100), None)
    b = (np.zeros(200, np.int64), u, np.repeat([True, False], 100), None)
    fit = fit_error_map([a, b], "entropy")
    assert fit["validation_auroc"]["map"] == pytest.approx(0.25, abs=1e-9)


def test_predictor_feeds_the_exported_margin_to_the_error_map():
    """A fit whose input is the margin: the written map is g'_c(h) at the margin of the exported logits, not a
    function of the chains' map (0.5 everywhere here), whatever measure is written. Curves by hand: label 0,
    e = h / 2 on [0, 1]; label 1, knots (0.2, 0.1) and (0.6, 0.3), constant beyond them. Two classes: the margin
    is |2 sigmoid(d) - 1| = tanh(|d| / 2) for the logit difference d, so
    voxel 0 (2, 0), label 0: h = 1 - tanh(1) = 0.238406, e = 0.119203;
    voxel 1 (0, 0.5), label 1: h = 1 - tanh(0.25) = 0.755081 > 0.6, e = 0.3;
    voxel 2 (-1, 3), label 1: h = 1 - tanh(2) = 0.035972 < 0.2, e = 0.1;
    written (e + 1e-4 h) / (1 + 1e-4) = 0.1192148, 0.3000455, 0.0999936. (The map 0.5 would give 0.25 and 0.25.)"""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from tests.test_inference import _predictors
    _, ours = _predictors(2, save_uncertainty=True)
    ours.label_manager = LabelManager({"background": 0, "a": 1}, None)
    fit = {"measure": "entropy", "inputs": "confidence", "pooled": {"u": [0.0, 1.0], "error": [0.0, 1.0]},
           "labels": {"0": {"u": [0.0, 1.0], "error": [0.0, 0.5]}, "1": {"u": [0.2, 0.6], "error": [0.1, 0.3]}}}
    ours.diffusion.update(uncertainty="mutual_information")
    ours.tuned_sampling = {"error_map": fit}
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 3.0]]).reshape(2, 1, 3)
    out = torch.cat([logits, torch.full((1, 1, 3), 0.5)])
    got = ours._apply_error_map(out)[2, 0].numpy()
    np.testing.assert_allclose(got, [0.1192148, 0.3000455, 0.0999936], rtol=0, atol=1e-6)


def test_sampling_json_error_maps_load_upgrade_or_are_refused(tmp_path):
    """A current error map loads; one of the earlier two-input format loads as the input it chose (the margin's
    curves for 'confidence'); one that chose the removed combination ('both'), an unknown input or a curve with
    knots without values stops with the file's name."""
    import json

    from diffnnunet.inference.tuning import load_tuned_sampling
    rng = np.random.default_rng(0)
    labels, u, h = rng.integers(0, 2, 2000), rng.uniform(size=2000), rng.uniform(size=2000)
    fit = fit_error_map([(labels, u, rng.uniform(size=2000) < h, h)], "entropy")
    good = {"sampling_steps": 2, "samples_per_step": 2, "calibration": {"temperature": 1.0, "error_map": fit}}
    (tmp_path / "sampling.json").write_text(json.dumps(good))
    assert load_tuned_sampling(str(tmp_path))["error_map"] == fit
    stock = {"calibration": {"temperature": 1.5, "error_map": fit}}  # the stock model's file: no budget
    (tmp_path / "sampling.json").write_text(json.dumps(stock))
    assert load_tuned_sampling(str(tmp_path)) == {"temperature": 1.5, "error_map": fit}
    margin = {"pooled": {"u": [0.5], "error": [0.25]}, "labels": {"0": {"u": [0.1, 0.9], "error": [0.0, 0.5]}}}
    old = {"measure": "entropy", "inputs": "confidence", "pooled": fit["pooled"], "labels": fit["labels"],
           "confidence": margin, "combine": {"pooled": [0.0, 1.0, 0.0]}}
    (tmp_path / "sampling.json").write_text(json.dumps({**good, "calibration": {"temperature": 1.0,
                                                                                "error_map": old}}))
    assert load_tuned_sampling(str(tmp_path))["error_map"] == {"measure": "entropy", "inputs": "confidence", **margin}
    for broken in ({**old, "inputs": "both"}, {**fit, "inputs": "anything"},
                   {**fit, "pooled": {"u": [0.1, 0.2], "error": [0.1]}}):
        (tmp_path / "sampling.json").write_text(json.dumps({**good, "calibration": {"temperature": 1.0,
                                                                                    "error_map": broken}}))
        with pytest.raises(RuntimeError, match="sampling.json: unreadable"):
            load_tuned_sampling(str(tmp_path))
