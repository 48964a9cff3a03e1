"""Temperature scaling (diffnnunet.inference.calibration): the fit on over-confident toy data, the NLL by hand, and
the predictor dividing its exported logits by the tuned temperature."""
import math

import numpy as np
import pytest
import torch

from diffnnunet.inference.calibration import GRID, calibrate, expected_calibration_error, fit_temperature, nll


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
    assert expected_calibration_error(z, y, result["temperature_nll"], False) > result["ece_after"]
    assert result["ece_after"] <= result["ece_before"]
    grid_best = min(expected_calibration_error(z, y, t, False) for t in GRID)
    assert result["ece_after"] == pytest.approx(grid_best, abs=1e-12)


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
        ours.diffusion["temperature"] = 2.5
        scaled = ours.predict_sliding_window_return_logits(image)
    torch.testing.assert_close(scaled, plain / 2.5)
    assert torch.equal(scaled.argmax(0), plain.argmax(0))  # the segmentation does not change
