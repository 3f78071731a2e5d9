"""Which global positions a sequence rank holds: segment and zigzag arithmetic, torch-free.

Shared by the data (which tokens a rank reads), the positions (which rows of the position table
it keeps) and the operator (where the gathered keys sit). Pure integers: importing it is free.

* ``contiguous``: rank n of N holds the segment [n l/N, (n+1) l/N), as in the paper;
* ``zigzag`` (causal load balance): the sequence is cut into 2N chunks of l/(2N) and rank n holds
  chunks n and 2N-1-n, in that order, so every rank has one early (cheap) and one late (expensive)
  chunk of causal attention.
"""

from __future__ import annotations

LAYOUTS = ("contiguous", "zigzag")


def segment_bounds(seq_length: int, seq_rank: int, seq_size: int) -> tuple[int, int]:
    """Global positions ``[lo, hi)`` of segment `seq_rank` of `seq_size`."""
    if seq_size < 1 or seq_length % seq_size:
        raise ValueError(f"sequence length {seq_length} not divisible by N = {seq_size}")
    if not 0 <= seq_rank < seq_size:
        raise ValueError(f"segment {seq_rank} is not in 0..{seq_size - 1}")
    seg = seq_length // seq_size
    return seq_rank * seg, (seq_rank + 1) * seg


def segment_chunks(
    seq_length: int, seq_rank: int, seq_size: int, layout: str = "contiguous"
) -> list[tuple[int, int]]:
    """The global position ranges ``[(lo, hi), ...]`` rank `seq_rank` holds, in local order."""
    if layout == "contiguous":
        return [segment_bounds(seq_length, seq_rank, seq_size)]
    if layout != "zigzag":
        raise ValueError(f"unknown segment layout {layout!r}; expected one of {LAYOUTS}")
    if seq_length % (2 * seq_size):
        raise ValueError(
            f"zigzag needs the sequence length {seq_length} divisible by 2N = {2 * seq_size}"
        )
    c = seq_length // (2 * seq_size)
    a, b = seq_rank, 2 * seq_size - 1 - seq_rank
    return [(a * c, (a + 1) * c), (b * c, (b + 1) * c)]


def zigzag_gather_order(n: int) -> list[int]:
    """For each global chunk j of 2N, its slot in the rank-ordered gathered buffer (rank r
    contributes chunks r and 2N-1-r, in that order): j -> 2j for j < N, else 2(2N-1-j)+1."""
    return [2 * j if j < n else 2 * (2 * n - 1 - j) + 1 for j in range(2 * n)]


def attended_pairs(
    seq_length: int, seq_rank: int, seq_size: int, causal: bool, layout: str = "contiguous"
) -> int:
    """(query, key) pairs rank `seq_rank` computes for one sequence and one head: its share of
    the attention work (causal: a query at global position i attends i + 1 keys)."""
    if not causal:
        return seq_length * seq_length // seq_size
    return sum(
        (hi - lo) * lo + (hi - lo) * (hi - lo + 1) // 2
        for lo, hi in segment_chunks(seq_length, seq_rank, seq_size, layout)
    )
