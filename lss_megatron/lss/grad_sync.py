"""Double gradient averaging, once per step after backward.

Every rank's loss is the mean over its own tokens, and every rank holds the same number of tokens,
so the global per-token mean loss is the average over all P = N x D ranks of the local losses.
Hence:

* every other parameter (replicated, or a tensor-parallel shard, which the data replicas hold
  alike): average over the sequence group, then over the data group. Both are
  means over disjoint rank sets, i.e. one mean over all P ranks: ONE bucketed all-reduce over the
  gradient group (data-parallel with context-parallel), in buckets of at most `bucket_bytes`;
* sequence-local parameters (the position slice of segment n, `parallel.params.param_kind`):
  only the D ranks holding segment n have it. The global gradient is (1/P) * sum over those D
  ranks = (1/N) * mean over the data group: one bucketed all-reduce over the data group, then
  a 1/(N*D) scale.

Before that, parameters tagged ``sequence_parallel`` (Megatron's LayerNorms and row-parallel
biases under NVIDIA sequence parallelism, tensor parallelism > 1) have their gradients SUMMED over
the tensor-parallel group, since each tensor-parallel rank saw only l/N tokens (what Megatron's
`finalize_model_grads` does). In LSS and serial runs there are none.

Gradients that are None (a parameter unused this step) are zero-filled first, so every rank issues
the same buckets and no collective can mismatch.

Megatron-LM's own step (docs/megatron-lm.md) does the first half itself: its
`DistributedDataParallel` averages every gradient over the data x context group and
`finalize_model_grads` sums the ``sequence_parallel`` ones over the tensor-parallel group. The
position slices must stay out of that average (their rows differ across the context group):
build the DDP wrapper inside `kept_out_of_ddp(model)`, and after `finalize_model_grads` call
`finalize_position_grads(model)`, the second half above.
"""

from __future__ import annotations

import contextlib

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import SEQUENCE_LOCAL, grad_is_tp_partial, is_sequence_local, param_kind

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Group params (same dtype per bucket) in reverse order (backward order), <= bucket_bytes."""
    buckets: list[list[torch.nn.Parameter]] = []
    cur: list[torch.nn.Parameter] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if cur and (size + nbytes > bucket_bytes or p.dtype != cur[0].dtype):
            buckets.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def _reduce(buckets, group, scale: float) -> None:
    """All-reduce (sum) each bucket's gradients over `group` as one flat tensor, then scale."""
    for bucket in buckets:
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # [sum numel]
        comm.all_reduce_(flat, group, category="grad")
        flat.mul_(scale)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad.copy_(g.view_as(p.grad))


class GradientAverager:
    """Averages gradients over the grid as described above. Build once, call after backward."""

    def __init__(
        self, model: torch.nn.Module, grid: Grid, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ):
        params = [p for p in model.parameters() if p.requires_grad]
        self.grid = grid
        is_local = [param_kind(p, grid.tp_size).kind == SEQUENCE_LOCAL for p in params]
        local = [p for p, loc in zip(params, is_local, strict=True) if loc]
        replicated = [p for p, loc in zip(params, is_local, strict=True) if not loc]
        tp_partial = [p for p in params if grad_is_tp_partial(p, grid.tp_size)]
        self.tp_sum_buckets = _buckets(tp_partial, bucket_bytes)
        self.replicated_buckets = _buckets(replicated, bucket_bytes)
        self.local_buckets = _buckets(local, bucket_bytes)

    def __call__(self) -> None:
        g = self.grid
        _reduce(self.tp_sum_buckets, g.tp_group, 1.0)
        p_ranks = g.seq_size * g.data_size
        _reduce(self.replicated_buckets, g.grad_group, 1.0 / p_ranks)
        _reduce(self.local_buckets, g.data_group, 1.0 / p_ranks)

    @property
    def num_collectives(self) -> int:
        """All-reduces issued per call (groups of one rank issue none)."""
        g = self.grid
        n = len(self.replicated_buckets) if g.seq_size * g.data_size > 1 else 0
        n += len(self.tp_sum_buckets)
        return n + (len(self.local_buckets) if g.data_size > 1 else 0)


# --- on top of Megatron-LM's own gradient finalisation (docs/megatron-lm.md) --------------------
def sequence_local_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters whose rows differ across the context-parallel group (position slices)."""
    return [p for p in model.parameters() if is_sequence_local(p)]


@contextlib.contextmanager
def kept_out_of_ddp(model: torch.nn.Module):
    """Build Megatron's `DistributedDataParallel` inside this block: the position slices are
    then not in its buffers (it registers only parameters that require grad), so it does not
    average them over data x context. Their gradients stay in ``.grad``."""
    params = [p for p in sequence_local_parameters(model) if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(True)


def finalize_position_grads(model: torch.nn.Module, data_group=None, context_size=None) -> int:
    """After Megatron's `finalize_model_grads`: the global gradient of each position slice,
    ``(1 / (N D)) * sum over the D data-parallel ranks holding the same rows``. Groups default
    to Megatron's data-parallel group (without context) and context-parallel size. Returns the
    number of slices reduced."""
    from megatron.core import parallel_state as ps

    params = sequence_local_parameters(model)
    if any(hasattr(p, "main_grad") for p in params):
        raise RuntimeError(
            "finalize_position_grads: a position slice is in Megatron's DDP buffers, which "
            "averaged it over data x context (rows of different positions); build the DDP "
            "wrapper inside lss_megatron.lss.grad_sync.kept_out_of_ddp(model)"
        )
    group = data_group if data_group is not None else ps.get_data_parallel_group()
    n = context_size if context_size is not None else ps.get_context_parallel_world_size()
    _reduce(_buckets(params, DEFAULT_BUCKET_BYTES), group, 1.0 / (n * comm.group_size(group)))
    return len(params)
