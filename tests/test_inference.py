import numpy as np
import pytest
import torch

from diffnnunet.inference import probabilities_to_logits
from diffnnunet.inference.export import normalized_entropy


def test_regions_round_trip_through_sigmoid(dim, spatial):
    p = torch.rand(3, *spatial) * 0.98 + 0.01
    torch.testing.assert_close(torch.sigmoid(probabilities_to_logits(p, True)), p, rtol=1e-4, atol=1e-5)


def test_labels_softmax_is_the_one_hot_posterior():
    p = torch.tensor([0.9, 0.3, 0.3]).reshape(3, 1, 1)
    probs = torch.softmax(probabilities_to_logits(p, False), 0).flatten()
    unnorm = torch.tensor([0.9 * 0.7 * 0.7, 0.3 * 0.1 * 0.7, 0.3 * 0.1 * 0.7])
    torch.testing.assert_close(probs, unnorm / unnorm.sum(), rtol=1e-5, atol=1e-6)
    assert probs.argmax() == p.flatten().argmax()


def test_normalized_entropy_range_and_extremes():
    certain = np.zeros((3, 4, 4), np.float32)
    certain[1] = 1
    assert normalized_entropy(certain, False).max() == pytest.approx(0, abs=1e-6)
    uniform = np.full((3, 4, 4), 1 / 3, np.float32)
    np.testing.assert_allclose(normalized_entropy(uniform, False), 1, rtol=1e-5)
    half = np.full((2, 4, 4), 0.5, np.float32)
    np.testing.assert_allclose(normalized_entropy(half, True), 1, rtol=1e-5)
    assert normalized_entropy(certain, True).dtype == np.float32
