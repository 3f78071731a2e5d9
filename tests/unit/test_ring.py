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
