"""Injected failures, a testing aid (``--fault KIND:RANK:STEP``): rank RANK, at step STEP,
crashes (exit 17 without cleanup), hangs, or turns its loss into NaN. The tests use it to check
that a dead or hung peer ends the whole job and that a non-finite loss stops (or is skipped) on
every rank alike."""

from __future__ import annotations

import os
import time

import torch

from ..config import RunConfig, parse_fault
from ..log import get_logger

log = get_logger("train")


def planned(cfg: RunConfig, rank: int, step: int) -> str | None:
    """The failure injected on this rank at this step, if any."""
    fault = parse_fault(cfg.train.fault) if cfg.train.fault else None
    if fault is None:
        return None
    kind, r, s = fault
    return kind if (r, s) == (rank, step) else None


def crash_or_hang(kind: str | None, step: int) -> None:
    """Act out a planned crash or hang (before the step does anything)."""
    if kind == "crash":
        log.error("injected crash at step %d", step)
        os._exit(17)
    if kind == "hang":
        log.error("injected hang at step %d", step)
        while True:
            time.sleep(3600)


def poison(kind: str | None, local_loss: torch.Tensor) -> torch.Tensor:
    """A planned NaN turns this rank's loss into NaN (after its backward)."""
    return local_loss * float("nan") if kind == "nan" else local_loss
