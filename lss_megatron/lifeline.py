"""No orphans: a rank ends within seconds when the launcher that started it dies.

Launchers stop their ranks when they exit normally, but a launcher that is SIGKILLed (an OOM
kill, ``kill -9``, a lost node agent) cannot, and its ranks would train on to the end. Two
independent guards, installed by `install` in every launched rank (train.main):

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` through ctypes: the kernel signals this process when
  its parent exits. (The kernel ties it to the parent *thread*; the watchdog covers launchers
  that spawn from a thread, and other platforms.)
* everywhere: a daemon thread that polls the launcher processes every `poll_s` seconds (psutil,
  which also notices a reused pid) and ends this process with one line on stderr when one is
  gone. It watches the parent and, above it, the chain of launcher processes (torchrun,
  DeepSpeed's runner above its per-node ``launch``), so killing the outermost command a user
  typed also ends the ranks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
LAUNCHER_MARKS = ("torch.distributed.run", "torchrun", "deepspeed", "torch/distributed/run")
"""A command line holding one of these is a launcher whose death should end this rank."""
MAX_DEPTH = 4


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def launcher_chain(pid: int | None = None) -> list:
    """psutil.Process objects to watch: the parent of `pid` (default: this process), then each
    further ancestor while the one below it is a launcher and it is one too."""
    import psutil

    try:
        me = psutil.Process(pid or os.getpid())
        parent = me.parent()
    except psutil.Error:
        return []
    chain: list = []
    proc = parent
    while proc is not None and proc.pid > 1 and len(chain) < MAX_DEPTH:
        chain.append(proc)  # the parent always; above it, launchers started by launchers
        try:
            above = proc.parent()
        except psutil.Error:
            break
        if above is None or not (_is_launcher(proc) and _is_launcher(above)):
            break
        proc = above
    return chain


def _is_launcher(proc) -> bool:
    import psutil

    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(mark in cmd for mark in LAUNCHER_MARKS)


def _watch(chain: list, poll_s: float, on_gone) -> None:
    import time

    while True:
        for proc in chain:
            if not proc.is_running():  # gone, or its pid reused by another process
                on_gone(proc.pid)
                return
        time.sleep(poll_s)


def _exit_now(pid: int) -> None:
    try:
        sys.stderr.write(
            f"lss_megatron: the launcher (pid {pid}) is gone; this rank (pid {os.getpid()}) exits\n"
        )
        sys.stderr.flush()
    finally:
        os._exit(1)


def install(
    poll_s: float = 1.0, *, death_signal: bool = True, watchdog: bool = True, on_gone=_exit_now
) -> list[int]:
    """Tie this process's life to its launcher; returns the watched pids (parent first)."""
    chain = launcher_chain()
    if death_signal and set_parent_death_signal() and chain and os.getppid() != chain[0].pid:
        on_gone(chain[0].pid)  # the parent died before the signal was armed
    if watchdog and chain:
        threading.Thread(
            target=_watch, args=(chain, poll_s, on_gone), name="lss-lifeline", daemon=True
        ).start()
    return [p.pid for p in chain]
