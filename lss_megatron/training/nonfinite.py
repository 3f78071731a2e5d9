"""Non-finite numbers never pass silently.

* `NonFiniteLoss`: the run stops (exit 3). Raised for a non-finite loss without
  ``--skip-nonfinite``, after ``--max-consecutive-skips`` skipped steps in a row with it, and
  before a checkpoint would be written from non-finite parameters.
* `SkipGuard` counts consecutive skipped steps. Every rank decides on the all-reduced global loss,
  so every rank counts the same and stops at the same step.
* `nonfinite_parameters`: names of parameters holding NaN or Inf on this rank.
"""

from __future__ import annotations


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or parameter the run cannot continue past (the same on every rank)."""


class SkipGuard:
    """Bounds ``--skip-nonfinite``: at most `limit` consecutive skipped steps."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.consecutive = 0

    def record(self, step: int, skipped: bool) -> None:
        """Count step `step`; raise `NonFiniteLoss` when the limit of skips in a row is reached."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.limit:
            first = step - self.consecutive + 1
            raise NonFiniteLoss(
                f"non-finite loss in {self.consecutive} consecutive steps ({first}..{step}): "
                f"stopping (--max-consecutive-skips {self.limit}); the run is diverging, not "
                "hitting a rare bad batch"
            )


def nonfinite_parameters(model) -> list[str]:
    """Names of this rank's parameters holding NaN or Inf."""
    import torch

    with torch.no_grad():
        return [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
