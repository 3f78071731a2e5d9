"""Sharded checkpoints (format 2, torch.distributed.checkpoint): every rank writes its own file,
the LSS position slices as runs of global rows (two per rank under zigzag), and the checkpoint
reads back into another layout.

A 2-rank LSS zigzag run (N = 2) with a learned position table and one AdamW step saves; the step
folder holds one data file per rank. It is loaded back (a) by the same layout into a freshly
initialised model and optimizer, (b) by a serial 1-rank model, whose parameters and optimizer
state must equal the 2-rank run's canonical (gathered, `to_full`) tensors bitwise: loading only
moves bytes, so the tolerance is 0. A version-1 checkpoint (one state.pt of full tensors) still
loads, bitwise.
"""

from __future__ import annotations

import os

import pytest

from tests.support import run_ranks

pytestmark = pytest.mark.ranks


def _model(grid, mode, seed):
    import torch

    from lss_megatron.config import ModelConfig
    from lss_megatron.model import build_model

    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_length=8, vocab_size=32)
    model = build_model(cfg, grid, mode=mode, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _canonical(model, opt, grid):
    """Every parameter and optimizer state tensor as the full tensor (`to_full`, collective)."""
    from lss_megatron.parallel.params import to_full

    out = {}
    for name, p in model.named_parameters():
        out[f"model/{name}"] = to_full(p, p, grid).clone()
        for k, v in opt.state[p].items():
            out[f"optim/{name}/{k}"] = to_full(v, p, grid).clone() if v.dim() else v.clone()
    return out


def _save_worker(rank, world, directory):
    import torch

    import lss_megatron.training.checkpoint as ck
    from lss_megatron.config import ParallelConfig
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid

    grid = initialize_grid(
        ParallelConfig(mode="lss", world_size=world, seq_parallel=world, lss_layout="zigzag")
    )
    model, opt = _model(grid, "lss", seed=1)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():  # the same on every rank: replicated weights stay replicas
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    ck.save_checkpoint(directory, 3, model, opt, grid, {"model": {}})
    want = _canonical(model, opt, grid)
    # (a) the same layout, fresh model and optimizer
    model2, opt2 = _model(grid, "lss", seed=7)
    step = ck.load_checkpoint(ck.find_latest(directory), model2, opt2, grid)
    got = _canonical(model2, opt2, grid)
    destroy_grid()
    return {
        "step": step,
        "same": sorted(k for k in want if torch.equal(want[k], got[k])),
        "keys": sorted(want),
        "want": want if rank == 0 else None,
    }


def _serial_load_worker(rank, world, directory):
    import torch

    import lss_megatron.training.checkpoint as ck
    from lss_megatron.config import ParallelConfig
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid

    grid = initialize_grid(ParallelConfig(mode="serial", world_size=1))
    model, opt = _model(grid, "serial", seed=7)
    step = ck.load_checkpoint(ck.find_latest(directory), model, opt, grid)
    got = _canonical(model, opt, grid)
    destroy_grid()
    return {"step": step, "got": {k: v for k, v in got.items()}, "dtype": str(torch.float32)}


@pytest.mark.timeout(200)
@pytest.mark.slow  # ~14 s; the fast tier keeps unit/test_sharded_checkpoint and e2e keep_last
def test_two_ranks_write_their_own_files_and_reshard_to_serial(tmp_path):
    import torch

    directory = tmp_path / "ck"
    saved = run_ranks(_save_worker, 2, directory, timeout=150)
    step_dir = directory / "step_00000003"
    files = sorted(os.listdir(step_dir))
    data = [f for f in files if f.endswith(".distcp")]
    assert len(data) > 1, f"one data file per rank expected, got {files}"
    assert {".metadata", "meta.json", "state.pt"} <= set(files)
    for r in saved:
        assert r["step"] == 3
        assert r["same"] == r["keys"], "the same layout reloads every tensor bitwise"
    from lss_megatron.training.sharded import read_metadata

    stored = read_metadata(step_dir).state_dict_metadata
    (table,) = [k for k in stored if k.startswith("model/") and "position" in k]
    rows = sorted((c.offsets[0], c.sizes[0]) for c in stored[table].chunks)
    # zigzag, N = 2, l = 8: rank 0 holds rows 0-1 and 6-7, rank 1 rows 2-5 (its chunks 1 and 2
    # are adjacent: one run); each run is its own chunk at its global row
    assert rows == [(0, 2), (2, 4), (6, 2)], rows
    serial = run_ranks(_serial_load_worker, 1, directory, timeout=120)[0]
    assert serial["step"] == 3
    want = saved[0]["want"]
    assert sorted(serial["got"]) == sorted(want)
    for k, v in want.items():  # moved bytes only: exact
        assert torch.equal(serial["got"][k], v), k


def _version_1_worker(rank, world, directory):
    """A version-1 checkpoint (one state.pt of full tensors, as earlier versions wrote) loads."""
    import json

    import torch

    import lss_megatron.training.checkpoint as ck
    from lss_megatron.config import ParallelConfig
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid

    grid = initialize_grid(ParallelConfig(mode="serial", world_size=1))
    model, opt = _model(grid, "serial", seed=1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    want = _canonical(model, opt, grid)
    step_dir = directory / "step_00000002"
    step_dir.mkdir(parents=True)
    torch.save(
        {
            "model": {n: p.detach() for n, p in model.named_parameters()},
            "optimizer": {n: dict(opt.state[p]) for n, p in model.named_parameters()},
            "torch_rng": torch.get_rng_state(),
        },
        step_dir / "state.pt",
    )
    (step_dir / "meta.json").write_text(json.dumps({"step": 2, "format_version": 1, "config": {}}))
    model2, opt2 = _model(grid, "serial", seed=7)
    step = ck.load_checkpoint(ck.find_latest(directory), model2, opt2, grid)
    got = _canonical(model2, opt2, grid)
    destroy_grid()
    return {
        "step": step,
        "same": sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want),
    }


@pytest.mark.timeout(120)
@pytest.mark.slow  # ~7 s
def test_version_1_checkpoints_still_load(tmp_path):
    r = run_ranks(_version_1_worker, 1, tmp_path / "ck", timeout=90)[0]
    assert r == {"step": 2, "same": True}
