"""Run-time invariants of the parallel layout, checked collectively.

`check_replicas`: replicated parameters must be bitwise identical on all P ranks, and each
sequence-local parameter (a position slice) identical on the D ranks that hold the same segment.
A mismatch means gradient averaging went wrong; the trainer fails the run when it sees one.
"""

from __future__ import annotations

import hashlib

from . import comm
from .grid import Grid
from .positions import is_sequence_local


def parameter_digests(model) -> dict[str, str]:
    """sha1 of every parameter's bytes, by name."""
    return {
        name: hashlib.sha1(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters()
    }


def check_replicas(model, grid: Grid) -> dict:
    """Compare parameter digests across ranks; returns a summary, identical on every rank."""
    local = {n: is_sequence_local(p) for n, p in model.named_parameters()}
    mine = (grid.seq_rank, parameter_digests(model))
    everyone = comm.all_gather_object(mine, None)
    mismatched = []
    for name, seq_local in local.items():
        if seq_local:
            groups: dict[int, set] = {}
            for seq_rank, digests in everyone:
                groups.setdefault(seq_rank, set()).add(digests[name])
            if any(len(v) > 1 for v in groups.values()):
                mismatched.append(name)
        elif len({digests[name] for _, digests in everyone}) > 1:
            mismatched.append(name)
    return {
        "replicated_params": sum(not v for v in local.values()),
        "sequence_local_params": sum(local.values()),
        "bitwise_equal": not mismatched,
        "mismatched": sorted(mismatched),
    }
