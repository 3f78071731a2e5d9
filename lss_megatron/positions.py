"""Sequence-distributed positional encoding.

* Learned absolute positions: rank n of the sequence group holds only rows
  [n*l/N, (n+1)*l/N) of the table as its OWN parameter (`SegmentPositionEmbedding`). It is never
  communicated along the sequence; its gradient is averaged over the data group only (see
  grad_sync.py), and the parameter carries ``lss_sequence_local = True`` to say so.
* RoPE: no parameter; `SegmentRotaryEmbedding` hands Megatron the rotary angles of the segment's
  GLOBAL positions (contiguous segments; Megatron's own CP slicing is zig-zag and CUDA-only).

`distribute_positions(model, seq_rank, seq_size)` swaps these into a built Megatron `GPTModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEQUENCE_LOCAL_ATTR = "lss_sequence_local"


def is_sequence_local(p: torch.nn.Parameter) -> bool:
    """True for a parameter that differs across the sequence group (a position slice)."""
    return bool(getattr(p, SEQUENCE_LOCAL_ATTR, False))


class SegmentPositionEmbedding(torch.nn.Module):
    """The rows of a learned position table that belong to one segment.

    Called with GLOBAL position ids (as Megatron's `LanguageModelEmbedding` passes them) and
    looks them up in the local slice.
    """

    def __init__(self, weight_slice: torch.Tensor, offset: int):
        super().__init__()
        self.offset = int(offset)
        self.weight = torch.nn.Parameter(weight_slice.detach().clone())  # [l/N, E]
        setattr(self.weight, SEQUENCE_LOCAL_ATTR, True)

    @classmethod
    def from_full_table(cls, table: torch.Tensor, seq_rank: int, seq_size: int):
        rows = table.shape[0]
        if rows % seq_size:
            raise ValueError(f"position table rows {rows} not divisible by N = {seq_size}")
        seg = rows // seq_size
        return cls(table[seq_rank * seg : (seq_rank + 1) * seg], seq_rank * seg)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        local = position_ids - self.offset  # [b, s/N]
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= self.weight.shape[0]):
            raise IndexError(
                f"position ids [{int(position_ids.min())}, {int(position_ids.max())}] fall "
                f"outside this segment's rows [{self.offset}, {self.offset + self.weight.shape[0]})"
            )
        return F.embedding(local, self.weight)  # [b, s/N, E]

    def extra_repr(self) -> str:
        return f"rows=[{self.offset}, {self.offset + self.weight.shape[0]}), dim={self.weight.shape[1]}"


class SegmentRotaryEmbedding(torch.nn.Module):
    """Wraps Megatron's `RotaryEmbedding`; returns the angles of this segment's global positions.

    Megatron asks for ``rotary_seq_len = local_len * cp_size`` (the full length l); we compute the
    angles for all l positions and keep rows [n*l/N, (n+1)*l/N).
    """

    def __init__(self, inner, seq_rank: int, seq_size: int):
        super().__init__()
        self.inner = inner
        self.seq_rank = seq_rank
        self.seq_size = seq_size

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def get_cos_sin(self, *args, **kwargs):
        return self.inner.get_cos_sin(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if packed_seq:
            raise NotImplementedError("LSS does not support packed (THD) sequences")
        emb = self.inner.get_emb(max_seq_len, offset)  # [l, 1, 1, d_rot]
        seg = max_seq_len // self.seq_size
        return emb[self.seq_rank * seg : (self.seq_rank + 1) * seg]  # [l/N, 1, 1, d_rot]


def distribute_positions(model, seq_rank: int, seq_size: int) -> None:
    """Make a built GPTModel's positional encoding sequence-distributed (in place).

    The full learned table was initialised identically on every rank (same seed), so the slice a
    rank keeps equals the corresponding rows of the one-process model's table.
    """
    emb = getattr(model, "embedding", None)
    if emb is not None and getattr(emb, "add_position_embedding", False):
        full = emb.position_embeddings.weight  # [l, E]
        emb.position_embeddings = SegmentPositionEmbedding.from_full_table(
            full.data, seq_rank, seq_size
        )
    if getattr(model, "position_embedding_type", None) == "rope":
        model.rotary_pos_emb = SegmentRotaryEmbedding(model.rotary_pos_emb, seq_rank, seq_size)
