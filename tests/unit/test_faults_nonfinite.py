"""``--skip-nonfinite`` is bounded: `SkipGuard` counts skipped steps in a row (the trainer stops at
``--max-consecutive-skips``; end to end: tests/e2e/test_faults_nonfinite.py)."""

from __future__ import annotations

import pytest

from lss_megatron.training.nonfinite import NonFiniteLoss, SkipGuard

pytestmark = pytest.mark.faults


def test_skip_guard_counts_consecutive_skips_only():
    g = SkipGuard(3)
    for step, skipped in enumerate([True, True, False, True, True, False], start=1):
        g.record(step, skipped)  # never 3 in a row
    g.record(7, True)
    g.record(8, True)
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive steps \(7\.\.9\).*--max-consecutive"):
        g.record(9, True)
    with pytest.raises(ValueError):
        SkipGuard(0)
