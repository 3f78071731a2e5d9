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
"""

from __future__ import annotations

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import SEQUENCE_LOCAL, grad_is_tp_partial, param_kind

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

    def _reduce(self, buckets, group, scale: float) -> None:
        for bucket in buckets:
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # [sum numel]
            comm.all_reduce_(flat, group, category="grad")
            flat.mul_(scale)
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                p.grad.copy_(g.view_as(p.grad))

    def __call__(self) -> None:
        g = self.grid
        self._reduce(self.tp_sum_buckets, g.tp_group, 1.0)
        p_ranks = g.seq_size * g.data_size
        self._reduce(self.replicated_buckets, g.grad_group, 1.0 / p_ranks)
        self._reduce(self.local_buckets, g.data_group, 1.0 / p_ranks)

    @property
    def num_collectives(self) -> int:
        """All-reduces issued per call (groups of one rank issue none)."""
        g = self.grid
        n = len(self.replicated_buckets) if g.seq_size * g.data_size > 1 else 0
        n += len(self.tp_sum_buckets)
        return n + (len(self.local_buckets) if g.data_size > 1 else 0)
