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
from tests.support import ROOT, TINY, clean_env, train

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
    """The user's view: exit 1, one error line, no traceback, step 1's checkpoint intact."""
    script = (
        "import errno, sys, torch\n"
        "import lss_megatron.training.checkpoint as ck\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if ck.latest_checkpoint(sys.argv[1])[0] is not None:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
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
