"""The ring's schedule (`baselines/ring_attention.py`), without ranks: over its N steps, the kernel calls of
each rank cover every visible (query, key) pair exactly once and nothing masked (causal), or
everything (not causal), for both layouts; fully masked blocks are skipped."""

from __future__ import annotations

import numpy as np
import pytest

from lss_megatron.baselines.ring_attention import chunk_ids, step_tasks
from lss_megatron.layout import segment_chunks


def _positions(seq, rank, n, layout):
    return np.concatenate([np.arange(lo, hi) for lo, hi in segment_chunks(seq, rank, n, layout)])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_steps_cover_each_visible_pair_once(n, causal, layout):
    seq = 2 * n * 3  # chunks of 3 (zigzag) or 6 (contiguous) tokens
    for r in range(n):
        qpos = _positions(seq, r, n, layout)
        c = len(qpos) // len(chunk_ids(r, n, layout))
        seen = np.zeros((len(qpos), seq), dtype=int)  # local query x global key
        calls = 0
        for t in range(n):
            src = (r - t) % n
            kpos = _positions(seq, src, n, layout)
            tasks = step_tasks(chunk_ids(r, n, layout), chunk_ids(src, n, layout), c, causal)
            calls += len(tasks)
            for rows, keys, diag in tasks:
                block = np.ones((rows.stop - rows.start, keys.stop - keys.start), dtype=int)
                if diag:  # a square causal block: both ranges are the same global positions
                    assert (qpos[rows] == kpos[keys]).all()
                    block = np.tril(block)
                seen[np.ix_(np.arange(len(qpos))[rows], kpos[keys])] += block
        visible = qpos[:, None] >= np.arange(seq)[None, :] if causal else np.ones_like(seen)
        assert (seen == visible).all(), f"N={n} rank {r}"
        if not causal:
            assert calls == n  # one call per step
        elif layout == "zigzag":
            assert calls == n + 2  # every block but the own one in ONE call (half of it)
        else:
            assert calls == r + 1  # blocks of later ranks are skipped


@pytest.mark.parametrize("recompute,forwards", [("none", 1), ("selective", 2), ("full", 2)])
def test_cost_model_counts_the_ring_as_its_blocks(recompute, forwards):
    """The cost model's ring traffic, against a count written from the algorithm: per layer and
    micro-batch, N-1 [K | V] blocks per forward (again under recompute) and 2 (N-1) backward
    (K/V and dK/dV), each an isend of (l/N) b 2 h_kv d es bytes plus a 0-byte irecv. The
    trainer's counters equal the same closed form (tests/ranks/test_ring.py, test_ring_model.py)
    and the cost model every counted byte (tests/ranks/test_like_for_like.py)."""
    from analysis.costmodel import make_config, predict

    n, d, layers, seq, kv_heads, head_dim = 4, 2, 3, 512, 2, 16
    cfg = make_config(
        "ring",
        n,
        d,
        recompute=recompute,
        num_layers=layers,
        hidden_size=8 * head_dim,
        num_heads=8,
        num_kv_heads=kv_heads,
        seq_length=seq,
        global_batch_size=4 * d,
        micro_batch_size=1,
    )
    pred = predict(cfg)
    micro = 4  # micro-batches per replica: G / D at micro-batch 1
    block = seq // n * 1 * 2 * kv_heads * head_dim * 4  # fp32
    shifts = micro * layers * (forwards + 2) * (n - 1)
    assert pred["sp_comm_bytes"] == shifts * block
    assert pred["sp_comm_calls"] == 2 * shifts  # isend + irecv
