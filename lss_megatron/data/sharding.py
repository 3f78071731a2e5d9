"""Who holds which tokens: data replicas split the global batch, segments split each sequence.

Labels are shifted GLOBALLY before sharding: from l + 1 tokens, inputs are tokens[0:l] and labels
tokens[1:l+1]; then both are cut into N contiguous segments. The last input token of segment n
therefore predicts the first token of segment n + 1. `segment_batch` reads exactly the l/N + 1
tokens this takes (positions ``n l/N .. (n+1) l/N``) from a `Dataset`.

torch is imported inside the functions that build tensors, so importing this module is light.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..layout import segment_bounds, segment_chunks
from .base import Dataset


def replica_sample_indices(global_batch: int, data_rank: int, data_size: int) -> range:
    """Global sample indices (within a step) of data replica `data_rank`: a contiguous block."""
    per = global_batch // data_size
    return range(data_rank * per, (data_rank + 1) * per)


def _to_segment(window: np.ndarray, lo: int):
    """(tokens, labels, position_ids) from positions lo..lo+s of each row: [b, s + 1] -> 3 x
    LongTensor [b, s]; the labels are the inputs shifted by one global position."""
    import torch

    b, s = window.shape[0], window.shape[1] - 1
    tokens = torch.from_numpy(np.ascontiguousarray(window[:, :-1], dtype=np.int64))  # [b, s]
    labels = torch.from_numpy(np.ascontiguousarray(window[:, 1:], dtype=np.int64))  # [b, s]
    positions = torch.arange(lo, lo + s, dtype=torch.long).unsqueeze(0).expand(b, s)  # [b, s]
    return tokens, labels, positions.contiguous()


def shard_segment(seqs: np.ndarray, seq_rank: int, seq_size: int):
    """Cut whole [b, l + 1] token rows into this rank's segment.

    Returns (tokens, labels, position_ids), each a LongTensor [b, l/N]; position ids are global.
    """
    lo, hi = segment_bounds(seqs.shape[1] - 1, seq_rank, seq_size)
    return _to_segment(seqs[:, lo : hi + 1], lo)  # [b, l/N + 1]: inputs and the shifted label


def segment_batch(
    dataset: Dataset,
    split: str,
    step: int,
    indices: Iterable[int],
    seq_rank: int,
    seq_size: int,
    layout: str = "contiguous",
):
    """This rank's segment of samples `indices` of `step`, reading only its own positions.

    Returns (tokens, labels, position_ids), each a LongTensor [len(indices), l/N]; position ids
    are global, and the last label of a chunk is the first token of the next chunk. With the
    zigzag layout the rank's two chunks are concatenated in local order (see `segment_chunks`).
    """
    import torch

    indices = list(indices)
    parts = []
    for lo, hi in segment_chunks(dataset.seq_length, seq_rank, seq_size, layout):
        window = dataset.read(split, step, indices, lo, hi)  # [b, hi - lo + 1]: positions lo..hi
        parts.append(_to_segment(window, lo))
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(ts, dim=1).contiguous() for ts in zip(*parts, strict=True))  # [b, l/N]
