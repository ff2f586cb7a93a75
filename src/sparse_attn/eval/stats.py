"""Small statistics for evaluation reports: a confidence interval for accuracy, one for the accuracy
difference of two configurations on the same prompts, a timing spread."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple:
    """The Wilson score interval (95% by default) for a share ``accuracy`` observed over ``n`` prompts.

    Accuracy here is the mean RULER score over prompts; multi-item answers score fractions (2 of 3
    values: 0.667), and those count as fractional successes. ``n = 0`` gives ``(0.0, 1.0)``. Unlike
    a bootstrap over prompts, it stays wide when every prompt agrees (1 of 1 right: 0.21 to 1.00).
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(max(float(accuracy), 0.0), 1.0)
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(scores: list, reference: list, z: float = Z95) -> tuple:
    """``(mean, low, high)``: the mean of ``scores[i] - reference[i]`` over prompts scored by both
    configurations, with its 95% normal interval (``z`` standard errors of the paired differences
    either side). Comparing on the same prompts cancels how hard each prompt is, so the interval is
    much narrower than the two accuracies' own intervals when the configurations mostly agree; it is
    ``(mean, mean, mean)`` when every difference is the same (all agree: 0), and clipped to ``[-1, 1]``
    (scores lie in ``[0, 1]``). ValueError when the
    lists differ in length or are empty."""
    if len(scores) != len(reference) or not scores:
        raise ValueError(f"paired_difference needs two equally long, non-empty score lists, got {len(scores)} "
                         f"and {len(reference)}")
    diffs = [float(a) - float(b) for a, b in zip(scores, reference)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, mean, mean
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    half = z * math.sqrt(var / n)
    # Scores lie in [0, 1], so their differences in [-1, 1]: the interval is clipped to that.
    return mean, max(mean - half, -1.0), min(mean + half, 1.0)


def spread(times: list) -> dict:
    """``{"median", "min", "max", "n"}`` of repeated timings (the upper median for an even count, as
    the harness has always reported)."""
    ordered = sorted(times)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "n": len(ordered)}
