"""DeepSpeed-Ulysses (Jacobs et al. 2023) as Megatron's core attention: the ulysses mode's torch part.

Like LSS, rank n of a sequence group of N ranks (Megatron's context-parallel group, TP = 1)
holds the contiguous segment [n l/N, (n+1) l/N) of every sequence, with the same
sequence-distributed positions (`lss.positions.distribute_positions`), data sharding and double
gradient averaging. Only the core attention differs: DeepSpeed's own
`deepspeed.sequence.layer.DistributedAttention` all-to-alls q, k and v from
[l/N, b, heads, d] to [l, b, heads/N, d] (the whole sequence, this rank's heads), a local attention
runs on them (`lss.kernel.partial_attention` with q_offset = 0: memory-efficient, causal), and a
fourth all-to-all brings the output back to [l/N, b, h, d]. Backward: the same four all-to-alls
in reverse. Per layer and micro-batch a rank sends, in each direction,
``(N-1)/N * (l/N) * b * d * es * (2 h + 2 h_kv)`` bytes (q and out: h heads, k and v: h_kv).

Query head i of rank r is global head r h/N + i and its key/value head is r h_kv/N + i // (h/h_kv),
which is Megatron's GQA grouping, so GQA is exact when N divides h and h_kv (the limits,
`ulysses.problems`).

DeepSpeed's collectives go through `deepspeed.comm`, which dispatches to a process-wide backend.
When none is set, `compat.deepspeed.deepspeed_backend()` installs DeepSpeed's `TorchBackend` on
the existing torch.distributed groups without its CPU shared-memory op and with
`all_to_all_single` passing its tensors positionally, so `parallel.comm.record()` sees every
all-to-all with its bytes (category ``sp``: the sequence group is tagged). `deepspeed` is imported
only when the first Ulysses layer is built.
"""

from __future__ import annotations

import torch

from lss_megatron.compat.deepspeed import deepspeed_backend
from lss_megatron.lss.core_attention import SequenceCoreAttention, attend

_BATCH_DIM = 1  # Megatron's sbhd layout: [s, b, h, d]


class _FullSequenceAttention(torch.nn.Module):
    """The local attention inside DistributedAttention: every query of the sequence against every
    key, on this rank's heads, with the run's kernel (`core_attention.attend`: flash or dense).
    q [l, b, h/N, d], k/v [l, b, h_kv/N, d] -> [l, b, h/N, d]."""

    def __init__(self, softmax_scale: float, kernel: str):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.kernel = kernel

    def forward(self, q, k, v, causal: bool, doc_start=None):
        return attend(
            q,
            k,
            v,
            kernel=self.kernel,
            q_offset=0,
            causal=causal,
            softmax_scale=self.softmax_scale,
            doc_start=doc_start,
        )


class UlyssesCoreAttention(SequenceCoreAttention):
    """DeepSpeed-Ulysses over the context-parallel (sequence) group, as Megatron's
    `core_attention`: (q [l/N, b, h, d], k/v [l/N, b, h_kv, d], mask None) -> [l/N, b, h*d]."""

    def __init__(self, config, layer_number: int, attn_mask_type, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, **kwargs)
        from deepspeed.sequence.layer import DistributedAttention  # optional dependency

        deepspeed_backend()
        self.ulysses = DistributedAttention(
            _FullSequenceAttention(self.softmax_scale, self.kernel),
            self.seq_group,
            scatter_idx=2,
            gather_idx=0,
        )

    supports_documents = True
    """The whole sequence is local after the all-to-all: the global document starts [b, l]
    (the same on every rank) mask it as in serial."""

    def attend(self, query, key, value, causal: bool, doc_start=None) -> torch.Tensor:
        kw = {} if doc_start is None else {"doc_start": doc_start}
        out = self.ulysses(query, key, value, _BATCH_DIM, None, causal=causal, **kw)
        sq, b, h, d = out.shape  # [l/N, b, h, d]
        n = self.seq_group.size()
        self.count_sequence_flops(b, n * sq, h // n, d, causal, doc_start)  # l keys, h/N heads
        return out
