"""The dataset interface every data source implements, and its error type.

A dataset answers one question: which tokens sit at global positions ``lo..hi`` (inclusive) of
training sequence ``(split, step, index)``? A training sequence has ``l + 1`` tokens (positions
``0..l``): inputs are positions ``0..l-1``, labels positions ``1..l`` (the global label shift, see
`sharding.py`). The answer is a pure function of (seed, split, step, index): it never depends on
the mode or the layout (N, D), so every layout trains on the same global batch.

numpy only: nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "valid", "test")
"""`train` is indexed by optimizer step, `valid` and `test` by evaluation step."""

SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
"""A stable integer per split, mixed into the seeds so that the splits draw different samples."""


class DataError(ValueError):
    """Data that cannot be used: the message names the path or value and the problem."""


@runtime_checkable
class Dataset(Protocol):
    """A source of training sequences of ``seq_length + 1`` tokens in ``[0, vocab_size)``."""

    name: str
    seq_length: int
    vocab_size: int

    def read(self, split: str, step: int, indices: Iterable[int], lo: int, hi: int) -> np.ndarray:
        """int64 ``[len(indices), hi - lo + 1]``: tokens at global positions ``lo..hi``
        (inclusive, ``0 <= lo <= hi <= seq_length``) of sample ``index`` of step ``step``."""
        ...


def check_read_args(
    dataset: Dataset, split: str, step: int, indices: Iterable[int], lo: int, hi: int
) -> np.ndarray:
    """Validate the arguments of `Dataset.read`; return the indices as an int64 array."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if not 0 <= lo <= hi <= dataset.seq_length:
        raise ValueError(
            f"positions {lo}..{hi} are not inside 0..{dataset.seq_length} "
            f"(a sequence of {dataset.seq_length} inputs and one extra label token)"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    idx = np.asarray(list(indices), dtype=np.int64)  # [b]
    if idx.ndim != 1 or (idx.size and idx.min() < 0):
        raise ValueError(f"indices must be non-negative integers, got {idx.tolist()}")
    return idx
