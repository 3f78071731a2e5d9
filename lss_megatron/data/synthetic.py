"""The built-in synthetic task: a deterministic long-range copy task over a byte-like vocabulary.

Sequence (l + 1 tokens, so that l inputs and l shifted labels come out of it): the first
``half = (l + 1) // 2`` tokens are uniform random in [1, V); every later token repeats the token
``half`` positions earlier. The second half is predictable only by attending ``half`` positions
back, i.e. across segment boundaries once N >= 2, so it exercises exactly what LSS communicates.

Each sequence depends only on (seed, step, global sample index), never on the mode, N or D, so
every layout sees the same global batch.
"""

from __future__ import annotations

import numpy as np


def synthetic_sequence(
    seed: int, step: int, index: int, seq_length: int, vocab_size: int
) -> np.ndarray:
    """One sequence of ``seq_length + 1`` int64 tokens (see the module docstring)."""
    if vocab_size < 2:
        raise ValueError(f"synthetic data needs vocab_size >= 2, got {vocab_size}")
    rng = np.random.default_rng([seed, step, index])
    total = seq_length + 1
    half = (total + 1) // 2
    seq = np.empty(total, dtype=np.int64)
    seq[:half] = rng.integers(1, vocab_size, size=half)
    seq[half:] = seq[: total - half]
    return seq


def synthetic_sequences(
    seed: int, step: int, indices, seq_length: int, vocab_size: int
) -> np.ndarray:
    """The sequences with global sample `indices` of optimizer step `step`: [len(indices), l + 1]."""
    return np.stack([synthetic_sequence(seed, step, i, seq_length, vocab_size) for i in indices])
