"""Checkpoints: exact resume, layout/mode independence, atomic writes, clear errors.

Tolerances: resuming in the same layout restores every tensor bit for bit and the data is a
function of the step, so the continued losses must match the uninterrupted run within 1e-6 (they
are in fact identical). Resuming in another layout or mode changes only reduction order and
kernels, so those losses match within 1e-5 (fp32), as in the parity tests.
"""

from __future__ import annotations

import json
import os

import pytest
from dist_utils import read_metrics, run_ranks, torchrun_train

ARGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-heads", "4", "--seq-length", "32",
    "--global-batch-size", "4", "--vocab-size", "64", "--steps", "6", "--optimizer", "adamw",
    "--lr", "3e-3", "--warmup-steps", "2", "--seed", "5", "--dist-timeout", "60",
]  # fmt: skip


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


@pytest.fixture(scope="module")
def lss4(tmp_path_factory):
    """An uninterrupted LSS N=4 run, and one stopped after the checkpoint at step 3."""
    full = tmp_path_factory.mktemp("full")
    part = tmp_path_factory.mktemp("part")
    ckpt = tmp_path_factory.mktemp("ckpt")
    res = torchrun_train(4, ["--mode", "lss", "--seq-parallel", "4", "--out", str(full), *ARGS])
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun_train(4, ["--mode", "lss", "--seq-parallel", "4", "--out", str(part),
                             "--save", str(ckpt), "--save-interval", "3", "--stop-after", "3",
                             *ARGS])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(_losses(part)) == [1, 2, 3], "--stop-after 3 must end after step 3"
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    return {"full": _losses(full), "part": part, "ckpt": ckpt}


@pytest.mark.timeout(300)
def test_resume_same_layout_is_exact(lss4):
    part = lss4["part"]
    res = torchrun_train(4, ["--mode", "lss", "--seq-parallel", "4", "--out", str(part),
                             "--load", str(lss4["ckpt"]), *ARGS])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, full = _losses(part), lss4["full"]
    assert sorted(resumed) == list(range(1, 7)), "metrics continue in the same folder"
    for step in range(4, 7):
        assert abs(resumed[step] - full[step]) < 1e-6, (step, resumed[step], full[step])
    cfg = json.loads((part / "config.json").read_text())
    assert cfg["runtime"]["resumed_from_step"] == 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,n", [("lss", 2), ("serial", 1), ("nvidia-sp", 2)])
def test_resume_in_another_layout_or_mode(lss4, tmp_path, mode, n):
    """An LSS N=4 checkpoint: position slices stitched on save, re-cut (or TP-sharded) on load."""
    res = torchrun_train(n, ["--mode", mode, "--seq-parallel", str(n), "--out", str(tmp_path),
                             "--load", str(lss4["ckpt"]), *ARGS])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, full = _losses(tmp_path), lss4["full"]
    assert sorted(resumed) == [4, 5, 6]
    for step in range(4, 7):
        assert abs(resumed[step] - full[step]) < 1e-5, (mode, n, step, resumed[step], full[step])


@pytest.mark.timeout(120)
def test_mismatched_model_is_a_clear_error(lss4, tmp_path):
    args = [a if a != "32" else "48" for a in ARGS]  # hidden 48 and seq 48: another model
    res = torchrun_train(1, ["--mode", "serial", "--out", str(tmp_path), "--load",
                             str(lss4["ckpt"]), *args])  # fmt: skip
    assert res.returncode != 0
    assert (
        "is for another model" in res.stderr
        and "hidden_size: checkpoint 32 vs run 48" in res.stderr
    )


@pytest.mark.timeout(120)
def test_load_from_empty_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    res = torchrun_train(1, ["--mode", "serial", "--out", str(tmp_path / "o"), "--load",
                             str(empty), *ARGS])  # fmt: skip
    assert res.returncode != 0
    assert f"--load {empty}: no complete checkpoint there" in res.stderr


def _atomic_worker(rank, world, directory):
    """Save at step 1, crash in the middle of saving step 2, then check what loading finds."""
    import torch

    import lss_megatron.checkpoint as ck
    from lss_megatron.config import ModelConfig, ParallelConfig
    from lss_megatron.grid import destroy_grid, initialize_grid
    from lss_megatron.model import build_model

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
    return {"crashed": crashed, "found": found.name, "step": step, "restored": restored,
            "leftovers": leftovers, "stale": stale.name if stale else None, "corrupt": corrupt}  # fmt: skip


@pytest.mark.timeout(120)
def test_crash_during_save_leaves_previous_checkpoint_usable(tmp_path):
    r = run_ranks(_atomic_worker, 1, tmp_path, timeout=90)[0]
    assert r["crashed"]
    assert (r["found"], r["step"]) == ("step_00000001", 1)
    assert r["restored"], "loading must restore the step-1 weights exactly"
    assert r["leftovers"] == [], f"temporary files left behind: {r['leftovers']}"
    assert r["stale"] == "step_00000001"
    assert "cannot read state.pt" in r["corrupt"]
