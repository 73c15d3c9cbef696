"""The verdict of one compared metric, from its difference test and its equivalence test (TOST), both
p-values Holm-adjusted within their family, at level alpha. The first row that applies, in this order:

    no test: fewer than 2 runs a side               -> "n/a (< 2 runs a side)"
    no test: fewer than 2 seeds with both values    -> "n/a (fewer than 2 pairs)"
    no noise estimate: the difference is the same
      on every seed (to rounding), identical runs   -> "n/a (no noise estimate)"
    p < alpha and p_TOST < alpha                    -> "<X> better, by < m"  (a difference, and inside ±m)
    p < alpha                                       -> "<X> better"          (X by the sign and direction)
    p_TOST < alpha                                  -> "equivalent within ±m"
    otherwise                                       -> "inconclusive"

p_TOST < alpha is the (1 - 2 alpha) interval of the difference lying inside ±m: so a difference shown to be
real but smaller than the margin is not reported as a plain "better", and equivalence needs a noise estimate
(two identical seeds are not evidence of equivalence). `rank` orders the verdicts for reading.
"""

from __future__ import annotations

import math

from picollm.model.mixers import REFERENCE_PAIR

NA_RUNS = "n/a (< 2 runs a side)"  # the verdicts are short: the terminal's table keeps them whole in 80 columns
NA_PAIRS = "n/a (fewer than 2 pairs)"
NA_NOISE = "n/a (no noise estimate)"
NA = NA_RUNS  # the former name
INCONCLUSIVE = "inconclusive"

WHY = {  # the reason behind each n/a, for the report's "how to read"
    NA_RUNS: "a side has fewer than 2 runs with a value: no interval over runs, no test",
    NA_PAIRS: "fewer than 2 seeds have the value on both sides: no paired test",
    NA_NOISE: (
        "the difference is the same on every seed (to rounding, e.g. the same count of answers on a fixed test "
        "set) or the runs are identical: the data estimate no noise, so no p, no interval and no equivalence"
    ),
}


def better(name: str, margin: float | None = None) -> str:
    """ "<name> better", or "<name> better, by < m" when equivalence within ±m holds as well."""
    return f"{name} better" if margin is None else f"{name} better, by < {margin:g}"


def equivalent(margin: float) -> str:
    return f"equivalent within ±{margin:g}"


def verdict(
    mean: float,
    p: float,
    p_tost: float,
    margin: float,
    alpha: float,
    higher_better: bool,
    names: tuple[str, str] = REFERENCE_PAIR,
) -> str:
    """The verdict of a tested difference (module docstring), p-values already adjusted; `names` = (baseline,
    variant) of the difference variant - baseline, the winner by the sign of `mean` and `higher_better`.
    A NaN p is a difference without a noise estimate (`stats.Difference.noise`); untested metrics (fewer than
    2 runs or pairs) have no Difference and get NA_RUNS / NA_PAIRS from the table (`table.diff_cells`)."""
    if not (math.isfinite(p) and math.isfinite(p_tost)):
        return NA_NOISE
    winner = names[1] if (mean > 0) == higher_better else names[0]
    if p < alpha and p_tost < alpha:
        return better(winner, margin)
    if p < alpha:
        return better(winner)
    if p_tost < alpha:
        return equivalent(margin)
    return INCONCLUSIVE


def rank(v: str) -> int:
    """Reading order of verdicts: better, better by < m, equivalent, inconclusive, n/a."""
    if v.startswith("n/a"):
        return 4
    if v == INCONCLUSIVE:
        return 3
    if v.startswith("equivalent"):
        return 2
    return 1 if ", by < " in v else 0
