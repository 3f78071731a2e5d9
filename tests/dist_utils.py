"""Spawn gloo ranks for a test, with a hard time limit and the failing rank's traceback.

`run_ranks(fn, world_size, *args, timeout=...)` starts `world_size` processes (spawn), each
initialising a gloo process group through a FileStore (no port races), runs
``fn(rank, world_size, *args)`` and returns the per-rank results (send numpy or plain Python
back, not tensors). If any rank raises, every rank is killed and the test fails with that rank's
traceback; if the deadline passes, every rank is killed and the test fails with a timeout.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
import warnings
from datetime import timedelta

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _worker(fn, rank, world_size, store_path, results, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    warnings.filterwarnings("ignore")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report anything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, store, results, args), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        got: dict[int, object] = {}
        try:
            while len(got) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"ranks {sorted(set(range(world_size)) - set(got))} did not finish "
                        f"within {timeout:.0f} s"
                    )
                try:
                    rank, status, payload = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead and all(r not in got for r in dead):
                        time.sleep(0.5)  # give the dying rank's traceback a moment to arrive
                        if results.empty():
                            raise RuntimeError(f"rank(s) {dead} died without a result") from None
                    continue
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                got[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return [got[r] for r in range(world_size)]


def torchrun_train(nproc: int, args: list[str], timeout: float = 240, env: dict | None = None):
    """Run `python -m lss_megatron.train ARGS` under torchrun on `nproc` CPU processes."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "lss_megatron.train", *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip


def read_metrics(out) -> list[dict]:
    """The rows of OUT/metrics.jsonl, checked to be steps in order."""
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    return rows
