"""The sampling tuner's choice (diffnnunet.inference.tuning.choose_budget) on synthetic grids, one per clause of
the rule: Dice within its tolerance of the best; among those, AUROC within its tolerance of their best; among those,
ECE within its tolerance of their lowest; the cheapest steps x samples; ties on cost to the higher Dice; NaN
metrics constrain nothing, a NaN Dice never passes. In every grid that clause alone decides: without it another
setting would be chosen (named in the case's comment)."""
import math

import pytest

from diffnnunet.inference.tuning import choose_budget

NAN = math.nan


def _row(steps, samples, dice, auroc=NAN, ece=NAN):
    return {"steps": steps, "samples": samples, "dice": dice, "auroc": auroc, "ece": ece}


# (grid, expected (steps, samples)); tolerances: Dice 0.01, AUROC 0.02, ECE 0.01
CASES = {
    # 1 x 1 is 0.05 below the best Dice: without the Dice clause the cheapest, 1 x 1, would win
    "dice_tolerance": ([_row(1, 1, 0.85), _row(2, 2, 0.895), _row(5, 4, 0.90)], (2, 2)),
    # all within the Dice tolerance; 1 x 1's map finds the errors worse (0.80 against 0.95): without the AUROC
    # clause 1 x 1 would win
    "auroc_tolerance": ([_row(1, 1, 0.90, 0.80), _row(2, 2, 0.90, 0.94), _row(5, 4, 0.90, 0.95)], (2, 2)),
    # the best AUROC (0.99) belongs to 10 x 4, outside the Dice tolerance: measured against the Dice survivors'
    # best (0.90) 2 x 2 passes and 1 x 1 (0.5) does not; measured against 0.99 nothing would pass
    "auroc_reference_among_dice_survivors": ([_row(1, 1, 0.90, 0.50), _row(2, 2, 0.90, 0.90),
                                              _row(10, 4, 0.85, 0.99)], (2, 2)),
    # Dice and AUROC tie; 1 x 1 is 0.05 worse in ECE than the lowest (0.02): without the ECE clause 1 x 1 would win
    "ece_tolerance": ([_row(1, 1, 0.90, 0.90, 0.07), _row(2, 2, 0.90, 0.90, 0.02), _row(5, 4, 0.90, 0.90, 0.03)],
                      (2, 2)),
    # the lowest ECE (0.001) belongs to 5 x 4, whose AUROC fails: measured against the AUROC survivors' lowest (0.02)
    # 2 x 2 passes; measured against 0.001 neither 1 x 1 (0.05 > 0.011) nor 2 x 2 (0.02 > 0.011) would pass
    "ece_reference_among_auroc_survivors": ([_row(1, 1, 0.90, 0.90, 0.05), _row(2, 2, 0.90, 0.90, 0.02),
                                             _row(5, 4, 0.90, 0.50, 0.001)], (2, 2)),
    # all tie on every metric: the fewest network evaluations (steps x samples) win, 1 x 8 = 8. Not the fewest
    # steps (1 x 10), samples (9 x 1) or steps + samples (3 x 3), nor the first or last row
    "cheapest_steps_times_samples": ([_row(1, 10, 0.9), _row(3, 3, 0.9), _row(1, 8, 0.9), _row(9, 1, 0.9)], (1, 8)),
    # three settings of cost 4 within every tolerance: the higher Dice (2 x 2, 0.905) wins; without the tie-break
    # (the first of equal cost) or with the lower Dice preferred, 1 x 4 (0.900) would
    "tie_on_cost_goes_to_the_higher_dice": ([_row(1, 4, 0.900), _row(2, 2, 0.905), _row(4, 1, 0.901),
                                            _row(1, 1, 0.80)], (2, 2)),
    # 1 x 1 has no map and no errors (NaN AUROC and ECE): not held against it; treated as failing, 2 x 2 would win
    "nan_auroc_and_ece_constrain_nothing": ([_row(1, 1, 0.90), _row(2, 2, 0.90, 0.95, 0.01)], (1, 1)),
    # NaN values do not enter the references: with the map-less 2 x 2's NaN taken as the best AUROC / lowest ECE
    # (max and min keep a leading NaN), the cheaper 1 x 1 would fail both comparisons and 2 x 2 would win
    "nan_is_not_a_reference": ([_row(2, 2, 0.90, NAN, NAN), _row(1, 1, 0.90, 0.95, 0.01)], (1, 1)),
    # an undefined Dice is within no tolerance: the cheaper NaN-Dice 1 x 1 is not chosen
    "nan_dice_never_passes": ([_row(1, 1, NAN, 0.95, 0.01), _row(2, 2, 0.90, 0.95, 0.01)], (2, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_clause_decides_its_grid(case):
    rows, expected = CASES[case]
    chosen = choose_budget(rows, 0.01, auroc_tolerance=0.02, ece_tolerance=0.01)
    assert (chosen["steps"], chosen["samples"]) == expected


def test_tolerances_are_the_arguments():
    """One grid, each tolerance widened in turn: 1 x 1 (Dice -0.02, AUROC -0.03, ECE +0.03) becomes acceptable only
    when all three tolerances admit it; the defaults (Dice as given, AUROC 0.005, ECE 0.01) keep 2 x 2."""
    rows = [_row(1, 1, 0.88, 0.90, 0.05), _row(2, 2, 0.90, 0.93, 0.02)]

    def pick(*args, **kwargs):
        chosen = choose_budget(rows, *args, **kwargs)
        return chosen["steps"], chosen["samples"]
    assert pick(0.01) == (2, 2)
    assert pick(0.03) == (2, 2)  # AUROC and ECE still exclude 1 x 1
    assert pick(0.03, auroc_tolerance=0.04) == (2, 2)  # ECE still excludes it
    assert pick(0.03, ece_tolerance=0.04) == (2, 2)  # AUROC still excludes it
    assert pick(0.03, auroc_tolerance=0.04, ece_tolerance=0.04) == (1, 1)
    assert pick(0.01, auroc_tolerance=0.04, ece_tolerance=0.04) == (2, 2)  # Dice excludes it
