"""LSS x tensor parallelism: N sequence ranks x T tensor-parallel ranks x D replicas, exact.

Megatron's TP with ``sequence_parallel`` runs inside each sequence rank (on its l/N tokens), LSS
over the context-parallel group. One training step of the trainer's own path (`build_model`,
`step_micro_batches`, `forward_backward`, `GradientAverager`) at (N, T, D) = (2, 2, 1) on 4 ranks
and (2, 2, 2) on 8 ranks, against the one-process model (Megatron's stock local spec): the loss,
the per-token losses at each rank's global positions, and EVERY gradient, once the T shards of a
tensor-parallel weight are concatenated along Megatron's partition dimension and each position
slice is matched to the rows of its global positions.

Tolerance: 1e-5 absolute (fp32 on CPU: different kernels and reduction orders, observed ~1e-7),
and, because many gradients here are small (|g| << 1), also 1e-4 relative to each tensor's
largest reference entry (observed ~1e-6), so a small gradient cannot pass by being small.
The K/V all-gather moves only this rank's h_kv / T heads: its local buffer is [l/N, b, 2 h_kv/T, d].
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import GLOBAL_BATCH, MICRO_BATCH, MODEL, SEED, TOL, model_worker, run_ranks

REL_TOL = 1e-4


def _tp_worker(rank, world, layouts):
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.lss import kv_gather
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.lss.positions import local_positions
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.parallel.params import ROWS_ATTR
    from lss_megatron.training.micro_batches import (
        forward_backward,
        global_mean_loss,
        step_micro_batches,
    )

    gathered = []
    start = kv_gather.comm.start_all_gather_dim0

    def spy(x, group, *, category):  # what the fused K/V all-gather moves
        gathered.append((tuple(x.shape), group.size()))
        return start(x, group, category=category)

    kv_gather.comm.start_all_gather_dim0 = spy
    out = []
    for n, t, d, pos, layout, *options in layouts:  # options: save_kv, overlap
        cfg = RunConfig(
            model=ModelConfig(position_embedding=pos, **MODEL),
            parallel=ParallelConfig(
                mode="lss",
                world_size=world,
                seq_parallel=n,
                tensor_parallel=t,
                data_parallel=d,
                lss_layout=layout,
                lss_save_kv=options[0] if options else "gathered",
                lss_overlap=len(options) > 1 and options[1] == "overlap",
            ),
            train=TrainConfig(
                global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, seed=SEED
            ),
        ).validate()
        grid = initialize_grid(cfg.parallel)
        model = build_model(cfg.model, grid, mode="lss", seed=SEED)
        gathered.clear()
        local_loss, tokens = forward_backward(
            model, step_micro_batches(cfg, grid, step=1), return_token_losses=True
        )
        GradientAverager(model, grid)()
        out.append(
            {
                "layout": (n, t, d, pos, layout, *options),
                "loss": global_mean_loss(local_loss, grid),
                "seq_rank": grid.seq_rank,
                "tp_rank": grid.tp_rank,
                "data_rank": grid.data_rank,
                "positions": local_positions(MODEL["seq_length"], grid.seq_rank, n, layout).numpy(),
                "tokens": tokens.numpy().copy(),
                "grads": {k: p.grad.numpy().copy() for k, p in model.named_parameters()},
                "tp_dims": {
                    k: p.partition_dim
                    for k, p in model.named_parameters()
                    if getattr(p, "tensor_model_parallel", False)
                },
                "rows": {
                    k: getattr(p, ROWS_ATTR).numpy()
                    for k, p in model.named_parameters()
                    if hasattr(p, ROWS_ATTR)
                },
                "gathered": sorted(set(gathered)),
                "sequence_parallel": bool(model.config.sequence_parallel),
                "tp_size": model.config.tensor_model_parallel_size,
            }
        )
        destroy_grid()
    return out


def _close(got, want, tag):
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    assert err < TOL, f"{tag}: max error {err:.2e}"
    assert scale == 0 or err / scale < REL_TOL, f"{tag}: relative error {err / scale:.2e}"


def check_tp(ref, ranks, n, t, d, pos):
    """`ranks` of one (N, T, D) run against the one-process `ref`."""
    assert len(ranks) == n * t * d
    kv_local = MODEL["num_kv_heads"] // t
    per = GLOBAL_BATCH // d
    for r in ranks:
        tag = f"N={n} T={t} D={d} {pos} seq={r['seq_rank']} tp={r['tp_rank']} dp={r['data_rank']}"
        assert r["sequence_parallel"] and r["tp_size"] == t, tag
        assert abs(r["loss"] - ref["loss"]) < TOL, f"{tag}: loss {r['loss']} vs {ref['loss']}"
        rows = slice(r["data_rank"] * per, (r["data_rank"] + 1) * per)
        _close(r["tokens"], ref["token_losses"][rows][:, r["positions"]], f"{tag}: token losses")
        # one gather per layer of [l/N, b, 2 h_kv/T, d] over the N ranks of the sequence group
        seg, hd = MODEL["seq_length"] // n, MODEL["hidden_size"] // MODEL["num_heads"]
        assert r["gathered"] == [((seg, MICRO_BATCH, 2 * kv_local, hd), n)], (tag, r["gathered"])
    for s in range(n):
        for dr in range(d):
            shards = sorted(
                (r for r in ranks if (r["seq_rank"], r["data_rank"]) == (s, dr)),
                key=lambda r: r["tp_rank"],
            )
            assert [r["tp_rank"] for r in shards] == list(range(t))
            tag = f"N={n} T={t} D={d} {pos} seq={s} dp={dr}"
            assert shards[0]["tp_dims"], f"{tag}: no tensor-parallel parameters"
            assert set(shards[0]["grads"]) == set(ref["grads"]), tag
            for name, want in ref["grads"].items():
                dim = shards[0]["tp_dims"].get(name)
                if dim is None:  # not split over TP: every TP rank holds the same gradient
                    full = shards[0]["grads"][name]
                    for r in shards[1:]:
                        _close(r["grads"][name], full, f"{tag}: {name} across TP ranks")
                else:
                    full = np.concatenate([r["grads"][name] for r in shards], axis=dim)
                if name in shards[0]["rows"]:  # a position slice: its global rows
                    want = want[shards[0]["rows"][name]]
                _close(full, want, f"{tag}: gradient {name}")


@pytest.fixture(scope="module")
def reference():
    layouts = [(1, 1, p, "serial") for p in ("learned", "rope")]
    return {r["layout"][2]: r for r in run_ranks(model_worker, 1, layouts, timeout=120)[0]}


def _runs(world, layouts):
    out: dict = {}
    for per_rank in run_ranks(_tp_worker, world, layouts, timeout=500):
        for r in per_rank:
            out.setdefault(r["layout"], []).append(r)
    return out


LAYOUTS4 = [
    (2, 2, 1, "learned", "contiguous"),
    (2, 2, 1, "rope", "zigzag"),
    (2, 2, 1, "learned", "zigzag", "local", "overlap"),  # K/V local, re-gathered; overlapped
]
LAYOUTS8 = [(2, 2, 2, "learned", "zigzag"), (2, 2, 2, "rope", "contiguous")]


@pytest.mark.timeout(600)
@pytest.mark.slow  # ~22 s idle with its reference (4 ranks); the slow tier holds every LSS x TP check
def test_lss_x_tp_n2_t2_d1(reference):
    """4 ranks: learned contiguous, RoPE zigzag, learned zigzag with --lss-save-kv local and
    --lss-overlap (the backward re-gather moves the same [l/N, b, 2 h_kv/T, d] buffers)."""
    runs = _runs(4, LAYOUTS4)
    for layout in LAYOUTS4:
        n, t, d, pos = layout[:4]
        check_tp(reference[pos], runs[layout], n, t, d, pos)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lss_x_tp_n2_t2_d2(reference):
    """8 ranks: the data replicas on top (gradient group N x D per TP rank)."""
    runs = _runs(8, LAYOUTS8)
    for layout in LAYOUTS8:
        n, t, d, pos = layout[:4]
        check_tp(reference[pos], runs[layout], n, t, d, pos)
