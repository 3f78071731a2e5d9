"""Run-time invariants of the parallel layout, checked collectively.

`check_replicas`: replicated parameters must be bitwise identical on all P ranks, each
sequence-local parameter (a position slice) identical on the D ranks that hold the same segment,
and each tensor-parallel shard identical on the ranks that hold the same shard.
A mismatch means gradient averaging went wrong; the trainer fails the run when it sees one.
"""

from __future__ import annotations

import hashlib

import torch

from . import comm
from .grid import Grid
from .positions import is_sequence_local


def parameter_digests(model) -> dict[str, str]:
    """sha1 of every parameter's bytes (any dtype, bf16 included), by name."""
    return {
        name: hashlib.sha1(
            p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for name, p in model.named_parameters()
    }


def _shard_key(p, seq_rank: int, tp_rank: int) -> tuple:
    """Ranks with equal keys must hold bitwise-equal copies of this parameter."""
    return (
        seq_rank if is_sequence_local(p) else None,
        tp_rank if getattr(p, "tensor_model_parallel", False) else None,
    )


def check_replicas(model, grid: Grid) -> dict:
    """Compare parameter digests across ranks; returns a summary, identical on every rank."""
    keys = {n: _shard_key(p, grid.seq_rank, grid.tp_rank) for n, p in model.named_parameters()}
    everyone = comm.all_gather_object((keys, parameter_digests(model)), None)
    mismatched = []
    for name in keys:
        copies: dict[tuple, set] = {}
        for their_keys, digests in everyone:
            copies.setdefault(their_keys[name], set()).add(digests[name])
        if any(len(v) > 1 for v in copies.values()):
            mismatched.append(name)
    return {
        "replicated_params": sum(k == (None, None) for k in keys.values()),
        "sharded_params": sum(k != (None, None) for k in keys.values()),
        "bitwise_equal": not mismatched,
        "mismatched": sorted(mismatched),
    }
