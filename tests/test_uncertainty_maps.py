"""Native uncertainty maps from the sampling chains (diffnnunet.methods.uncertainty) on hand-made chain sets,
and every method's sampler returning them, in 2D and 3D."""
import math

import numpy as np
import pytest
import torch

from diffnnunet.cli.predict import UNCERTAINTY_MEASURES
from diffnnunet.methods.uncertainty import FOLD_PARTS, MEASURES, ChainStatistics, FoldStatistics, normalized_entropy


def _stats(chains, categorical, chunk=1):
    """chains: (S, B, C, *spatial) -> ChainStatistics fed ``chunk`` chains at a time."""
    st = ChainStatistics(categorical)
    for i in range(0, chains.shape[0], chunk):
        st.add(chains[i:i + chunk].movedim(0, 1))
    return st


def _const(values, spatial, s):
    """S chains, one window, the per-class probabilities ``values`` (S, C) at every voxel."""
    v = torch.tensor(values, dtype=torch.float32)
    return v.reshape(s, 1, -1, *([1] * len(spatial))).expand(s, 1, v.shape[1], *spatial).clone()


@pytest.mark.parametrize("categorical", [True, False], ids=["categorical", "per_channel"])
def test_all_chains_agree_on_a_certain_answer_gives_zero(spatial, categorical):
    st = _stats(_const([[0.0, 1.0, 0.0]] * 4, spatial, 4), categorical)
    for measure in MEASURES:
        assert torch.count_nonzero(st.map(measure)) == 0, measure


def test_two_classes_split_evenly_is_maximal(spatial):
    """Half the chains say class 0, half class 1, each with certainty: H(p_bar) = log 2 / log 2 = 1 (C = 2), every
    chain's own entropy is 0, so the mutual information is 1 too; each channel's std over {0, 1, 0, 1} is 1/2."""
    st = _stats(_const([[1.0, 0.0], [0.0, 1.0]] * 2, spatial, 4), categorical=True, chunk=3)
    for measure, expected in (("entropy", 1.0), ("mutual_information", 1.0), ("std", 0.5)):
        torch.testing.assert_close(st.map(measure), torch.full((1, 1, *spatial), expected), msg=measure)


def test_same_probabilities_in_every_chain_have_no_mutual_information(spatial):
    """Every chain gives (0.2, 0.3, 0.5): no disagreement (MI = std = 0), entropy of those probabilities:
    -(0.2 ln 0.2 + 0.3 ln 0.3 + 0.5 ln 0.5) / ln 3 = 0.937231 (by hand)."""
    st = _stats(_const([[0.2, 0.3, 0.5]] * 3, spatial, 3), categorical=True)
    torch.testing.assert_close(st.map("mutual_information"), torch.zeros(1, 1, *spatial), atol=1e-6, rtol=0)
    torch.testing.assert_close(st.map("std"), torch.zeros(1, 1, *spatial), atol=1e-6, rtol=0)
    torch.testing.assert_close(st.map("entropy"), torch.full((1, 1, *spatial), 0.937231), atol=1e-6, rtol=0)


def test_per_channel_maps_by_hand():
    """One voxel, two sigmoid channels, chains (0.9, 0.2) and (0.5, 0.2): p_bar = (0.7, 0.2).
    Binary entropies in bits: h(0.7) = 0.881291, h(0.2) = 0.721928, h(0.9) = 0.468996, h(0.5) = 1.
    entropy = (0.881291 + 0.721928) / 2 = 0.801609; MI = 0.801609 - ((0.468996 + 0.721928) + (1 + 0.721928)) / 4
    = 0.073396; std = (0.2 + 0) / 2 = 0.1."""
    chains = torch.tensor([[0.9, 0.2], [0.5, 0.2]]).reshape(2, 1, 2, 1, 1)
    st = _stats(chains, categorical=False)
    got = [st.map(m).item() for m in ("entropy", "mutual_information", "std")]
    assert got == pytest.approx([0.801609, 0.073396, 0.1], abs=2e-6)
    # the same by a direct computation with numpy, mean over chains of per-chain binary entropies
    h = [-(p * math.log2(p) + (1 - p) * math.log2(1 - p)) for p in (0.7, 0.2, 0.9, 0.5)]
    assert got[1] == pytest.approx((h[0] + h[1]) / 2 - (h[2] + h[1] + h[3] + h[1]) / 4, abs=2e-6)


def test_chunking_and_random_chains_match_a_direct_computation(spatial):
    g = torch.Generator().manual_seed(3)
    chains = torch.softmax(torch.randn(5, 2, 3, *spatial, generator=g) * 3, 2)  # S=5, B=2, C=3
    p = chains.numpy().astype(np.float64)
    mean = p.mean(0)
    ent = lambda q: -(q * np.log(q)).sum(1, keepdims=True) / np.log(3)  # noqa: E731
    direct = {"entropy": ent(mean), "mutual_information": ent(mean) - np.mean([ent(c) for c in p], 0),
              "std": p.std(0).mean(1, keepdims=True)}
    for chunk in (1, 2, 5):
        st = _stats(chains, categorical=True, chunk=chunk)
        np.testing.assert_allclose(st.mean().numpy(), mean, atol=1e-6)
        for m in MEASURES:
            np.testing.assert_allclose(st.map(m).numpy(), direct[m], atol=1e-5, err_msg=m)


def test_unknown_measure_and_cli_choices():
    st = _stats(torch.full((1, 1, 2, 3, 3), 0.5), categorical=True)
    with pytest.raises(ValueError, match="unknown uncertainty measure 'variance'"):
        st.map("variance")
    assert UNCERTAINTY_MEASURES == MEASURES


def test_removed_measure_in_plans_reads_as_its_replacement(monkeypatch, capsys):
    """Plans of earlier versions may name the removed mi_entropy: read as the mutual information, warned once."""
    from diffnnunet.methods import uncertainty
    monkeypatch.setattr(uncertainty, "_warned_removed", set())
    assert [uncertainty.plans_measure(m) for m in MEASURES] == list(MEASURES)
    assert capsys.readouterr().err == ""
    assert uncertainty.plans_measure("mi_entropy") == uncertainty.plans_measure("mi_entropy") == "mutual_information"
    assert capsys.readouterr().err.count("\n") == 1
    assert "mi_entropy" not in MEASURES and "mi_entropy" not in UNCERTAINTY_MEASURES


def _method(name, arch, spatial):
    from diffnnunet.config import DEFAULT_DIFFUSION
    from diffnnunet.methods import METHODS
    diffusion = dict(DEFAULT_DIFFUSION[name], timesteps=50)
    if name == "ldseg":
        diffusion = METHODS[name].configure_plans(diffusion, {"patch_size": list(spatial), "architecture": {
            "arch_kwargs": arch}})
    torch.manual_seed(0)
    return METHODS[name](arch, 2, 3, diffusion).eval()


@pytest.mark.parametrize("name", ["diff_unet", "berdiff", "ldseg", "medsegdiff_v2"])
def test_every_method_returns_each_map_in_range(name, arch, spatial):
    m = _method(name, arch, spatial)
    image = torch.randn(2, 2, *spatial, generator=torch.Generator().manual_seed(1))
    maps = {}
    for measure in MEASURES:
        probs, unc = m.sample(image, steps=2, samples=3, chunk=2, generator=torch.Generator().manual_seed(0),
                              return_uncertainty=True, uncertainty=measure)
        assert unc.shape == (2, 1, *spatial) and unc.dtype == torch.float32
        assert float(unc.min()) >= 0 and float(unc.max()) <= 1
        maps[measure] = unc
        # the parts for several folds (same seed, same chains): the fold's map, then the chains' mean, whose
        # entropy (of the kind categorical_chains names) is the entropy map
        parts = m.sample(image, steps=2, samples=3, chunk=2, generator=torch.Generator().manual_seed(0),
                         return_uncertainty=True, uncertainty=measure + FOLD_PARTS)[1]
        assert parts.shape == (2, 6 if measure == "std" else 4, *spatial)
        one = FoldStatistics(measure, m.categorical_chains)
        one.add(parts)
        torch.testing.assert_close(one.map(), unc, atol=1e-6, rtol=0)
        if measure == "entropy":
            torch.testing.assert_close(normalized_entropy(parts[:, 1:], m.categorical_chains), unc, atol=1e-6,
                                       rtol=0)
    assert torch.all(maps["mutual_information"] <= maps["entropy"] + 1e-6)  # the epistemic part of the total
    with pytest.raises(ValueError, match="unknown uncertainty measure"):
        m.sample(image, steps=1, samples=2, return_uncertainty=True, uncertainty="variance")


def test_odds_to_categorical_by_hand():
    """Sigmoids (0.5, 0.75): odds (1, 3) -> class probabilities (1/4, 3/4), the export's conversion."""
    from diffnnunet.methods.uncertainty import odds_to_categorical
    got = odds_to_categorical(torch.tensor([0.5, 0.75]).reshape(1, 2, 1))
    torch.testing.assert_close(got.reshape(2), torch.tensor([0.25, 0.75]))


def test_diff_unet_map_follows_the_label_kind(arch, spatial):
    """Mutually exclusive labels: the chains' sigmoids enter as odds-normalised class probabilities; regions: per
    channel. The two maps differ; with one chain the mutual information is 0 either way."""
    m = _method("diff_unet", arch, spatial)
    image = torch.randn(1, 2, *spatial, generator=torch.Generator().manual_seed(2))
    maps = {}
    for exclusive in (True, False):
        m.exclusive_labels = exclusive
        maps[exclusive] = m.sample(image, 2, 3, generator=torch.Generator().manual_seed(0), return_uncertainty=True)[1]
    assert not torch.allclose(maps[True], maps[False])
    one = m.sample(image, 2, 1, return_uncertainty=True, uncertainty="mutual_information")[1]
    assert torch.count_nonzero(one) == 0
