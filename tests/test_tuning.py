"""The sampling tuner's choice (diffnnunet.inference.tuning.choose_budget) on hand-made grids: Dice first, then the
uncertainty AUROC and the ECE, each within its tolerance, the cheapest setting that meets them."""
import math

from diffnnunet.inference.tuning import choose_budget


def _row(steps, samples, dice, auroc=math.nan, ece=math.nan):
    return {"steps": steps, "samples": samples, "dice": dice, "auroc": auroc, "ece": ece}


def test_dice_only_picks_the_cheapest_within_tolerance():
    rows = [_row(1, 1, 0.80), _row(2, 1, 0.896), _row(5, 2, 0.90), _row(10, 4, 0.899)]
    assert (choose_budget(rows, 0.005)["steps"], choose_budget(rows, 0.005)["samples"]) == (2, 1)


def test_a_single_chain_with_a_poor_uncertainty_map_is_not_chosen():
    """1 x 1 has the Dice but its map finds the errors worse (AUROC 0.70 against 0.93): the cheapest setting that
    is within 0.01 of the best AUROC as well is 2 x 2."""
    rows = [_row(1, 1, 0.900, 0.70, 0.02), _row(1, 2, 0.901, 0.90, 0.02), _row(2, 2, 0.899, 0.925, 0.02),
            _row(5, 4, 0.902, 0.93, 0.02)]
    chosen = choose_budget(rows, 0.005)
    assert (chosen["steps"], chosen["samples"]) == (2, 2)


def test_the_measured_diff_unet_grid_keeps_two_steps():
    """The demo's Diff-UNet validation grid (Dice, ECE, AUROC of its mutual-information map, 4 slices): 1 x 4 is
    within the Dice tolerance and 0.0085 below the best AUROC (2 x 4); on the test slices that gap was 0.106, so
    the AUROC tolerance (0.005) must exclude it."""
    rows = [_row(1, 2, 0.9013, 0.9079, 0.009), _row(1, 4, 0.902, 0.934, 0.0088), _row(2, 2, 0.9017, 0.9301, 0.0087),
            _row(2, 4, 0.9031, 0.9425, 0.0087), _row(5, 4, 0.8996, 0.9363, 0.0066), _row(10, 4, 0.8986, 0.9322, 0.0065)]
    chosen = choose_budget(rows, 0.005)
    assert (chosen["steps"], chosen["samples"]) == (2, 4)
    assert (choose_budget(rows, 0.005, auroc_tolerance=0.01)["steps"]) == 1


def test_ece_condition_and_its_fallback():
    rows = [_row(1, 2, 0.90, 0.93, 0.08), _row(2, 2, 0.90, 0.93, 0.02), _row(5, 2, 0.90, 0.80, 0.01)]
    # the lowest ECE (0.01) belongs to a setting with a poor AUROC; within 0.01 of it: 2 x 2 (0.02)
    assert (choose_budget(rows, 0.005)["steps"]) == 2
    # no setting meets Dice, AUROC and ECE together: the ECE condition is dropped, the cheapest of the rest wins
    rows = [_row(1, 2, 0.90, 0.93, 0.08), _row(5, 2, 0.90, 0.80, 0.01)]
    assert choose_budget(rows, 0.005)["steps"] == 1


def test_nan_metrics_constrain_nothing():
    rows = [_row(1, 1, 0.90), _row(2, 2, 0.90, 0.95, 0.01)]
    assert choose_budget(rows, 0.005)["steps"] == 1  # no map for 1 x 1 (NaN): not held against it
