"""The launcher's environment variables, parsed once with errors that name the variable.

torchrun, the DeepSpeed launcher and launch/env_from_scheduler.sh tell each process who it is
through RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/MASTER_PORT; OMP_NUM_THREADS
sizes torch's thread pool. A bare ``int(os.environ[...])`` turns ``WORLD_SIZE=two`` into a
traceback; `launch_env` reports every bad value at once instead. Import-light (no torch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
"""Any of these set: a launcher started this process (torchrun, deepspeed, a scheduler wrapper)."""


@dataclass(frozen=True)
class LaunchEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    omp_threads: int = 1
    launched: bool = False
    """True when a launcher set the rendezvous variables (see `LAUNCHER_VARS`)."""


def _int(
    env: Mapping[str, str], name: str, default: int, lo: int, hi: int | None, problems: list[str]
) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        problems.append(f"environment variable {name}={raw!r} is not an integer")
        return default
    if value < lo or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        problems.append(f"environment variable {name}={raw!r} must be {span}")
        return default
    return value


def launch_env(env: Mapping[str, str] | None = None) -> tuple[LaunchEnv, list[str]]:
    """(the parsed environment, problems). Problems name each variable and its value; where a
    value is bad its default stands in, so the caller can still decide which rank prints."""
    env = os.environ if env is None else env
    p: list[str] = []
    world = _int(env, "WORLD_SIZE", 1, 1, None, p)
    rank = _int(env, "RANK", 0, 0, None, p)
    local_rank = _int(env, "LOCAL_RANK", 0, 0, None, p)
    local_world = _int(env, "LOCAL_WORLD_SIZE", 0, 1, None, p)
    local_world = local_world or _int(env, "LOCAL_SIZE", 0, 1, None, p)  # DeepSpeed's name
    omp = _int(env, "OMP_NUM_THREADS", 1, 1, None, p)
    _int(env, "MASTER_PORT", 0, 1, 65535, p)
    if not p and rank >= world:
        p.append(
            f"environment variables RANK={rank} and WORLD_SIZE={world}: RANK must be < WORLD_SIZE"
        )
    local_world = local_world or world  # unknown: assume every process is on this host
    launched = any(k in env for k in LAUNCHER_VARS)
    return LaunchEnv(world, rank, local_rank, local_world, omp, launched), p


def omp_threads(env: Mapping[str, str] | None = None) -> int:
    """OMP_NUM_THREADS as a positive integer (1 when unset or invalid: validation reports it)."""
    return launch_env(env)[0].omp_threads
