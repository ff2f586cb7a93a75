"""Small statistics for evaluation reports: a confidence interval for accuracy, a timing spread."""

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


def spread(times: list) -> dict:
    """``{"median", "min", "max", "n"}`` of repeated timings (the upper median for an even count, as
    the harness has always reported)."""
    ordered = sorted(times)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "n": len(ordered)}
