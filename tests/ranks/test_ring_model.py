"""Ring attention (`--mode ring`) on the same Megatron GPT model: exact against one process.

The reference is Megatron's stock local GPT spec (its own `DotProductAttention`) in one process,
with the same seed and global batch (G = 4 sequences, micro-batches of 1, GQA h = 8, h_kv = 4).
The ring runs on (N, D) in {(2, 1), (4, 1), (2, 2)}, contiguous and zigzag segments, learned
(sequence-distributed rows) and RoPE (global positions) positions, flash and dense blocks, causal
and bidirectional. After double gradient averaging, the loss, every replicated gradient, each
rank's position rows' gradient (the rows of its chunks) and the per-token losses equal the
reference's within 1e-5 (fp32 on CPU), and each gradient within 1e-3 of its largest entry: only
kernels and reduction orders differ (observed ~1e-7). Traffic: the sequence group carries only
isend/irecv (category sp), 3 (N-1) [K | V] blocks per layer and micro-batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support import GLOBAL_BATCH, MODEL, REL_TOL, SEED, TOL, run_ranks

# (N, D, positions, layout, kernel, causal)
LAYOUTS = {
    2: [
        (2, 1, "learned", "contiguous", "flash", True),
        (2, 1, "rope", "zigzag", "flash", True),
        (2, 1, "learned", "zigzag", "dense", True),
        (2, 1, "rope", "contiguous", "dense", True),
        (2, 1, "learned", "contiguous", "flash", False),
    ],
    4: [
        (4, 1, "learned", "zigzag", "flash", True),
        (4, 1, "rope", "contiguous", "flash", True),
        (2, 2, "learned", "contiguous", "flash", True),
        (2, 2, "rope", "zigzag", "dense", True),
    ],
}


def _worker(rank, world, layouts):
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.lss.positions import local_positions
    from lss_megatron.model import build_model
    from lss_megatron.parallel import comm
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training.micro_batches import (
        forward_backward,
        global_mean_loss,
        step_micro_batches,
    )

    out = []
    for layout in layouts:
        n, d, pos, seg_layout, kernel, causal = layout
        mode = "serial" if n == 1 else "ring"
        cfg = RunConfig(
            model=ModelConfig(position_embedding=pos, causal=causal, **MODEL),
            parallel=ParallelConfig(
                mode=mode, world_size=world, seq_parallel=n, data_parallel=d, lss_layout=seg_layout
            ),
            train=TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=1, seed=SEED),
        ).validate()
        grid = initialize_grid(cfg.parallel)
        model = build_model(cfg.model, grid, mode=mode, seed=SEED, kernel=kernel)
        micro = step_micro_batches(cfg, grid, step=1)
        with comm.record() as log:
            local, tokens = forward_backward(model, micro, return_token_losses=True)
        GradientAverager(model, grid)()
        idx = local_positions(MODEL["seq_length"], grid.seq_rank, n, seg_layout).numpy()
        out.append(
            {
                "layout": layout,
                "tag": f"{layout} seq_rank={grid.seq_rank} data_rank={grid.data_rank}",
                "loss": global_mean_loss(local, grid),
                "grads": {k: p.grad.numpy().copy() for k, p in model.named_parameters()},
                "tokens": tokens.numpy().copy(),  # [G/D, l/N]
                "positions": idx,
                "data_rank": grid.data_rank,
                "sp": (log.nbytes("sp"), log.count("isend", "sp"), log.count(category="sp")),
                "block": MODEL["seq_length"] // n * 2 * MODEL["num_kv_heads"] * 4 * 4,  # b=1, d=4
            }
        )
        destroy_grid()
    return out


def _check(ref, r):
    tag = r["tag"]
    n, d = r["layout"][:2]
    assert abs(r["loss"] - ref["loss"]) < TOL, f"{tag}: loss {r['loss']} vs {ref['loss']}"
    assert set(r["grads"]) == set(ref["grads"]), tag
    for name, g in r["grads"].items():
        want = ref["grads"][name]
        if name == "embedding.position_embeddings.weight":
            want = want[r["positions"]]  # this rank's rows (its chunks) of the table
        err = float(np.abs(g - want).max())
        assert err < TOL, f"{tag}: grad {name} max error {err:.3e}"
        assert err <= REL_TOL * np.abs(want).max(), f"{tag}: grad {name} relative error"
    per = GLOBAL_BATCH // d
    rows = slice(r["data_rank"] * per, (r["data_rank"] + 1) * per)
    err = float(np.abs(r["tokens"] - ref["tokens"][rows][:, r["positions"]]).max())
    assert err < TOL, f"{tag}: token losses max error {err:.3e}"
    micro, layers = per, MODEL["num_layers"]
    shifts = 3 * (n - 1) * layers * micro
    assert r["sp"] == (shifts * r["block"], shifts, 2 * shifts), f"{tag}: sp traffic {r['sp']}"


def _reference():
    refs = [
        (1, 1, pos, "contiguous", "dense", causal)
        for pos, causal in (("learned", True), ("rope", True), ("learned", False))
    ]
    res = run_ranks(_worker, 1, refs, timeout=300)[0]
    return {(r["layout"][2], r["layout"][5]): r for r in res}


class _Runs(dict):
    """ "ref": the one-process runs; world -> the per-rank results of its layouts (world 4 runs on
    first use)."""

    def __missing__(self, world):
        self[world] = run_ranks(_worker, world, LAYOUTS[world], timeout=300)
        return self[world]


@pytest.fixture(scope="module")
def runs():
    with ThreadPoolExecutor(2) as pool:  # the 1-process reference alongside the 2 ranks
        ref = pool.submit(_reference)
        two = pool.submit(run_ranks, _worker, 2, LAYOUTS[2], timeout=300).result()
        out = _Runs(ref=ref.result())
    out[2] = two
    return out


def _check_world(runs, world):
    for rank_results in runs[world]:
        for r in rank_results:
            _check(runs["ref"][(r["layout"][2], r["layout"][5])], r)


@pytest.mark.slow  # over ~10 s: the fast tier stays under 5 min
@pytest.mark.timeout(400)
def test_ring_model_n2_matches_one_process(runs):
    """N = 2: contiguous and zigzag, learned and RoPE, flash and dense, causal and not."""
    _check_world(runs, 2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ring_model_n4_and_data_parallel_match_one_process(runs):
    """N = 4 (zigzag learned, contiguous RoPE) and N = 2 x D = 2 (contiguous, zigzag dense)."""
    _check_world(runs, 4)
