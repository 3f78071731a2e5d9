"""Run-time invariants of the parallel layout, checked collectively.

`check_replicas`: replicated parameters must be bitwise identical on all P ranks, each
sequence-local parameter (a position slice) identical on the D ranks that hold the same segment,
and each tensor-parallel shard identical on the ranks that hold the same shard
(`parallel.params.param_kind`).
A mismatch means gradient averaging went wrong; the trainer fails the run when it sees one.
"""

from __future__ import annotations

import hashlib

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import REPLICATED, SEQUENCE_LOCAL, param_kind


def parameter_digests(model) -> dict[str, str]:
    """sha1 of every parameter's bytes (any dtype, bf16 included), by name."""
    return {
        name: hashlib.sha1(
            p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for name, p in model.named_parameters()
    }


def _shard_key(p, grid: Grid) -> tuple | None:
    """Ranks with equal keys must hold bitwise-equal copies of this parameter (None: all ranks)."""
    kind = param_kind(p, grid.tp_size).kind
    if kind == REPLICATED:
        return None
    return (kind, grid.seq_rank if kind == SEQUENCE_LOCAL else grid.tp_rank)


def check_replicas(model, grid: Grid) -> dict:
    """Compare parameter digests across ranks; returns a summary, identical on every rank."""
    keys = {n: _shard_key(p, grid) for n, p in model.named_parameters()}
    everyone = comm.all_gather_object((keys, parameter_digests(model)), None)
    mismatched = []
    for name in keys:
        copies: dict[tuple, set] = {}
        for their_keys, digests in everyone:
            copies.setdefault(their_keys[name], set()).add(digests[name])
        if any(len(v) > 1 for v in copies.values()):
            mismatched.append(name)
    return {
        "replicated_params": sum(k is None for k in keys.values()),
        "sharded_params": sum(k is not None for k in keys.values()),
        "bitwise_equal": not mismatched,
        "mismatched": sorted(mismatched),
    }
