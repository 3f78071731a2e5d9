"""The longest sequence that fits: one search, for measured fits (`analysis.longest`), the cost
model and the figures alike."""

from __future__ import annotations

from collections.abc import Callable


def longest_fitting(step: int, size: Callable[[int], float], budget: float, limit: int) -> int:
    """The largest multiple l of `step`, at most `limit`, with ``size(l) <= budget``; 0 when
    even `step` does not fit. `size` must grow with l (memory does). Doubling, then bisection:
    about 2 log2(answer / step) calls of `size`."""
    if size(step) > budget:
        return 0
    lo, hi = 1, 2  # lo * step fits; hi * step is untested
    while hi * step <= limit and size(hi * step) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:  # lo * step fits; hi * step does not, or lies past the limit
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid * step) <= budget else (lo, mid)
    return lo * step
