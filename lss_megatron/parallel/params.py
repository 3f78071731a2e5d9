"""How each parameter lies over the grid, decided in ONE place (`param_kind`), and the moves
between this rank's piece of a parameter and the full tensor of the one-process model.

* ``replicated``: the same tensor on every rank (every weight of serial, LSS and Ulysses);
* ``sequence-local``: rows of a table that differ across the sequence group, e.g. the LSS
  position slice: rank n holds the rows of its own global positions (`mark_sequence_local`
  records them), never communicated along the sequence;
* ``tensor-parallel``: a Megatron ``tensor_model_parallel`` shard under TP > 1 (nvidia-sp), split
  along ``partition_dim``.

Gradient averaging, the global gradient norm, the replica check, checkpoints and ZeRO all ask
`param_kind`. Apart from the kind, `grad_is_tp_partial` says which gradients are partial sums over
the tensor-parallel group (Megatron's ``sequence_parallel`` parameters: each TP rank saw only l/N
tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .grid import Grid

REPLICATED, SEQUENCE_LOCAL, TENSOR_PARALLEL = "replicated", "sequence-local", "tensor-parallel"

SEQUENCE_LOCAL_ATTR = "lss_sequence_local"
ROWS_ATTR = "lss_global_rows"
"""On a sequence-local parameter: the LongTensor [l/N] of global rows it holds, in local order."""


@dataclass(frozen=True)
class ParamKind:
    kind: str
    """`REPLICATED`, `SEQUENCE_LOCAL` or `TENSOR_PARALLEL`."""
    dim: int | None = None
    """`TENSOR_PARALLEL`: the dimension the shards split."""


def mark_sequence_local(p: torch.nn.Parameter, rows: torch.Tensor) -> None:
    """Tag `p` as sequence-local, holding global rows `rows` [l/N] of the full table."""
    setattr(p, SEQUENCE_LOCAL_ATTR, True)
    setattr(p, ROWS_ATTR, rows.clone())


def is_sequence_local(p: torch.Tensor) -> bool:
    """True for a parameter that differs across the sequence group (a position slice)."""
    return bool(getattr(p, SEQUENCE_LOCAL_ATTR, False))


def param_kind(p: torch.Tensor, tp_size: int) -> ParamKind:
    """How parameter `p` lies over a grid whose tensor-parallel group has `tp_size` ranks."""
    tp_shard = tp_size > 1 and getattr(p, "tensor_model_parallel", False)
    if is_sequence_local(p):
        if tp_shard:
            raise NotImplementedError("a sequence-local tensor-parallel shard is not supported")
        return ParamKind(SEQUENCE_LOCAL)
    if tp_shard:
        return ParamKind(TENSOR_PARALLEL, int(p.partition_dim))
    return ParamKind(REPLICATED)


def grad_is_tp_partial(p: torch.Tensor, tp_size: int) -> bool:
    """True when `p`'s gradient must be SUMMED over the tensor-parallel group first (Megatron's
    ``sequence_parallel`` parameters, TP > 1; what Megatron's `finalize_model_grads` does)."""
    return tp_size > 1 and bool(getattr(p, "sequence_parallel", False))


def _tp_dim(p: torch.Tensor, grid: Grid) -> int | None:
    kind = param_kind(p, grid.tp_size)
    if kind.kind != TENSOR_PARALLEL:
        return None
    if getattr(p, "partition_stride", 1) != 1:
        raise NotImplementedError("strided tensor-parallel partitions are not supported")
    return kind.dim


def to_full(t: torch.Tensor, p: torch.Tensor, grid: Grid) -> torch.Tensor:
    """This rank's piece `t` of parameter-shaped tensor (`p`'s layout) -> the full tensor of the
    one-process model, on t's device (collective over the group that splits `p`)."""
    t = t.detach()
    if is_sequence_local(p):
        rows = getattr(p, ROWS_ATTR).to(t.device)  # [l/N]: global rows held here
        gathered = comm.all_gather_dim0(t, grid.seq_group, category="other")  # [l, E], rank order
        all_rows = comm.all_gather_dim0(rows, grid.seq_group, category="other")  # [l]
        t = torch.empty_like(gathered)
        t[all_rows] = gathered  # [l, E] in global order (any layout)
    dim = _tp_dim(p, grid)
    if dim is not None:
        moved = t.movedim(dim, 0).contiguous()  # shard dim first
        t = comm.all_gather_dim0(moved, grid.tp_group, category="other").movedim(0, dim)
    return t


def to_local(full: torch.Tensor, p: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Cut this rank's piece of a full parameter-shaped tensor, on `p`'s device and dtype.
    Raises ValueError when the piece does not fit `p`."""
    t = full
    if is_sequence_local(p):
        t = t[getattr(p, ROWS_ATTR)]  # this rank's rows, in local order
    dim = _tp_dim(p, grid)
    if dim is not None:
        t = t.chunk(grid.tp_size, dim=dim)[grid.tp_rank]
    if t.shape != p.shape:
        raise ValueError(f"shape {tuple(t.shape)} from checkpoint does not fit {tuple(p.shape)}")
    return t.to(device=p.device, dtype=p.dtype).contiguous()


def full_shape(p: torch.Tensor, grid: Grid) -> tuple[int, ...]:
    """The shape of `p` in the one-process model (sequence-local: every rank of the sequence group
    holds the same number of rows; tensor-parallel: ``tp_size`` equal shards along the dim)."""
    shape = list(p.shape)
    if is_sequence_local(p):
        shape[0] *= grid.seq_size
    dim = _tp_dim(p, grid)
    if dim is not None:
        shape[dim] *= grid.tp_size
    return tuple(shape)


def local_pieces(t: torch.Tensor, p: torch.Tensor, grid: Grid) -> list[tuple[tuple, torch.Tensor]]:
    """This rank's piece `t` of parameter-shaped tensor (`p`'s layout) as (global offsets, view)
    boxes of the full tensor, without communication: one box for a replicated tensor or a
    tensor-parallel shard (offset along ``partition_dim``); for a sequence-local table one box per
    run of consecutive global rows (a zigzag layout holds two runs per rank)."""
    zeros = [0] * t.dim()
    if is_sequence_local(p):
        rows = getattr(p, ROWS_ATTR).tolist()  # global row of each local row
        pieces, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                pieces.append(((rows[start], *zeros[1:]), t[start:i]))  # [run, E]
                start = i
        return pieces
    dim = _tp_dim(p, grid)
    if dim is not None:
        zeros[dim] = grid.tp_rank * t.shape[dim]
    return [(tuple(zeros), t)]
