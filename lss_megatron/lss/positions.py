"""Sequence-distributed positional encoding.

* Learned absolute positions: rank n of the sequence group holds only the rows of its own
  positions ([n*l/N, (n+1)*l/N), or its two chunks under the zigzag layout) of the table as its
  OWN parameter (`SegmentPositionEmbedding`). It is never
  communicated along the sequence; its gradient is averaged over the data group only (see
  grad_sync.py), and the parameter is marked sequence-local (`parallel.params`) to say so.
* RoPE: no parameter; `SegmentRotaryEmbedding` hands Megatron the rotary angles of the GLOBAL
  positions this rank holds under the layout (Megatron's own CP slicing is always zig-zag and
  CUDA-only).

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
        rows = rows.to(table.device)
        self.weight = torch.nn.Parameter(table[rows].detach().clone())  # [l/N, E]
        mark_sequence_local(self.weight, rows.cpu())
        local_of = torch.full((table.shape[0],), -1, dtype=torch.long, device=table.device)  # [l]
        local_of[rows] = torch.arange(rows.numel(), device=table.device)  # global -> local row
        rows = rows.cpu()
        self.register_buffer("local_of", local_of, persistent=False)
        self.contiguous_offset = (
            int(rows[0])
            if torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel()))
            else None
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.shape[-1] != self.weight.shape[0]:
            raise ValueError(
                f"learned positions: this rank got {position_ids.shape[-1]} tokens per sequence "
                f"but holds the {self.weight.shape[0]} rows of its layout; feed sequences of "
                f"max_sequence_length = {self.local_of.numel()} tokens cut by the layout"
            )
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
    """Wraps Megatron's `RotaryEmbedding`; returns the angles of this rank's global positions
    under `layout` (contiguous segment, or zigzag chunks n and 2N-1-n).

    Megatron asks for ``rotary_seq_len = local_len * cp_size`` (the full length l; with
    ``sequence_parallel`` also times the tensor-parallel size, which undoes its split); we compute
    the angles for all l positions and keep this rank's rows. Megatron's own context-parallel
    slicing (`get_pos_emb_on_this_cp_rank`) is always zig-zag and CUDA-only, so it is bypassed.
    """

    def __init__(self, inner, seq_rank: int, seq_size: int, layout: str = "contiguous"):
        super().__init__()
        self.inner = inner
        self.seq_rank, self.seq_size, self.layout = seq_rank, seq_size, layout
        self._positions: dict[tuple[int, str], torch.Tensor] = {}

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def get_cos_sin(self, *args, **kwargs):
        return self.inner.get_cos_sin(*args, **kwargs)

    def positions(self, seq_length: int, device) -> torch.Tensor:
        """This rank's global positions of a sequence of `seq_length` tokens: [l/N]."""
        key = (seq_length, str(device))
        if key not in self._positions:
            pos = local_positions(seq_length, self.seq_rank, self.seq_size, self.layout)
            self._positions[key] = pos.to(device)
        return self._positions[key]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if packed_seq:
            raise NotImplementedError("LSS does not support packed (THD) sequences")
        emb = self.inner.get_emb(max_seq_len, offset)  # [l, 1, 1, d_rot]
        return emb[self.positions(max_seq_len, emb.device)]  # [l/N, 1, 1, d_rot]

    def extra_repr(self) -> str:
        return f"segment {self.seq_rank} of {self.seq_size}, layout={self.layout}"


def distribute_positions(model, seq_rank: int, seq_size: int, layout: str = "contiguous") -> None:
    """Make a built GPTModel's positional encoding sequence-distributed (in place).

    The full learned table was initialised identically on every rank (same seed), so the rows a
    rank keeps equal the corresponding rows of the one-process model's table.
    """
    emb = getattr(model, "embedding", None)
    if emb is not None and getattr(emb, "add_position_embedding", False):
        rows = local_positions(model.max_sequence_length, seq_rank, seq_size, layout)  # [l/N]
        full = emb.position_embeddings.weight  # [l, E]
        emb.position_embeddings = SegmentPositionEmbedding(full.data, rows)
    if getattr(model, "position_embedding_type", None) == "rope":
        model.rotary_pos_emb = SegmentRotaryEmbedding(
            model.rotary_pos_emb, seq_rank, seq_size, layout
        )
