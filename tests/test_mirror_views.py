"""The sampling chains spread over nnU-Net's mirror views (DiffusionPredictor.chain_views): each view's chains run on
the flipped window, come back flipped, and the map is that of all chains pooled (FoldStatistics, chain-count
weighted); hand-computed values in 2D and 3D."""
import pytest
import torch

from diffnnunet.methods.uncertainty import FOLD_PARTS, MEASURES, ChainStatistics, FoldStatistics

#: binary entropies in bits, by hand: h(0.8) = 0.721928, h(0.6) = 0.970951, h(0.56) = 0.989588
H08, H06, H056 = 0.721928, 0.970951, 0.989588


class _TopBottom(torch.nn.Module):
    """A stand-in method that is not mirror-equivariant: every chain gives class probabilities (0.8, 0.2) in the
    first half of the window along the first spatial axis and (0.2, 0.8) in the second half, whatever the image."""
    probabilities = "categorical"
    categorical_chains = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, x, steps, samples, generator=None, chunk=None, return_uncertainty=False, uncertainty="entropy"):
        self.calls.append(samples)
        n = x.shape[2]
        q = torch.where(torch.arange(n) < n // 2, 0.8, 0.2).reshape(1, 1, 1, n, *([1] * (x.ndim - 3)))
        p = torch.cat([q, 1 - q], 2).expand(x.shape[0], samples, 2, *x.shape[2:])
        chains = ChainStatistics(categorical=True)
        chains.add(p)
        return (chains.mean(), chains.map(uncertainty)) if return_uncertainty else chains.mean()


def _predictor(dim, samples, measure="mutual_information", plans=None, mirroring=False):
    from diffnnunet.inference import DiffusionPredictor
    p = DiffusionPredictor(use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False,
                           perform_everything_on_device=False, save_uncertainty=True, uncertainty=measure)
    p.network = _TopBottom()
    p.configuration_manager = type("CM", (), {"patch_size": (6, 4) if dim == 2 else (6, 4, 2), "batch_size": 2})()
    p.diffusion = {"sampling_steps": 1, "samples_per_step": samples, **({"mirror_chains": True} if plans is None
                                                                          else plans)}
    p.allowed_mirroring_axes = tuple(range(dim))
    return p


@pytest.mark.parametrize("samples,top", [(2, 0.5), (3, 0.6), (5, 0.56)])
def test_chains_over_mirror_views_pool_into_one_map(dim, samples, top):
    """Views in nnU-Net's order: identity, a flip of the first spatial axis, of the second, ... A chain on a view
    that flips the first axis comes back as (0.2, 0.8) in the first half. S = 2: one chain on each of the first
    two views, mean 0.5 in the first half: entropy h(0.5) = 1, mutual information 1 - h(0.8) = 0.278072, std 0.3.
    S = 3: views (), (first), (second): first-half chains 0.8, 0.2, 0.8, mean 0.6, entropy 0.970951, mutual
    information 0.970951 - 0.721928 = 0.249023, std sqrt((0.04 + 0.16 + 0.04) / 3) = 0.282843. S = 5 in 2D
    (4 views, chain counts 2, 1, 1, 1): 0.8, 0.8, 0.2, 0.8, 0.2, mean 0.56, mutual information 0.267660, std
    0.293939. In 3D S = 5 spreads over 5 of the 8 views: the fifth flips the first two axes, so the chains give
    0.8, 0.2, 0.8, 0.8, 0.2: also mean 0.56. Without the views every chain agrees: mutual information 0."""
    x = torch.zeros(3, 1, *((6, 4) if dim == 2 else (6, 4, 2)))
    expected = {2: (1.0, 1 - H08, 0.3, 0.527325), 3: (H06, H06 - H08, 0.282843, 0.491720),
                5: (H056, H056 - H08, 0.293939, 0.514658)}[samples]  # mi_entropy: sqrt(entropy x MI)
    views = min(samples, 4 if dim == 2 else 8)  # the mirror combinations of 2 or 3 axes, identity included
    assert len(expected) == len(MEASURES)
    for measure, value in zip(MEASURES, expected):
        p = _predictor(dim, samples, measure)
        assert [n for _, n in p.chain_views()] == [samples // views + (i < samples % views) for i in range(views)]
        with torch.inference_mode():
            probs, unc = p._sample_windows(x)
        assert probs.shape == (3, 2, *x.shape[2:]) and unc.shape == (3, 1, *x.shape[2:])
        assert p.network.calls == [n for _, n in p.chain_views()]  # S network chains in all, none repeated
        torch.testing.assert_close(probs[:, 0, :3], torch.full_like(probs[:, 0, :3], top), atol=1e-6, rtol=0)
        torch.testing.assert_close(probs[:, 0, 3:], torch.full_like(probs[:, 0, 3:], 1 - top), atol=1e-6, rtol=0)
        torch.testing.assert_close(unc, torch.full_like(unc, value), atol=2e-6, rtol=0, msg=measure)
        p.fold_parts = True  # several folds: the views' pooled parts, for the fold loop to combine
        with torch.inference_mode():
            parts = p._sample_windows(x)[1]
        assert parts.shape[1] == {"std": 4, "mi_entropy": 4}.get(measure, 3)
        folds = FoldStatistics(measure, categorical=True)
        folds.add(parts)
        torch.testing.assert_close(folds.map(), unc, atol=2e-6, rtol=0)
        p.fold_parts = False
        p.mirror_chains = False  # the instance switch; every chain on the window as it is
        with torch.inference_mode():
            probs, unc = p._sample_windows(x)
        assert p.chain_views() is None and p.network.calls[-1] == samples
        torch.testing.assert_close(probs[:, 0, :3], torch.full_like(probs[:, 0, :3], 0.8), atol=1e-6, rtol=0)
        off = {"entropy": H08, "mutual_information": 0.0, "std": 0.0, "mi_entropy": 0.0}[measure]
        torch.testing.assert_close(unc, torch.full_like(unc, off), atol=2e-6, rtol=0, msg=measure)


def test_when_the_chains_stay_unmirrored(dim):
    """Plans without the key (the default), ``mirror_chains: false``, one chain, full test-time mirroring
    (``use_mirroring``, every view runs all S chains) and a trainer that allows no mirror axis all keep the chains
    on the window as it is."""
    assert _predictor(dim, 4, plans={}).chain_views() is None
    assert _predictor(dim, 4, plans={"mirror_chains": False}).chain_views() is None
    assert _predictor(dim, 1).chain_views() is None
    assert _predictor(dim, 4, mirroring=True).chain_views() is None
    p = _predictor(dim, 4)
    p.allowed_mirroring_axes = None
    assert p.chain_views() is None
    assert [v for v, _ in _predictor(dim, 2).chain_views()] == [(), (2,)]


@pytest.mark.parametrize("measure", MEASURES)
def test_group_parts_combine_again_like_the_pooled_chains(spatial, measure):
    """Chains pooled in two stages (views of 2 and 1 chains, then a second fold of 3 chains) give the map of all
    six chains pooled at once; the first stage's ``parts()`` has ChainStatistics' parts layout."""
    torch.manual_seed(0)
    chains = torch.rand(2, 6, 3, *spatial)  # two windows, six chains, three per-channel probabilities
    pooled = ChainStatistics(categorical=False)
    pooled.add(chains)
    views = FoldStatistics(measure, categorical=False)
    for group in (chains[:, :2], chains[:, 2:3]):
        st = ChainStatistics(categorical=False)
        st.add(group)
        views.add(st.map(measure + FOLD_PARTS), group.shape[1])
    other = ChainStatistics(categorical=False)
    other.add(chains[:, 3:])
    assert views.parts().shape == other.map(measure + FOLD_PARTS).shape
    folds = FoldStatistics(measure, categorical=False)
    folds.add(views.parts())
    folds.add(other.map(measure + FOLD_PARTS))
    torch.testing.assert_close(folds.map(), pooled.map(measure), atol=1e-5, rtol=0)


def test_full_mirroring_runs_every_chain_on_every_view(dim):
    """``use_mirroring`` (``--mirror``): all S chains on each of the 4 (2D) or 8 (3D) mirror combinations, the
    probabilities averaged: half the views flip the first axis, so the first half's probability is 0.5. Each
    view's chains agree, and the views' maps are averaged (not pooled): mutual information 0."""
    x = torch.zeros(2, 1, *((6, 4) if dim == 2 else (6, 4, 2)))
    p = _predictor(dim, 2, mirroring=True)
    with torch.inference_mode():
        probs, unc = p._sample_windows(x)
    assert p.network.calls == [2] * (4 if dim == 2 else 8)
    torch.testing.assert_close(probs[:, 0], torch.full_like(probs[:, 0], 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(unc, torch.zeros_like(unc), atol=1e-6, rtol=0)


class _TopBottomWithAnchor(_TopBottom):
    """_TopBottom plus a deterministic member (as MedSegDiff-V2's anchor): (0.5, 0.5) everywhere joins each call's
    chains in the map, so a call with n chains pools n + 1 members."""

    def map_members(self, chains):
        return chains + 1

    def sample(self, x, steps, samples, generator=None, chunk=None, return_uncertainty=False, uncertainty="entropy"):
        mean = super().sample(x, steps, samples)
        chains = ChainStatistics(categorical=True)
        chains.add(mean[:, None].expand(-1, samples, *mean.shape[1:]))
        chains.add(torch.full_like(mean, 0.5)[:, None])
        return (mean, chains.map(uncertainty)) if return_uncertainty else mean


@pytest.mark.parametrize("measure", ["entropy", "mutual_information"])
def test_views_are_weighted_by_their_map_members(dim, measure):
    """S = 5 with one extra member per view: in 2D 4 views with 2, 1, 1, 1 chains, so 3, 2, 2, 2 members; first
    half: 0.8, 0.8, 0.5 | 0.2, 0.5 | 0.8, 0.5 | 0.2, 0.5, mean 4.8 / 9 = 0.533333, entropy h(0.533333) = 0.996792,
    mean member entropy (5 h(0.8) + 4) / 9 = 0.845516. In 3D 5 views of 1 chain (2 members each): 0.8 x 3, 0.2 x 2,
    0.5 x 5, mean 0.53, entropy 0.997402, mean member entropy (5 h(0.8) + 5) / 10 = 0.860964. Weighting the views by
    their chains instead (2, 1, 1, 1) would give another 2D value."""
    x = torch.zeros(1, 1, *((6, 4) if dim == 2 else (6, 4, 2)))
    h, inner = (0.996792, 0.845516) if dim == 2 else (0.997402, 0.860964)
    p = _predictor(dim, 5, measure)
    p.network = _TopBottomWithAnchor()
    with torch.inference_mode():
        unc = p._sample_windows(x)[1]
    value = h if measure == "entropy" else h - inner
    torch.testing.assert_close(unc, torch.full_like(unc, value), atol=2e-6, rtol=0)
