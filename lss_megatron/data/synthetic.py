"""The built-in synthetic task: key-tagged periodic recall, which needs long-range attention.

Every token is a (key, value) pair, token id ``key * A + value``, with ``A = VALUES = 8`` values
and ``K = num_keys(l, V) = min(16, V // 8, max(2, l // 4))`` keys. A sequence (``l + 1`` tokens,
positions ``t = 0..l``) first draws one value per key, ``v_0 .. v_{K-1}`` uniform in ``[0, A)``,
then is periodic in the key:

    x_t = (t mod K) * A + v_{t mod K}

The first period is the "records"; every later token recalls the value of its key from any
earlier token with the same key (K positions back, or found by content: the key is part of the
token). A model needs to see K tokens back, so at the start of every segment but the first a
sequence-parallel model must attend across the segment boundary.

Loss floors (per-token mean over the l labels ``x_1..x_l``, in nats): the key of ``x_t`` is
fixed by ``t``, and its value is uniform and independent of everything except earlier tokens of
the same key, so for the Bayes-optimal predictor ``x_t`` costs ``ln A`` when no earlier token of
its key is visible and 0 otherwise. A segment-local model predicts label ``x_t`` from the inputs
``x_{ns}..x_{t-1}`` of its own segment ``n = (t-1) // s``, ``s = l / N``; the last earlier token
of the same key is ``x_{t-K}``, visible iff ``t - K >= ns``. So each segment's labels
``x_{ns+1}..x_{ns+s}`` miss exactly the first ``min(K - 1, s)``:

    unseen(l, N) = N * min(K - 1, l / N)
    segment_local_loss_floor = unseen(l, N) * ln(A) / l

No model whose tokens see only their own segment can do better in expectation (cross-entropy >=
conditional entropy, and this is the conditional entropy given the segment and the global
position). Full causal attention can reach the N = 1 value ``(K - 1) ln(A) / l``
(`full_attention_loss_floor`): only the records are unpredictable.

Each sequence depends only on (seed, split, step, sample index), never on the mode, N or D.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .base import SPLIT_CODES, DataError, check_read_args

VALUES = 8
"""A: values per key (each unpredictable token costs ln 8 = 2.08 nats)."""
MAX_KEYS = 16
"""Upper bound on K: more keys make a longer period but learn more slowly."""
MIN_VOCAB = 2 * VALUES
"""The smallest vocabulary the task fits in (2 keys x 8 values)."""


def num_keys(seq_length: int, vocab_size: int) -> int:
    """K, the period: ``min(16, V // 8, max(2, l // 4))`` (at least 2 keys, about 4 periods)."""
    return min(MAX_KEYS, vocab_size // VALUES, max(2, seq_length // 4))


def synthetic_problems(vocab_size: int) -> list[str]:
    """Why `vocab_size` cannot hold the task (empty when it can)."""
    if vocab_size < MIN_VOCAB:
        return [
            f"--vocab-size {vocab_size} is too small for --data synthetic: it needs >= {MIN_VOCAB} "
            f"tokens ({VALUES} values x at least 2 keys)"
        ]
    return []


def _unseen_labels(seq_length: int, num_segments: int, keys: int) -> int:
    """Labels with no earlier token of their key inside their own segment (module docstring)."""
    if num_segments < 1 or seq_length % num_segments:
        raise ValueError(f"seq_length {seq_length} is not divisible by N = {num_segments}")
    return num_segments * min(keys - 1, seq_length // num_segments)


def segment_local_loss_floor(seq_length: int, num_segments: int, vocab_size: int) -> float:
    """Lower bound (nats) on the mean per-token loss of any model whose tokens see only their own
    segment of ``l / N`` tokens: ``N * min(K - 1, l / N) * ln(8) / l`` (module docstring). N = 1 gives
    the full-attention optimum."""
    k = num_keys(seq_length, vocab_size)
    return _unseen_labels(seq_length, num_segments, k) * math.log(VALUES) / seq_length


def full_attention_loss_floor(seq_length: int, vocab_size: int) -> float:
    """The best mean per-token loss (nats) with full causal attention: ``(K - 1) ln(8) / l``."""
    return segment_local_loss_floor(seq_length, 1, vocab_size)


class SyntheticRecall:
    """The synthetic task as a `Dataset` (module docstring); reads compute only their positions."""

    name = "synthetic"

    def __init__(self, *, seq_length: int, vocab_size: int, seed: int):
        problems = synthetic_problems(vocab_size)
        if problems:
            raise DataError(problems[0])
        if seq_length < 1 or seed < 0:
            raise DataError(f"need seq_length >= 1 and seed >= 0, got {seq_length}, {seed}")
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.num_keys = num_keys(seq_length, vocab_size)

    def values(self, split: str, step: int, index: int) -> np.ndarray:
        """The per-key values of one sequence: int64 [K] in [0, A)."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[split], step, index])
        return rng.integers(0, VALUES, size=self.num_keys, dtype=np.int64)

    def read(self, split: str, step: int, indices: Iterable[int], lo: int, hi: int) -> np.ndarray:
        """int64 [len(indices), hi - lo + 1]: positions lo..hi of each sequence (`Dataset`)."""
        idx = check_read_args(self, split, step, indices, lo, hi)
        keys = np.arange(lo, hi + 1, dtype=np.int64) % self.num_keys  # [w]
        if idx.size == 0:
            return np.empty((0, keys.size), dtype=np.int64)
        values = np.stack([self.values(split, step, int(i)) for i in idx])  # [b, K]
        return keys[None, :] * VALUES + values[:, keys]  # [b, w]


def synthetic_sequences(
    seed: int, step: int, indices, seq_length: int, vocab_size: int
) -> np.ndarray:
    """The whole training sequences (split ``train``) with global sample `indices` of optimizer
    step `step`: int64 [len(indices), l + 1]."""
    data = SyntheticRecall(seq_length=seq_length, vocab_size=vocab_size, seed=seed)
    return data.read("train", step, indices, 0, seq_length)
