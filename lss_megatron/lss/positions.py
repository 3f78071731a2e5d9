"""Sequence-distributed positional encoding.

* Learned absolute positions: rank n of the sequence group holds only the rows of its own
  positions ([n*l/N, (n+1)*l/N), or its two chunks under the zigzag layout) of the table as its
  OWN parameter (`SegmentPositionEmbedding`). It is never
  communicated along the sequence; its gradient is averaged over the data group only (see
  grad_sync.py), and the parameter is marked sequence-local (`parallel.params`) to say so.
* RoPE: no parameter; `SegmentRotaryEmbedding` hands Megatron the rotary angles of the segment's
  GLOBAL positions (contiguous segments; Megatron's own CP slicing is zig-zag and CUDA-only).

`distribute_positions(model, seq_rank, seq_size, layout)` swaps these into a built `GPTModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import segment_chunks
from ..parallel.params import mark_sequence_local


def local_positions(seq_length: int, seq_rank: int, seq_size: int, layout: str) -> torch.Tensor:
    """Global positions held by this rank, in local order: LongTensor [l/N]."""
    chunks = segment_chunks(seq_length, seq_rank, seq_size, layout)
    return torch.cat([torch.arange(lo, hi) for lo, hi in chunks])  # [l/N]


class SegmentPositionEmbedding(torch.nn.Module):
    """The rows of a learned position table that belong to one rank's segment (or chunks).

    Called with GLOBAL position ids (as Megatron's `LanguageModelEmbedding` passes them) and
    looks them up in the local rows.
    """

    def __init__(self, table: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(table[rows].detach().clone())  # [l/N, E]
        mark_sequence_local(self.weight, rows)
        local_of = torch.full((table.shape[0],), -1, dtype=torch.long)  # [l]: global -> local row
        local_of[rows] = torch.arange(rows.numel())
        self.register_buffer("local_of", local_of, persistent=False)
        self.contiguous_offset = (
            int(rows[0]) if torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel()))
            else None
        )  # fmt: skip

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.contiguous_offset is not None:
            local = position_ids - self.contiguous_offset  # [b, l/N]
        else:
            local = self.local_of[position_ids]  # [b, l/N]
        if (
            local.device.type == "cpu"
            and local.numel()
            and (int(local.min()) < 0 or int(local.max()) >= self.weight.shape[0])
        ):
            raise IndexError(
                f"position ids [{int(position_ids.min())}, {int(position_ids.max())}] fall "
                f"outside this rank's rows of the position table"
            )
        return F.embedding(local, self.weight)  # [b, l/N, E]

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]} of {self.local_of.numel()}, dim={self.weight.shape[1]}"


class SegmentRotaryEmbedding(torch.nn.Module):
    """Wraps Megatron's `RotaryEmbedding`; returns the angles of this rank's global positions.

    Megatron asks for ``rotary_seq_len = local_len * cp_size`` (the full length l); we compute the
    angles for all l positions and keep this rank's rows.
    """

    def __init__(self, inner, positions: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("positions", positions.clone(), persistent=False)  # [l/N]

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def get_cos_sin(self, *args, **kwargs):
        return self.inner.get_cos_sin(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if packed_seq:
            raise NotImplementedError("LSS does not support packed (THD) sequences")
        emb = self.inner.get_emb(max_seq_len, offset)  # [l, 1, 1, d_rot]
        return emb[self.positions.to(emb.device)]  # [l/N, 1, 1, d_rot]


def distribute_positions(model, seq_rank: int, seq_size: int, layout: str = "contiguous") -> None:
    """Make a built GPTModel's positional encoding sequence-distributed (in place).

    The full learned table was initialised identically on every rank (same seed), so the rows a
    rank keeps equal the corresponding rows of the one-process model's table.
    """
    seq_length = model.max_sequence_length
    rows = local_positions(seq_length, seq_rank, seq_size, layout)  # [l/N]
    emb = getattr(model, "embedding", None)
    if emb is not None and getattr(emb, "add_position_embedding", False):
        full = emb.position_embeddings.weight  # [l, E]
        emb.position_embeddings = SegmentPositionEmbedding(full.data, rows)
    if getattr(model, "position_embedding_type", None) == "rope":
        model.rotary_pos_emb = SegmentRotaryEmbedding(model.rotary_pos_emb, rows)
