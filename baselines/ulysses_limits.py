"""What DeepSpeed-Ulysses cannot run, as messages.

Pure Python (no torch import) so the trainer can reject a configuration before any process group
is built. Ulysses turns a sequence segment of every head into the whole sequence of h/N heads
with an all-to-all, so the N ranks of a sequence group must split the query heads and the
key/value heads evenly (DeepSpeed's own uneven-head path needs its global sequence-parallel
groups and is not used here). LSS splits only the sequence, so it has no head cap.
"""

from __future__ import annotations

_HINT = "(Ulysses splits heads over the sequence group; LSS has no head cap: try --mode lss)"


def problems(model, n: int) -> list[str]:
    """Messages for `model` (a ModelConfig) at sequence-parallel degree `n`; empty if it runs."""
    p = []
    if n < 1:
        return p  # reported by ParallelConfig
    if model.num_heads % n:
        p.append(
            f"--mode ulysses: --num-heads {model.num_heads} is not divisible by N = {n} {_HINT}"
        )
    if model.kv_heads % n:
        p.append(
            f"--mode ulysses: --num-kv-heads {model.kv_heads} is not divisible by N = {n} {_HINT}"
        )
    return p
