"""Bad configurations stop the trainer itself fast: exit 2 before any process group, the offending
values named, no traceback; under torchrun the job stops at the first rank's exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.support import ROOT

CLI_BAD = [
    (4, ["--mode", "lss", "--seq-parallel", "4", "--seq-length", "30"], ["--seq-length 30"]),
    (1, ["--num-heads", "4", "--num-kv-heads", "3"], ["--num-kv-heads 3"]),
    (1, ["--hidden-size", "30", "--num-heads", "4"], ["--hidden-size 30"]),
    (4, ["--seq-parallel", "2", "--data-parallel", "3"], ["P = 4"]),
    (4, ["--seq-parallel", "2", "--global-batch-size", "3"], ["--global-batch-size 3"]),
    (2, ["--mode", "serial", "--seq-parallel", "2"], ["--mode serial"]),
    (1, ["--no-such-flag", "7"], ["unrecognized arguments: --no-such-flag"]),
    (1, ["--mode", "rings"], ["invalid choice: 'rings'"]),
    (2, ["--data", "enwik8", "--data-path", "/no/such/enwik8.zip"], ["/no/such/enwik8.zip"]),
    (2, ["--mode", "nvidia-sp", "--seq-parallel", "1"], ["needs --seq-parallel N >= 2"]),
    (
        4,
        ["--mode", "nvidia-sp", "--seq-parallel", "4", "--num-heads", "6", "--hidden-size", "48"],
        ["--num-heads 6 is not divisible by N = 4"],
    ),
]


@pytest.mark.parametrize("world,args,fragments", CLI_BAD)
def test_cli_fails_fast_before_any_process_group(world, args, fragments):
    """WORLD_SIZE set as a launcher would, but no MASTER_ADDR: the trainer must exit at
    validation, since building a process group would block waiting for peers."""
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "lss_megatron.train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, (res.returncode, res.stderr)
    for frag in fragments:
        assert frag in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert elapsed < 10, f"validation took {elapsed:.1f} s"


@pytest.mark.timeout(120)
def test_torchrun_bad_config_fails_fast():
    """Every rank validates before building a process group; torchrun stops the job at the
    first rank's non-zero exit (it may terminate the others before they print)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lss_megatron.train",
        "--mode",
        "nvidia-sp",
        "--seq-parallel",
        "2",
        "--num-heads",
        "6",
        "--num-kv-heads",
        "3",
        "--hidden-size",
        "48",
    ]
    t0 = time.monotonic()
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode != 0
    assert "--num-kv-heads 3 is not divisible by N = 2" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 60
