"""Up-front checks and the faults of saving and loading.

* ``--out`` / ``--save`` must be creatable, writable folders: refused before any process group;
* the per-rank memory estimate (estimate.py): parameters, gradients and optimizer state exact
  (against the cost model's independent enumeration and against measured bytes), activations
  within 25% of the exact count of what autograd saves; a run that cannot fit is refused naming it;
* a full disk while saving: one line naming the folder and its free space on every rank, the
  older checkpoint intact byte for byte, no temporary folder left;
* a loadable torch file that is not a checkpoint, and a corrupt one: one clear line, without
  PyTorch's advice to retry with ``weights_only=False``;
* no temporary folder leaks from a one-process run (``lss_store_*``).
"""

from __future__ import annotations

import errno
import itertools
import json
import os

import pytest
import torch
from dist_utils import run_ranks
from faults_utils import ROOT, TINY, env_without_launcher, error_lines, snapshot, train

from lss_megatron import estimate as est
from lss_megatron import runs
from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.faults


# --- folders ----------------------------------------------------------------------------------------
def test_folder_checks(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert runs.folder_problem("--out", str(tmp_path / "new" / "deep")) is None
    assert "exists and is not a folder" in runs.folder_problem("--out", str(a_file))
    msg = runs.folder_problem("--save", str(a_file / "ck"))
    assert msg == f"--save {a_file / 'ck'}: cannot be created, {a_file} is a file, not a folder"
    assert runs.folder_problem("--out", "") == "--out must name a folder, got ''"
    # we run as root, so permission bits do not stop us: stand in for a read-only mount
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert "cannot be created in" in runs.folder_problem("--out", str(tmp_path / "x"))
    assert runs.folder_problem("--out", str(tmp_path)).endswith("is not writable")


def test_unwritable_save_fails_before_any_work(tmp_path):
    """The issue's case: --save on an unwritable path failed after the last step. Now: exit 2 at
    once, both folders named, nothing created."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = train([*TINY, "--out", blocker, "--save", blocker / "ck"])
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert f"--out {blocker}: exists and is not a folder" in res.stderr
    assert f"--save {blocker / 'ck'}: cannot be created" in res.stderr
    assert "step 1" not in res.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- the memory estimate ----------------------------------------------------------------------------
def _configs():
    grid = itertools.product(["serial", "lss", "nvidia-sp", "ulysses"], [1, 2, 4],
                             ["learned", "rope"], [None, 2], [True, False], ["adamw", "sgd"],
                             [1, 2], [64, 256])  # fmt: skip
    for mode, n, pos, kv, causal, opt, b, seq in grid:
        if (mode == "serial") != (n == 1) or (mode in ("nvidia-sp", "ulysses") and (kv or 4) % n):
            continue
        model = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=kv,
                            seq_length=seq, position_embedding=pos, causal=causal)  # fmt: skip
        yield RunConfig(model=model, parallel=ParallelConfig(mode=mode, world_size=n,
                                                             seq_parallel=n),
                        train=TrainConfig(global_batch_size=b, optimizer=opt))  # fmt: skip


def test_estimate_against_the_cost_model():
    """Parameters and optimizer state are exact (the cost model enumerates every tensor
    independently); activations are a per-layer formula, within 25% of the cost model's exact
    enumeration of saved tensors over modes, N, positions, GQA, masks, batch and length."""
    from analysis import costmodel_counts as cm

    ratios = []
    for cfg in _configs():
        d = {**cfg.to_dict(), "runtime": {"backend": "gloo"}}
        shape, lay = cm.shape_from_config(d["model"]), cm.layout_from_config(d)
        e = est.estimate(cfg)
        assert e.params == e.grads == 4 * cm.param_count(shape, lay), cfg
        assert e.optimizer == cm.optimizer_state_bytes(shape, lay, cfg.train.optimizer), cfg
        ratios.append(e.activations / cm.activation_bytes(shape, lay))
    assert len(ratios) > 100 and 0.75 <= min(ratios) and max(ratios) <= 1.25, (min(ratios),
                                                                              max(ratios))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_estimate_against_measured_bytes(tmp_path):
    """A real run: the trainer's measured param/grad/optimizer bytes equal the estimate exactly;
    the measured activation bytes are within 25% of it."""
    out = tmp_path / "o"
    res = train([*TINY, "--out", out])
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    from lss_megatron.train import config_from_args, parse_args

    e = est.estimate(config_from_args(parse_args([*TINY, "--out", str(out)]), 1).validate())
    assert (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"]) == (
        e.params, e.grads, e.optimizer)  # fmt: skip
    assert 0.75 <= e.activations / row["activation_bytes"] <= 1.25, (e, row["activation_bytes"])


def test_a_run_that_cannot_fit_is_refused_naming_the_estimate():
    cfg = RunConfig(model=ModelConfig(hidden_size=16384, num_heads=16))
    (msg,) = est.memory_problems(cfg, 0, 1, available=2**30)
    assert msg.startswith("per-rank memory estimate 100.9") and "parameters 24.05" in msg
    assert "optimizer state 48.10" in msg and "exceeds the 1.00 GiB available" in msg
    assert "--no-memory-check" in msg
    assert est.memory_problems(RunConfig(), 0, 1, available=2**30) == []


def test_huge_model_on_the_command_line(tmp_path):
    """The issue's `--hidden-size 16384` (here 65536: more than any test machine) is refused in
    seconds with the estimate, instead of allocating until the OS kills the job."""
    res = train(["--hidden-size", "65536", "--num-heads", "16", "--out", tmp_path / "o"])
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "per-rank memory estimate" in res.stderr and "GiB available" in res.stderr
    assert not (tmp_path / "o").exists()


# --- a full disk while saving ----------------------------------------------------------------------
def _disk_full_worker(rank, world, directory):
    import lss_megatron.checkpoint as ck
    from lss_megatron.config import ModelConfig, ParallelConfig
    from lss_megatron.grid import destroy_grid, initialize_grid
    from lss_megatron.model import build_model

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


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_disk_full_through_the_trainer(tmp_path):
    """The user's view: exit 1, one error line, no traceback, step 1's checkpoint intact."""
    script = (
        "import errno, sys, torch\n"
        "import lss_megatron.checkpoint as ck\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if ck.latest_checkpoint(sys.argv[1])[0] is not None:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    real(obj, f, *a, **k)\n"
        "ck.torch.save = save\n"
        "from lss_megatron.train import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )  # fmt: skip
    import subprocess
    import sys

    ckpt = tmp_path / "ck"
    res = subprocess.run([sys.executable, "-c", script, str(ckpt), *TINY, "--out",
                          str(tmp_path / "o"), "--save", str(ckpt), "--save-interval", "1"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env=env_without_launcher())  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if "ERROR" in x]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "checkpoint step 2 not written" in errors[0] and "no space left" in errors[0]
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoints.json", "latest",
                                                      "step_00000001"]  # fmt: skip


# --- files that are not checkpoints -----------------------------------------------------------------
def _state_file(tmp_path, payload) -> os.PathLike:
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"step": 1, "format_version": 1, "config": {}}))
    if isinstance(payload, bytes):
        (d / "state.pt").write_bytes(payload)
    else:
        torch.save(payload, d / "state.pt")
    return d


@pytest.mark.parametrize("payload,fragment", [
    ({"weights": torch.zeros(2)}, "state.pt is a valid torch file but not an lss_megatron "
                                  "checkpoint (missing or wrong ['model', 'optimizer', "
                                  "'torch_rng']"),
    ([1, 2, 3], "state.pt is a valid torch file but not an lss_megatron checkpoint (list"),
    (b"not a checkpoint", "cannot read state.pt: it is corrupt, truncated or not a checkpoint"),
    ("truncated", "cannot read state.pt: it is corrupt, truncated or not a checkpoint "
                  "(PytorchStreamReader failed reading zip archive"),
    ("pickled-object", "Unsupported global: GLOBAL datetime.datetime"),
])  # fmt: skip
def test_foreign_and_corrupt_state_files(tmp_path, payload, fragment):
    import datetime

    from lss_megatron.checkpoint import CheckpointError, load_checkpoint

    if payload == "truncated":
        d = _state_file(tmp_path, {"model": {"w": torch.zeros(1000)}})
        data = (d / "state.pt").read_bytes()
        (d / "state.pt").write_bytes(data[: len(data) // 2])
    elif payload == "pickled-object":
        d = _state_file(tmp_path, {"model": {}, "when": datetime.datetime(2020, 1, 1)})
    else:
        d = _state_file(tmp_path, payload)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, None, None, None)  # fails before the model is touched
    msg = str(e.value)
    assert fragment in msg, msg
    assert "weights_only" not in msg and "\n" not in msg and len(msg) < 400


def test_meta_without_a_step_is_a_clear_error(tmp_path):
    from lss_megatron.checkpoint import CheckpointError, read_meta

    (tmp_path / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(CheckpointError, match="meta.json has no integer 'step'"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="meta.json has no integer 'step'"):
        read_meta(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_loading_a_foreign_file_through_the_trainer(tmp_path):
    from lss_megatron.train import config_from_args, parse_args

    (tmp_path / "ck").mkdir()
    d = _state_file(tmp_path / "ck", {"weights": torch.zeros(2)})
    model = config_from_args(parse_args(TINY), 1).to_dict()["model"]  # the same model: loadable
    (d / "meta.json").write_text(json.dumps({"step": 1, "format_version": 1,
                                             "config": {"model": model}}))  # fmt: skip
    res = train([*TINY, "--out", tmp_path / "o", "--load", tmp_path / "ck"])
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if "ERROR" in x]
    assert len(errors) == 1 and "not an lss_megatron checkpoint" in errors[0], res.stderr[-3000:]
    assert "weights_only" not in res.stderr and "Traceback" not in res.stderr


# --- temporary folders ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_one_process_run_leaks_no_temporary_folder(tmp_path):
    """The single-process rendezvous store used to be a fresh ``lss_store_*`` folder per run;
    now it is in memory (HashStore)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    res = train([*TINY, "--out", tmp_path / "o"], env=env_without_launcher(TMPDIR=str(scratch)))
    assert res.returncode == 0, res.stderr[-2000:]
    left = sorted(p.name for p in scratch.iterdir())
    # torch's own compile cache (one per user, reused by every run) is the only thing allowed
    assert [x for x in left if not x.startswith("torchinductor_")] == [], left
