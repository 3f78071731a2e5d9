"""No orphans, end to end: torchrun and the DeepSpeed launcher (launch/deepspeed.sh) are SIGKILLed
mid-run; every rank (and DeepSpeed's per-node launcher) is gone within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.support import ROOT, TINY, clean_env

pytestmark = pytest.mark.faults


def _ranks_of(marker: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "lss_megatron.train" in cmd and p.info["status"] != "zombie":
            found.append(p.pid)
    return found


def _kill_mid_run(cmd: list[str], out, limit_s: float = 10) -> tuple[list[int], float | None]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=clean_env()
    )
    try:
        t0 = time.monotonic()
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").stat().st_size:
            assert proc.poll() is None and time.monotonic() - t0 < 200, "the run did not start"
            time.sleep(0.5)
        ranks = _ranks_of(str(out))
        os.kill(proc.pid, signal.SIGKILL)  # the launcher the user started
        proc.wait()
        t1 = time.monotonic()
        while _ranks_of(str(out)) and time.monotonic() - t1 < limit_s:
            time.sleep(0.1)
        left = _ranks_of(str(out))
        return ranks, (None if left else time.monotonic() - t1)
    finally:
        for pid in _ranks_of(str(out)):
            psutil.Process(pid).kill()


LONG = [*TINY[2:], "--mode", "lss", "--steps", "100000", "--log-interval", "1000"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_killed_mid_run_leaves_no_rank(tmp_path):
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lss_megatron.train",
        *LONG,
        "--out",
        str(out),
    ]
    ranks, took = _kill_mid_run(cmd, out)
    assert len(ranks) >= 2, ranks
    assert took is not None, "ranks still running 10 s after torchrun was killed"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_launcher_killed_mid_run_leaves_no_rank(tmp_path):
    out = tmp_path / "o"
    cmd = [
        "bash",
        str(ROOT / "launch" / "deepspeed.sh"),
        "--num-gpus",
        "2",
        "--",
        *LONG,
        "--out",
        str(out),
    ]
    ranks, took = _kill_mid_run(cmd, out)
    assert len(ranks) >= 2, ranks
    assert took is not None, "processes still running 10 s after the DeepSpeed runner was killed"
