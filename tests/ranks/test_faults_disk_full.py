"""A full disk while saving, on 2 ranks (`torch.save` made to raise ENOSPC): every rank ends with
the same one-line error naming the step, the folder and its free space; the older checkpoint and
``latest`` are unchanged byte for byte; no temporary folder is left."""

from __future__ import annotations

import errno

import pytest
import torch

from tests.support import run_ranks, snapshot

pytestmark = pytest.mark.faults


# --- a full disk while saving ----------------------------------------------------------------------


def _disk_full_worker(rank, world, directory):
    import lss_megatron.training.checkpoint as ck
    from lss_megatron.config import ModelConfig, ParallelConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid

    grid = initialize_grid(ParallelConfig(mode="lss", world_size=world, seq_parallel=world))
    model_cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_length=8, vocab_size=32)
    model = build_model(model_cfg, grid, mode="lss", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck.save_checkpoint(directory, 1, model, opt, grid, {"model": {}})
    before = snapshot(directory) if rank == 0 else None
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    ck.torch.save = full_disk
    try:
        ck.save_checkpoint(directory, 2, model, opt, grid, {"model": {}})
        outcome = "saved"
    except ck.CheckpointWriteError as e:
        outcome = str(e)
    finally:
        ck.torch.save = real_save
    after = snapshot(directory) if rank == 0 else None
    destroy_grid()
    return {"outcome": outcome, "unchanged": before == after}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disk_full_while_saving(tmp_path):
    got = run_ranks(_disk_full_worker, 2, tmp_path / "ck", timeout=150)
    msg = got[0]["outcome"]
    assert got[1]["outcome"] == msg, "every rank ends with the same error"
    assert msg.startswith(f"checkpoint step 2 not written to {tmp_path / 'ck'}: no space left (")
    assert "MiB free); the previous checkpoint step_00000001 is intact" in msg and "\n" not in msg
    assert got[0]["unchanged"], "the older checkpoint and `latest` are byte for byte unchanged"
