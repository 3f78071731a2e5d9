"""Up-front checks and saving/loading faults through the trainer: the memory estimate against
measured bytes; a full disk and a foreign checkpoint file as the user sees them (one line, no
traceback); no temporary folder leaks from a one-process run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lss_megatron import estimate as est
from tests.support import ROOT, TINY, clean_env, small_filesystem, train

pytestmark = pytest.mark.faults


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
        e.params,
        e.grads,
        e.optimizer,
    )
    assert 0.75 <= e.activations / row["activation_bytes"] <= 1.25, (e, row["activation_bytes"])


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_disk_full_through_the_trainer(tmp_path):
    """The user's view: exit 1, one error line, no traceback, step 1's checkpoint intact. The
    full disk comes as torch.save really reports it: a RuntimeError ("unexpected pos") whose
    context is the OSError(ENOSPC) of the write (a real full disk: test_real_full_disk)."""
    script = (
        "import errno, sys, torch\n"
        "import lss_megatron.training.checkpoint as ck\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if ck.latest_checkpoint(sys.argv[1])[0] is not None:\n"
        "        try:\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "        except OSError:\n"
        "            raise RuntimeError('[enforce fail at inline_container.cc:672] . "
        "unexpected pos 704 vs 598')\n"
        "    real(obj, f, *a, **k)\n"
        "ck.torch.save = save\n"
        "from lss_megatron.train import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )

    ckpt = tmp_path / "ck"
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(ckpt),
            *TINY,
            "--out",
            str(tmp_path / "o"),
            "--save",
            str(ckpt),
            "--save-interval",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=clean_env(),
    )
    assert res.returncode == 1, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if "ERROR" in x]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "checkpoint step 2 not written" in errors[0] and "no space left" in errors[0]
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoints.json", "latest", "step_00000001"]


# --- files that are not checkpoints -----------------------------------------------------------------


def _state_file(tmp_path, payload):
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"step": 1, "format_version": 1, "config": {}}))
    if isinstance(payload, bytes):
        (d / "state.pt").write_bytes(payload)
    else:
        torch.save(payload, d / "state.pt")
    return d


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_loading_a_foreign_file_through_the_trainer(tmp_path):
    from lss_megatron.train import config_from_args, parse_args

    (tmp_path / "ck").mkdir()
    d = _state_file(tmp_path / "ck", {"weights": torch.zeros(2)})
    model = config_from_args(parse_args(TINY), 1).to_dict()["model"]  # the same model: loadable
    (d / "meta.json").write_text(
        json.dumps({"step": 1, "format_version": 1, "config": {"model": model}})
    )
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
    res = train([*TINY, "--out", tmp_path / "o"], env=clean_env(TMPDIR=str(scratch)))
    assert res.returncode == 0, res.stderr[-2000:]
    left = sorted(p.name for p in scratch.iterdir())
    # torch's own compile cache (one per user, reused by every run) is the only thing allowed
    assert [x for x in left if not x.startswith("torchinductor_")] == [], left


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_full_disk(tmp_path):
    """A real full disk (a 500 KiB tmpfs; a checkpoint of the TINY model is ~350 KB): step 1
    saved, step 2 does not fit: exit 1, one line naming the folder and its free space, no
    temporary folder left, ``latest`` naming step 1. Then --out on a full
    disk (metrics.jsonl cannot be written): one line too, no traceback."""
    with small_filesystem(tmp_path / "fs", 500) as fs:
        ck = fs / "ck"
        res = train([*TINY, "--out", tmp_path / "o", "--save", ck, "--save-interval", "1"])
        assert res.returncode == 1, res.stderr[-3000:]
        errors = [x for x in res.stderr.splitlines() if "ERROR" in x]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert f"checkpoint step 2 not written to {ck}: no space left (" in errors[0]
        assert "MiB free); the previous checkpoint step_00000001 is intact" in errors[0]
        assert (ck / "latest").read_text() == "step_00000001"
        assert sorted(x.name for x in ck.iterdir()) == [
            "checkpoints.json",
            "latest",
            "step_00000001",
        ], "no temporary folder left"
    with small_filesystem(tmp_path / "fs2", 12) as fs:
        res = train([*TINY, "--out", fs / "o"])
        assert res.returncode in (1, 2), res.stderr[-3000:]
        errors = [x for x in res.stderr.splitlines() if "ERROR" in x or "error:" in x]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert "no space left on the device (" in errors[0] and str(fs) in errors[0]
