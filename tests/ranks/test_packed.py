"""Packed documents (Megatron-LM's --reset-position-ids, --reset-attention-mask, --eod-mask-loss):
every mode against serial on a packed Megatron indexed dataset (JSONL documents + EOD).

The reference is serial with Megatron's own `DotProductAttention` fed Megatron's own masks and
position ids (`_get_ltor_masks_and_position_ids`, `data.documents.megatron_masks`); the parallel
modes use the global document starts (`doc_start`) instead: lss contiguous / zigzag / K/V in head
chunks / dense kernel / x TP, nvidia-sp (flash and Megatron's dense), ulysses, ring (contiguous /
zigzag / dense blocks / RoPE; with DP), at 2 and 4 ranks (the ring at N = 2 also in the fast tier).
Documents of 1..90 tokens cross segment and sequence boundaries (asserted on the batch).
Tolerance: fp32 on CPU, 1e-5 absolute (gradients also 1e-3 of their largest entry), as
tests/support.py: only kernels and reduction orders differ.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import run_ranks

TOL, REL_TOL = 1e-5, 1e-3
L, G, SEED = 32, 4, 11
FLAGS = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)


@pytest.fixture(scope="module")
def packed_prefix(tmp_path_factory):
    from lss_megatron.data.make_indexed import make_indexed

    folder = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(3)
    lines = []
    for i in range(120):
        n = int(rng.choice([1, 3, 5, 9, 14, 20, 40, 90]))
        text = "".join(chr(int(c)) for c in rng.integers(97, 123, n))
        lines.append(json.dumps({"text": text if i % 17 else ""}))  # a few empty documents
    src = folder / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    stats: dict = {}
    make_indexed(src, folder / "docs", json_key="text", append_eod=True, stats=stats)
    assert stats["empty_documents"] == 8
    return str(folder / "docs")


def _cfg(
    prefix,
    world,
    mode,
    n,
    *,
    d=None,
    t=1,
    layout="contiguous",
    chunks=1,
    kernel="flash",
    pos="learned",
    flags=FLAGS,
):
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(
            num_layers=2,
            hidden_size=32,
            num_heads=8,
            num_kv_heads=4,
            seq_length=L,
            vocab_size=257,
            make_vocab_size_divisible_by=8,
            position_embedding=pos,
        ),
        parallel=ParallelConfig(
            mode=mode,
            world_size=world,
            seq_parallel=n,
            data_parallel=d,
            tensor_parallel=t,
            lss_layout=layout,
            kv_gather_chunks=chunks,
        ),
        train=TrainConfig(
            global_batch_size=G,
            micro_batch_size=1,
            seed=SEED,
            data="megatron",
            data_path=prefix,
            attention_kernel=kernel,
            **flags,
        ),
    ).validate()


def _worker(rank, world, prefix, runs):
    from lss_megatron.layout import segment_chunks
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training.micro_batches import (
        forward_backward,
        global_mean_loss,
        step_micro_batches,
    )

    out = []
    for name, kw in runs:
        cfg = _cfg(prefix, world, **kw)
        grid = initialize_grid(cfg.parallel)
        model = build_model(
            cfg.model,
            grid,
            mode=cfg.parallel.mode,
            seed=SEED,
            kernel=cfg.train.attention_kernel,
            reset_position_ids=cfg.train.reset_position_ids,
        )
        micro = step_micro_batches(cfg, grid, step=2)
        local, tok = forward_backward(model, micro, return_token_losses=True)
        GradientAverager(model, grid)()
        held = [
            p
            for lo, hi in segment_chunks(L, grid.seq_rank, grid.seq_size, grid.layout)
            for p in range(lo, hi)
        ]
        crossing = 0
        if len(micro[0]) == 5 and micro[0][4] is not None and micro[0][4].dim() == 2:
            for mb in micro:  # documents that began before this rank's first position
                crossing += int((mb[4][:, held[0]] < held[0]).sum())
        out.append(
            {
                "name": name,
                "loss": global_mean_loss(local, grid),
                "grads": {k: p.grad.numpy().copy() for k, p in model.named_parameters()},
                "tp_dims": {
                    k: p.partition_dim
                    for k, p in model.named_parameters()
                    if getattr(p, "tensor_model_parallel", False)
                },
                "tp": (grid.tp_rank, grid.tp_size),
                "tokens": tok.numpy().copy(),
                "held": held,
                "data_rank": grid.data_rank,
                "data_size": grid.data_size,
                "crossing": crossing,
                "eods": sum(int((mb[0] == 256).sum()) for mb in micro),
            }
        )
        destroy_grid()
    return out


def _runs(world):
    n = world
    runs = [
        ("lss", dict(mode="lss", n=n)),
        ("lss-zigzag", dict(mode="lss", n=n, layout="zigzag")),
        ("lss-chunks", dict(mode="lss", n=n, chunks=2)),
        ("lss-dense", dict(mode="lss", n=n, kernel="dense")),
        ("lss-rope", dict(mode="lss", n=n, pos="rope")),
        ("nvidia-sp", dict(mode="nvidia-sp", n=n)),
        ("nvidia-sp-dense", dict(mode="nvidia-sp", n=n, kernel="dense")),
        ("ulysses", dict(mode="ulysses", n=n)),
    ]
    if world == 2:  # the fast test below runs RING_FAST at N = 2
        runs += [r for r in RING_RUNS(2) if r not in RING_FAST]
    if world == 4:
        runs += [
            ("lss-N2-D2", dict(mode="lss", n=2, d=2)),
            ("lss-N2-T2", dict(mode="lss", n=2, t=2)),
            *RING_RUNS(4),
            ("ring-N2-D2-zigzag", dict(mode="ring", n=2, d=2, layout="zigzag")),
        ]
    return runs


def RING_RUNS(n):  # noqa: N802 - a table, as _runs
    return [
        ("ring", dict(mode="ring", n=n)),
        ("ring-zigzag", dict(mode="ring", n=n, layout="zigzag")),
        ("ring-dense", dict(mode="ring", n=n, kernel="dense")),
        ("ring-rope-zigzag", dict(mode="ring", n=n, pos="rope", layout="zigzag")),
    ]


RING_FAST = [RING_RUNS(2)[0], RING_RUNS(2)[3]]
"""The ring at N = 2 in the fast tier: contiguous with learned positions, zigzag with RoPE."""


def _check(ref, r, tag):
    assert abs(r["loss"] - ref["loss"]) < TOL, f"{tag}: loss {r['loss']} vs {ref['loss']}"
    tp_rank, tp_size = r["tp"]
    for name, g in r["grads"].items():
        want = ref["grads"][name]
        if name in r["tp_dims"]:
            want = np.split(want, tp_size, axis=r["tp_dims"][name])[tp_rank]
        err = np.abs(g - want).max()
        assert err < TOL, f"{tag}: grad {name} error {err:.2e}"
        assert err <= REL_TOL * np.abs(want).max(), f"{tag}: grad {name} relative error"
    per = G // r["data_size"]
    want = ref["tokens"][r["data_rank"] * per : (r["data_rank"] + 1) * per][:, r["held"]]
    err = np.abs(r["tokens"] - want).max()
    assert err < TOL, f"{tag}: token losses error {err:.2e}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_packed_documents_exact_in_every_mode(packed_prefix):
    ref_runs = [
        ("serial", dict(mode="serial", n=1, kernel="dense")),
        ("serial-rope", dict(mode="serial", n=1, kernel="dense", pos="rope")),
        ("serial-flash", dict(mode="serial", n=1)),
        ("serial-noflags", dict(mode="serial", n=1, kernel="dense", flags={})),
        (
            "serial-nomask",
            dict(
                mode="serial", n=1, kernel="dense", flags={**FLAGS, "reset_attention_mask": False}
            ),
        ),
    ]
    ref = {r["name"]: r for r in run_ranks(_worker, 1, packed_prefix, ref_runs)[0]}
    assert ref["serial"]["eods"] > 4, "the batch holds several documents"
    # the flags change the loss (masked EOD predictions, per-document attention and positions)
    assert abs(ref["serial"]["loss"] - ref["serial-noflags"]["loss"]) > 1e-3
    assert abs(ref["serial"]["loss"] - ref["serial-nomask"]["loss"]) > 1e-3, "the mask matters"
    _check(ref["serial"], ref["serial-flash"], "serial flash (doc tiles) vs Megatron's mask")
    for world in (2, 4):
        results = run_ranks(_worker, world, packed_prefix, _runs(world), timeout=400)
        crossing = {}
        for rank_results in results:
            for r in rank_results:
                base = ref["serial-rope" if "rope" in r["name"] else "serial"]
                _check(base, r, f"P={world} {r['name']} held {r['held'][0]}..")
                crossing[r["name"]] = crossing.get(r["name"], 0) + r["crossing"]
        assert crossing["lss"] > 0, "some document crosses a segment boundary"


@pytest.mark.timeout(300)
def test_ring_packed_documents_exact_n2(packed_prefix):
    """The ring with the three flags at N = 2 (`RING_FAST`; zigzag with learned positions and
    dense blocks: the slow test above, with N = 4), in ONE spawn of 2 ranks whose first runs are the references: serial with Megatron's own mask and
    position ids (dense `DotProductAttention`), on the same 2 ranks as data parallelism (D = 2:
    the global loss and averaged gradients are one process's)."""
    runs = [
        ("serial", dict(mode="serial", n=1, kernel="dense")),
        ("serial-rope", dict(mode="serial", n=1, kernel="dense", pos="rope")),
        *RING_FAST,
    ]
    results = run_ranks(_worker, 2, packed_prefix, runs, timeout=280)
    by_name: dict = {}
    for rank_results in results:
        for r in rank_results:
            by_name.setdefault(r["name"], []).append(r)
    ref = {}
    for name in ("serial", "serial-rope"):
        parts = sorted(by_name[name], key=lambda r: r["data_rank"])
        ref[name] = {**parts[0], "tokens": np.concatenate([p["tokens"] for p in parts])}
    crossing = {}
    for name, parts in by_name.items():
        if not name.startswith("ring"):
            continue
        base = "serial-rope" if "rope" in name else "serial"
        for r in parts:
            _check(ref[base], r, f"P=2 {name} held {r['held'][0]}..")
            crossing[name] = crossing.get(name, 0) + r["crossing"]
    assert crossing["ring"] > 0 and crossing["ring-rope-zigzag"] > 0, "documents cross segments"
