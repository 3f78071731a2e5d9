"""Who holds which tokens: data replicas split the global batch, segments split each sequence.

Labels are shifted GLOBALLY before sharding: from l + 1 tokens, inputs are tokens[0:l] and labels
tokens[1:l+1]; then both are cut into N contiguous segments. The last input token of segment n
therefore predicts the first token of segment n + 1.
"""

from __future__ import annotations

import numpy as np
import torch


def replica_sample_indices(global_batch: int, data_rank: int, data_size: int) -> range:
    """Global sample indices (within a step) of data replica `data_rank`: a contiguous block."""
    per = global_batch // data_size
    return range(data_rank * per, (data_rank + 1) * per)


def shard_segment(seqs: np.ndarray, seq_rank: int, seq_size: int):
    """Cut [b, l + 1] token rows into this rank's segment.

    Returns (tokens, labels, position_ids), each a LongTensor [b, l/N]; position ids are global.
    """
    b, total = seqs.shape
    length = total - 1
    if length % seq_size:
        raise ValueError(f"sequence length {length} not divisible by N = {seq_size}")
    seg = length // seq_size
    lo, hi = seq_rank * seg, (seq_rank + 1) * seg
    inputs = torch.from_numpy(np.ascontiguousarray(seqs[:, :-1]))  # [b, l]
    labels = torch.from_numpy(np.ascontiguousarray(seqs[:, 1:]))  # [b, l], shifted globally
    positions = torch.arange(lo, hi, dtype=torch.long).unsqueeze(0).expand(b, seg)  # [b, l/N]
    return inputs[:, lo:hi].contiguous(), labels[:, lo:hi].contiguous(), positions.contiguous()
