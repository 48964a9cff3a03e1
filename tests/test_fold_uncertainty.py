"""Several folds' uncertainty maps: the folds' disagreement counts (diffnnunet.methods.uncertainty.FoldStatistics and
DiffusionPredictor's fold loop), with hand-computed values, in 2D and 3D."""
import pytest
import torch

from diffnnunet.methods.uncertainty import FOLD_PARTS, MEASURES, ChainStatistics, FoldStatistics

#: binary entropies in bits, by hand: h(0.9) = h(0.1) = 0.468996, h(0.7) = h(0.3) = 0.881291, h(0.8) = h(0.2) =
#: 0.721928, h(0.5) = 1
H09, H07, H08 = 0.468996, 0.881291, 0.721928


def _fold(chain_values, spatial, categorical):
    """ChainStatistics of one fold whose chains give ``chain_values`` (S, C) at every voxel of one window."""
    v = torch.tensor(chain_values, dtype=torch.float32)
    st = ChainStatistics(categorical)
    st.add(v.reshape(1, *v.shape, *([1] * len(spatial))).expand(1, *v.shape, *spatial).clone())
    return st


def _combined(folds, measure, categorical):
    fs = FoldStatistics(measure, categorical)
    for st in folds:
        fs.add(st.map(measure + FOLD_PARTS))
    return fs.map()


def test_two_folds_decompose_into_the_pooled_chains(spatial):
    """One sigmoid channel. Fold A's chains give 0.9 and 0.7, fold B's 0.1 and 0.3. Pooled, the four chains have
    mean 0.5: entropy h(0.5) = 1; mutual information 1 - (h(0.9) + h(0.7) + h(0.1) + h(0.3)) / 4 = 1 - 0.675144
    = 0.324856; std sqrt((0.4^2 + 0.2^2 + 0.4^2 + 0.2^2) / 4) = sqrt(0.1) = 0.316228. Averaging the folds' own
    maps would give h(0.8) = 0.721928, 0.721928 - 0.675144 = 0.046784 and 0.1."""
    folds = [_fold([[0.9], [0.7]], spatial, False), _fold([[0.1], [0.3]], spatial, False)]
    for measure, pooled, averaged in (("entropy", 1.0, H08), ("mutual_information", 0.324856, 0.046784),
                                      ("std", 0.316228, 0.1)):
        got = _combined(folds, measure, categorical=False)
        assert got.shape == (1, 1, *spatial)
        torch.testing.assert_close(got, torch.full_like(got, pooled), atol=2e-6, rtol=0, msg=measure)
        mean_of_maps = (folds[0].map(measure) + folds[1].map(measure)) / 2
        torch.testing.assert_close(mean_of_maps, torch.full_like(got, averaged), atol=2e-6, rtol=0, msg=measure)


def test_folds_that_agree_internally_but_not_with_each_other(spatial):
    """Categorical, two classes: every chain of fold A gives (0.8, 0.2), every chain of fold B (0.2, 0.8). Each
    fold alone: entropy h(0.8) = 0.721928, mutual information 0, std 0. Together: entropy h(0.5) = 1, mutual
    information 1 - 0.721928 = 0.278072, std 0.3 in both channels."""
    folds = [_fold([[0.8, 0.2]] * 3, spatial, True), _fold([[0.2, 0.8]] * 3, spatial, True)]
    for measure, alone, together in (("entropy", H08, 1.0), ("mutual_information", 0.0, 1 - H08),
                                     ("std", 0.0, 0.3)):
        for st in folds:
            torch.testing.assert_close(st.map(measure), torch.full((1, 1, *spatial), alone), atol=2e-6, rtol=0)
        got = _combined(folds, measure, categorical=True)
        torch.testing.assert_close(got, torch.full_like(got, together), atol=2e-6, rtol=0, msg=measure)


@pytest.mark.parametrize("measure", MEASURES)
def test_one_fold_or_identical_folds_give_the_fold_map(spatial, measure):
    torch.manual_seed(0)
    chains = torch.rand(2, 4, 3, *spatial)  # two windows, four chains, three per-channel probabilities
    st = ChainStatistics(categorical=False)
    st.add(chains)
    parts = st.map(measure + FOLD_PARTS)
    assert parts.shape == (2, 6 if measure == "std" else 4, *spatial)
    one = FoldStatistics(measure, False)
    one.add(parts)
    same = FoldStatistics(measure, False)
    for _ in range(3):
        same.add(parts)
    if measure == "std":  # sqrt(std^2) per channel
        torch.testing.assert_close(one.map(), st.map(measure), atol=1e-6, rtol=0)
    else:
        assert torch.equal(one.map(), st.map(measure))
    torch.testing.assert_close(same.map(), st.map(measure), atol=1e-6, rtol=0)


class _FixedChains(torch.nn.Module):
    """A stand-in method: every chain of every window gives the class probabilities (q, 1 - q), q a parameter, so
    one fold's chains agree exactly and folds with different q disagree."""
    probabilities = "categorical"
    categorical_chains = True

    def __init__(self, q=0.5):
        super().__init__()
        self.q = torch.nn.Parameter(torch.tensor(float(q)))

    def sample(self, x, steps, samples, generator=None, chunk=None, return_uncertainty=False, uncertainty="entropy"):
        p = torch.stack([self.q, 1 - self.q]).reshape(1, 1, 2, *([1] * (x.ndim - 2)))
        chains = ChainStatistics(categorical=True)
        chains.add(p.expand(x.shape[0], samples, 2, *x.shape[2:]))
        return (chains.mean(), chains.map(uncertainty)) if return_uncertainty else chains.mean()


def _predictor(dim, qs, measure):
    from diffnnunet.inference import DiffusionPredictor
    p = DiffusionPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False,
                           perform_everything_on_device=False, save_uncertainty=True, uncertainty=measure)
    p.network = _FixedChains().eval()
    p.use_gaussian = False  # nnU-Net's float16 buffers quantize where the Gaussian weights are tiny (corners)
    p.label_manager = type("LM", (), {"num_segmentation_heads": 2, "has_regions": False})()
    p.configuration_manager = type("CM", (), {"patch_size": (12, 10) if dim == 2 else (4, 12, 10),
                                              "batch_size": 2})()
    p.diffusion = {"sampling_steps": 1, "samples_per_step": 3, "samples_per_forward": 3}
    p.list_of_parameters = [_FixedChains(q).state_dict() for q in qs]
    return p


@pytest.mark.parametrize("measure,together", [("entropy", 1.0), ("mutual_information", 1 - H08), ("std", 0.3)])
def test_predictor_map_of_two_folds_counts_their_disagreement(dim, measure, together):
    """Fold A says (0.8, 0.2) with every chain, fold B (0.2, 0.8), over a case of several overlapping windows: the
    two folds' map is the hand-computed pooled value, where the mean of the folds' maps (nnU-Net's fold loop)
    would give h(0.8) = 0.721928, 0 and 0; the segmentation channels stay the mean of the folds' logits."""
    data = torch.randn(1, *((1, 30, 23) if dim == 2 else (9, 30, 23)))
    both = _predictor(dim, (0.8, 0.2), measure)
    with torch.inference_mode():
        got = both.predict_logits_from_preprocessed_data(data).float()
    assert got.shape == (3, *data.shape[1:])
    torch.testing.assert_close(got[2], torch.full_like(got[2], together), atol=2e-3, rtol=0)  # float16 blending
    singles = []
    for q in (0.8, 0.2):
        one = _predictor(dim, (q,), measure)
        with torch.inference_mode():
            singles.append(one.predict_logits_from_preprocessed_data(data).float())
        one.network.load_state_dict(one.list_of_parameters[0])
        with torch.inference_mode():  # one fold: exactly the sliding window's map, as before
            assert torch.equal(singles[-1], one.predict_sliding_window_return_logits(data).float())
    alone = {"entropy": H08, "mutual_information": 0.0, "std": 0.0}[measure]
    torch.testing.assert_close((singles[0][2] + singles[1][2]) / 2, torch.full_like(got[2], alone), atol=2e-3,
                               rtol=0)
    torch.testing.assert_close(got[:2], (singles[0][:2] + singles[1][:2]) / 2)


@pytest.mark.parametrize("regions", [False, True], ids=["labels", "regions"])
def test_predictor_tells_diff_unet_the_label_kind(arch, regions):
    """Diff-UNet's chains enter its map as class probabilities only for mutually exclusive labels; the predictor
    sets that from the dataset's label manager, and the folds' maps combine with the same entropy."""
    from diffnnunet.config import DEFAULT_DIFFUSION
    from diffnnunet.inference import DiffusionPredictor
    from diffnnunet.methods import METHODS
    net = METHODS["diff_unet"](arch, 1, 2, dict(DEFAULT_DIFFUSION["diff_unet"], timesteps=10))
    net.exclusive_labels = regions  # the wrong kind, to be corrected
    p = DiffusionPredictor(device=torch.device("cpu"), allow_tqdm=False, perform_everything_on_device=False)
    p.network, p.label_manager = net, type("LM", (), {"has_regions": regions})()
    p._prepare_sampler_network()
    assert net.exclusive_labels is (not regions) and net.categorical_chains is (not regions)
