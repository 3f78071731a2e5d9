"""The integrated sequence x data grid, as a frozen view over Megatron's `parallel_state`.

LSS maps onto Megatron-Core's groups as follows (TP = 1):

* sequence group (size N)  = Megatron's context-parallel group: rank n holds segment n;
* data group (size D)      = Megatron's data-parallel group: ranks holding the same segment of
                             different sequences;
* gradient group (size P)  = data-parallel with context-parallel: where replicated weights'
                             gradients are averaged (the first half of double gradient averaging).

For the nvidia-sp baseline the degree N is Megatron's tensor-parallel group instead (seq_size is
then 1: every tensor-parallel rank reads whole sequences) and the gradient group is the data group.

Megatron's default rank order (`tp-cp-ep-dp-pp`) makes the N ranks of a sequence group
consecutive, i.e. inside one node, so the per-layer K/V gathers stay on the fastest links.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state as ps

from . import comm


@dataclass(frozen=True)
class Grid:
    """Process groups and coordinates of this rank. Pass it explicitly; nothing reads globals."""

    rank: int
    world_size: int
    seq_group: object
    seq_rank: int
    seq_size: int
    data_group: object
    data_rank: int
    data_size: int
    grad_group: object
    tp_group: object
    tp_rank: int
    tp_size: int
    layout: str = "contiguous"
    """Which tokens a sequence rank holds: `contiguous` segments or `zigzag` chunk pairs."""
    kv_gather_chunks: int = 1
    """How the sequence group gathers K/V: in this many double-buffered head chunks."""
    lss_save_kv: str = "gathered"
    """What LSS keeps of K/V for backward: ``gathered`` or ``local`` (re-gathered in backward)."""
    lss_kv_gather: str = "fused"
    lss_overlap: bool = False
    """LSS's gathers and reduce-scatters overlapped with the attention blocks."""
    """LSS's K/V collectives: ``fused`` (one each way) or ``separate`` (K and V apart)."""

    def __repr__(self) -> str:  # groups are not printable in a useful way
        return (
            f"Grid(rank={self.rank}/{self.world_size}, seq={self.seq_rank}/{self.seq_size}, "
            f"data={self.data_rank}/{self.data_size}, tp={self.tp_size}, layout={self.layout})"
        )


def initialize_grid(parallel) -> Grid:
    """Build Megatron's groups for `parallel` (a validated `config.ParallelConfig`: its sizes
    are all this reads) on the already-initialised default group.

    The mode decides how the degree N maps onto Megatron (its `Mode.degree_group`): LSS and
    Ulysses use a context-parallel group of size N (the sequence group), nvidia-sp a
    tensor-parallel group of size N, serial neither. Every group gets the run's collective
    timeout.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_grid: torch.distributed is not initialised")
    if dist.get_world_size() != parallel.world_size:
        raise RuntimeError(
            f"initialize_grid: world size {dist.get_world_size()} != configured {parallel.world_size}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=parallel.dist_timeout_s / 60.0,
    )
    grid = Grid(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        seq_group=ps.get_context_parallel_group(),
        seq_rank=ps.get_context_parallel_rank(),
        seq_size=ps.get_context_parallel_world_size(),
        data_group=ps.get_data_parallel_group(),
        data_rank=ps.get_data_parallel_rank(),
        data_size=ps.get_data_parallel_world_size(),
        grad_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_group=ps.get_tensor_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        layout=parallel.lss_layout,
        kv_gather_chunks=parallel.kv_gather_chunks,
        lss_save_kv=parallel.lss_save_kv,
        lss_kv_gather=parallel.lss_kv_gather,
        lss_overlap=parallel.lss_overlap,
        tp_size=ps.get_tensor_model_parallel_world_size(),
    )
    # collectives that Megatron or DeepSpeed issue on these groups are counted by category
    comm.tag_group(grid.seq_group, "sp")
    comm.tag_group(grid.tp_group, "sp")
    comm.tag_group(grid.data_group, "grad")
    comm.tag_group(grid.grad_group, "grad")
    return grid


def destroy_grid() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
