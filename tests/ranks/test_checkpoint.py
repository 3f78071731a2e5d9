"""Checkpoint writes are atomic: a crash while saving leaves the previous checkpoint usable.

One gloo rank saves at step 1, crashes in the middle of saving step 2 (a simulated full disk),
then loads what `find_latest` finds: the step-1 weights exactly, no temporary files left; a
stale `latest` falls back to the newest complete checkpoint, a corrupt state.pt is a clear error.
"""

from __future__ import annotations

import os

import pytest

from tests.support import run_ranks


def _atomic_worker(rank, world, directory):
    """Save at step 1, crash in the middle of saving step 2, then check what loading finds."""
    import torch

    import lss_megatron.training.checkpoint as ck
    from lss_megatron.config import ModelConfig, ParallelConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid

    grid = initialize_grid(ParallelConfig(mode="serial", world_size=1))
    model_cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_length=8, vocab_size=32)
    model = build_model(model_cfg, grid, mode="serial", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"model": {"num_layers": 1}}
    ck.save_checkpoint(directory, 1, model, opt, grid, config)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save({"partial": True}, f)
        raise OSError("disk full (simulated crash during save)")

    ck.torch.save = dying_save
    try:
        ck.save_checkpoint(directory, 2, model, opt, grid, config)
        crashed = False
    except OSError:
        crashed = True
    finally:
        ck.torch.save = real_save
    found = ck.find_latest(directory)
    step = ck.load_checkpoint(found, model, opt, grid)
    restored = all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    leftovers = sorted(x for x in os.listdir(directory) if x.startswith("."))

    # a stale `latest` (pointing at a deleted folder) falls back to the newest complete one
    (directory / "latest").write_text("step_00000099")
    stale = ck.find_latest(directory)
    # a corrupt state.pt is a CheckpointError, not a crash
    (directory / "step_00000001" / "state.pt").write_bytes(b"not a checkpoint")
    try:
        ck.load_checkpoint(directory / "step_00000001", model, opt, grid)
        corrupt = "loaded"
    except ck.CheckpointError as e:
        corrupt = str(e)
    destroy_grid()
    return {
        "crashed": crashed,
        "found": found.name,
        "step": step,
        "restored": restored,
        "leftovers": leftovers,
        "stale": stale.name if stale else None,
        "corrupt": corrupt,
    }


@pytest.mark.timeout(120)
def test_crash_during_save_leaves_previous_checkpoint_usable(tmp_path):
    r = run_ranks(_atomic_worker, 1, tmp_path, timeout=90)[0]
    assert r["crashed"]
    assert (r["found"], r["step"]) == ("step_00000001", 1)
    assert r["restored"], "loading must restore the step-1 weights exactly"
    assert r["leftovers"] == [], f"temporary files left behind: {r['leftovers']}"
    assert r["stale"] == "step_00000001"
    assert "cannot read state.pt" in r["corrupt"]
