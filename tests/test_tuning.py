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


def test_ece_is_measured_against_the_settings_that_passed_dice_and_auroc():
    rows = [_row(1, 2, 0.90, 0.93, 0.08), _row(2, 2, 0.90, 0.93, 0.02), _row(5, 2, 0.90, 0.80, 0.01)]
    # the lowest ECE (0.01) belongs to a setting with a poor AUROC; among the two with AUROC 0.93 the lowest is 0.02,
    # and 1 x 2 (0.08) is not within 0.01 of it
    assert (choose_budget(rows, 0.005)["steps"]) == 2
    # the only setting with an acceptable AUROC wins whatever its ECE
    rows = [_row(1, 2, 0.90, 0.93, 0.08), _row(5, 2, 0.90, 0.80, 0.01)]
    assert choose_budget(rows, 0.005)["steps"] == 1


def test_the_best_auroc_outside_the_dice_tolerance_does_not_void_the_auroc_condition():
    """MedSegDiff-V2's validation grid in the demo (mutual-information map; one sample has none: AUROC 0.5): the best
    AUROC (10 x 4, 0.9165) is 0.009 below the best Dice (2 x 4, 0.8908), beyond the 0.005 Dice tolerance. Among the
    Dice-acceptable 1 x 4, 2 x 1 and 2 x 4 the best AUROC is 2 x 4's 0.9102; 1 x 4 (0.8881) and 2 x 1 (0.5) are
    more than 0.005 below it, so 2 x 4 is chosen. (Measured against 0.9165 no Dice-acceptable setting qualified,
    and the map-less 2 x 1 won.)"""
    grid = [(1, 1, 0.8803, 0.0541, 0.5), (1, 2, 0.8589, 0.0453, 0.8766), (1, 4, 0.8869, 0.0472, 0.8881),
            (2, 1, 0.8882, 0.0503, 0.5), (2, 2, 0.8813, 0.0436, 0.8913), (2, 4, 0.8908, 0.0475, 0.9102),
            (5, 1, 0.8807, 0.0535, 0.5), (5, 2, 0.8706, 0.0444, 0.9034), (5, 4, 0.8831, 0.049, 0.9157),
            (10, 1, 0.8791, 0.0541, 0.5), (10, 2, 0.8689, 0.0456, 0.9059), (10, 4, 0.882, 0.0494, 0.9165)]
    rows = [_row(s, n, dice, auroc, ece) for s, n, dice, ece, auroc in grid]
    chosen = choose_budget(rows, 0.005)
    assert (chosen["steps"], chosen["samples"]) == (2, 4)


def test_nan_metrics_constrain_nothing():
    rows = [_row(1, 1, 0.90), _row(2, 2, 0.90, 0.95, 0.01)]
    assert choose_budget(rows, 0.005)["steps"] == 1  # no map for 1 x 1 (NaN): not held against it
    # an undefined Dice is not within any tolerance of the best: the cheaper NaN-Dice setting is not chosen
    rows = [_row(1, 1, math.nan, 0.95, 0.01), _row(2, 2, 0.90, 0.95, 0.01)]
    assert choose_budget(rows, 0.005)["steps"] == 2
