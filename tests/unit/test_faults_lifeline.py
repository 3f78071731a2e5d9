"""No orphans (lifeline.py), on trees of plain Python processes: a "launcher" starts a "rank" that
arms the lifeline; the launcher is killed with SIGKILL (it cannot clean up) and the rank must be
gone within seconds. Each guard alone (parent-death signal; watchdog), the watchdog through a
chain of launchers (DeepSpeed's runner above its per-node launcher), and a control without the
lifeline that shows an orphan would be seen. (Real torchrun and DeepSpeed launchers killed mid-run:
tests/e2e/test_faults_lifeline.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.support import ROOT, clean_env

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
    top = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=clean_env())
    assert top.stdout.readline().strip() == "armed"
    rank = [
        p.pid
        for p in psutil.Process(top.pid).children(recursive=True)
        if p.cmdline()[2:3] == [RANK]
    ]
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
