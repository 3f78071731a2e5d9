"""No orphans: a rank ends within seconds when its launcher is SIGKILLed (lifeline.py).

The unit tests build process trees of plain Python processes: a "launcher" that starts a
"rank", which arms the lifeline; the launcher is killed with SIGKILL (it cannot clean up) and the
rank must be gone within seconds. Each guard is tested alone (parent-death signal; watchdog), the
watchdog also through a chain of launchers (DeepSpeed's runner above its per-node launcher), and
a control without the lifeline shows that the test would see an orphan. The end-to-end tests kill
a real torchrun and a real DeepSpeed launcher mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from faults_utils import ROOT, TINY, env_without_launcher

pytestmark = pytest.mark.faults

RANK = """
import sys, time
from lss_megatron.lifeline import install
mode = sys.argv[1]
if mode != "none":
    install(poll_s=0.2, death_signal=mode in ("both", "signal"), watchdog=mode in ("both", "watch"))
print("armed", flush=True)
time.sleep(120)
"""
LAUNCHER = """
import subprocess, sys, time
cmd = [sys.executable, "-c", sys.argv[1], *sys.argv[2:]]
child = subprocess.Popen(cmd, stdout=sys.stdout)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, limit_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if not _alive(pid):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _tree(mode: str, depth: int, marker: str):
    """depth 1: launcher -> rank; depth 2: runner -> launcher -> rank. Launchers carry `marker`
    in their command line (what lifeline.py looks for). Returns (top process, the rank's pid)."""
    cmd = [sys.executable, "-c", RANK, mode, marker]
    for _ in range(depth):
        cmd = [sys.executable, "-c", LAUNCHER, *cmd[2:]]
    top = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                           env=env_without_launcher())  # fmt: skip
    assert top.stdout.readline().strip() == "armed"
    rank = [p.pid for p in psutil.Process(top.pid).children(recursive=True)
            if p.cmdline()[2:3] == [RANK]]  # fmt: skip
    assert len(rank) == 1
    return top, rank[0]


def _cleanup(top, rank: int) -> None:
    """Kill what a failing test may have left: the rank and the launcher we started."""
    for proc in (rank, top.pid):
        try:
            psutil.Process(proc).kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["signal", "watch", "both"])
def test_rank_dies_with_its_launcher(mode):
    top, rank = _tree(mode, 1, "deepspeed.launcher.launch")
    try:
        os.kill(top.pid, signal.SIGKILL)
        top.wait()
        took = _wait_gone(rank, 10)
        assert took is not None, f"rank {rank} outlived its launcher (lifeline {mode})"
        assert took < 5
    finally:
        _cleanup(top, rank)


@pytest.mark.timeout(60)
def test_watchdog_follows_the_launcher_chain():
    """runner -> launch -> rank, the runner killed (what kill -9 of the `deepspeed` command the
    user typed does): the per-node launcher lives on, the rank still ends."""
    top, rank = _tree("watch", 2, "deepspeed.launcher.runner")
    middle = psutil.Process(top.pid).children()[0]
    try:
        os.kill(top.pid, signal.SIGKILL)
        top.wait()
        took = _wait_gone(rank, 10)
        assert took is not None and took < 5
    finally:
        middle.kill()
        _cleanup(top, rank)


@pytest.mark.timeout(60)
def test_without_the_lifeline_the_rank_is_orphaned():
    """The control: the same tree with no lifeline leaves the rank running."""
    top, rank = _tree("none", 1, "deepspeed.launcher.launch")
    try:
        os.kill(top.pid, signal.SIGKILL)
        top.wait()
        assert _wait_gone(rank, 2) is None
    finally:
        _cleanup(top, rank)


def _ranks_of(marker: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "lss_megatron.train" in cmd and p.info["status"] != "zombie":
            found.append(p.pid)
    return found


def _kill_mid_run(cmd: list[str], out, limit_s: float = 10) -> tuple[list[int], float | None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=env_without_launcher())  # fmt: skip
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lss_megatron.train", *LONG, "--out", str(out)]  # fmt: skip
    ranks, took = _kill_mid_run(cmd, out)
    assert len(ranks) >= 2, ranks
    assert took is not None, "ranks still running 10 s after torchrun was killed"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deepspeed_launcher_killed_mid_run_leaves_no_rank(tmp_path):
    out = tmp_path / "o"
    cmd = ["bash", str(ROOT / "launch" / "deepspeed.sh"), "--num-gpus", "2", "--", *LONG,
           "--out", str(out)]  # fmt: skip
    ranks, took = _kill_mid_run(cmd, out)
    assert len(ranks) >= 2, ranks
    assert took is not None, "processes still running 10 s after the DeepSpeed runner was killed"
