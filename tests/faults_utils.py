"""Helpers of the faults tier (tests/test_faults_*.py): run the trainer as a user would, and
fingerprint folders so a refused run can be shown to have changed no byte."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--mode", "serial", "--num-layers", "1", "--hidden-size", "32", "--num-heads", "2",
        "--seq-length", "32", "--global-batch-size", "2", "--vocab-size", "64", "--steps", "2",
        "--dist-timeout", "60"]  # fmt: skip
"""A one-process run of a few seconds."""


def env_without_launcher(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_SIZE")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def train(args: list, timeout: float = 180, env: dict | None = None, module="lss_megatron.train"):
    """`python -m lss_megatron.train ARGS` in one process (no launcher)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env=env or env_without_launcher())  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (folders as entries too)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def error_lines(stderr: str) -> list[str]:
    """The lines that report an error (the trainer's and the analysis commands' `error:`)."""
    return [x for x in stderr.splitlines() if "error:" in x or "Traceback" in x]
