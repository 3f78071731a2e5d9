"""The one shared module of the test suite: rank and trainer runners, single-process references.

* `run_ranks(fn, world_size, *args, timeout=...)` starts `world_size` processes (spawn), each
  initialising a gloo process group through a FileStore (no port races), runs
  ``fn(rank, world_size, *args)`` and returns the per-rank results (send numpy or plain Python
  back, not tensors). If any rank raises, every rank is killed and the test fails with that
  rank's traceback; if the deadline passes, every rank is killed and the test fails with a
  timeout.
* `torchrun_train(nproc, args)` runs `python -m lss_megatron.train` under torchrun on CPU
  processes; `read_metrics(out)` reads the run's metrics.jsonl; `clean_env`, `run_cmd` and `ok`
  run launcher scripts without the caller's rendezvous or scheduler variables.
* the faults tier: `TINY` (a one-process run of seconds), `train(args)` (it, as a subprocess),
  `snapshot(folder)` (hashes of every file, to show a refused run changed nothing) and
  `error_lines(stderr)`.
* `attention_inputs` / `reference_attention`: float64 full-sequence attention with autograd, the
  reference of every distributed attention test.
* `model_worker` / `check_model`: one forward/backward step and gradient averaging of the GPT
  model on any (N, D, positions, mode) layout, and the check of a parallel layout against the
  one-process Megatron model (loss, every gradient, position slices, per-token losses).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the working directory of every launched trainer)."""
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
        # by value (plain pickle): a queue would pass tensors as shared-memory file descriptors,
        # which fail with ConnectionResetError when this process exits before the parent reads
        results.put((rank, "ok", pickle.dumps(out)))
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
                got[rank] = pickle.loads(payload)
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

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "lss_megatron.train",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )


def read_metrics(out) -> list[dict]:
    """The rows of OUT/metrics.jsonl, checked to be steps in order."""
    import json

    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    return rows


# --- launcher scripts ----------------------------------------------------------------------------
DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
)
SCHED_PREFIXES = ("SLURM_", "OMPI_", "JSM_", "PMIX_", "PMI_", "LSB_", "LS_SUBCWD", "LSS_")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without rendezvous or scheduler variables, plus `extra`."""
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DIST_VARS and not k.startswith(SCHED_PREFIXES)
    }
    env.update(PYTHONWARNINGS="ignore", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_cmd(cmd, timeout: float, env=None, cwd=ROOT):
    """Run `cmd` (paths allowed) in `clean_env()` unless `env` is given; capture its output."""
    import subprocess

    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
        cwd=cwd,
    )


def ok(res):
    """`res`, after asserting it exited 0 (the message shows the ends of its output)."""
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


# --- the faults tier (test_faults_*.py): a user's runs, folders compared byte for byte ------------
TINY = (
    "--mode serial --num-layers 1 --hidden-size 32 --num-heads 2 --seq-length 32 "
    "--global-batch-size 2 --vocab-size 64 --steps 2 --dist-timeout 60"
).split()
"""A one-process run of a few seconds."""


def train(args, timeout: float = 180, env: dict | None = None):
    """`python -m lss_megatron.train ARGS` in one process (no launcher), in `clean_env()`."""
    import sys

    return run_cmd([sys.executable, "-m", "lss_megatron.train", *args], timeout, env=env)


def snapshot(folder) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (folders as entries too)."""
    import hashlib

    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@contextlib.contextmanager
def small_filesystem(folder, size_kib: int):
    """A real file system of `size_kib` KiB mounted at `folder` (tmpfs; needs root or
    CAP_SYS_ADMIN), unmounted afterwards; the test is skipped, saying why, where none can be
    mounted (the mocked full-disk tests still run there)."""
    import subprocess

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        import pytest

        why = " ".join((res.stderr or res.stdout).split())[:200]
        pytest.skip(f"cannot mount a {size_kib} KiB tmpfs here ({why}); the mocked test covers it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def error_lines(stderr: str) -> list[str]:
    """The lines that report an error (the trainer's and the analysis commands' `error:`)."""
    return [x for x in stderr.splitlines() if "error:" in x or "Traceback" in x]


# --- single-process attention reference ----------------------------------------------------------
def attention_inputs(case, seed=0):
    """float64 q, k, v and an output gradient for `case` = (causal, h, h_kv, d, seq, b)."""
    import torch

    causal, h, h_kv, d, s, b = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, h_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, h_kv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(s, b, h, d, generator=g, dtype=torch.float64)
    return q, k, v, dout


def reference_attention(q, k, v, dout, causal):
    """Plain float64 attention on the full sequence, with autograd gradients."""
    import math

    import torch

    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    kk = k.repeat_interleave(rep, dim=2)  # [s, b, h, d]
    vv = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("ibhd,jbhd->bhij", q, kk) / math.sqrt(d)  # [b, h, s, s]
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    out = torch.einsum("bhij,jbhd->ibhd", scores.softmax(-1), vv)  # [s, b, h, d]
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# --- the GPT model on a layout, and its check against the one-process model ----------------------
# Tolerance 1e-5 (fp32 on CPU): the parallel paths and the one-process Megatron model differ only
# in attention kernels and reduction orders (fused CPU flash kernel and gloo sums versus
# baddbmm+softmax in one process); observed differences are ~1e-7.
TOL = 1e-5
REL_TOL = 1e-3
"""Gradients also within 1e-3 of the tensor's largest entry: small gradients (LayerNorm) would
otherwise get a large relative slack under the absolute 1e-5."""
SEED = 7
MODEL = dict(
    num_layers=2, hidden_size=32, num_heads=8, num_kv_heads=4, seq_length=16, vocab_size=64
)
GLOBAL_BATCH = 4
MICRO_BATCH = 1


def model_configs(world, n, d, pos, mode, causal=True, parallel=()):
    """The RunConfig of one layout; `parallel`: more ParallelConfig fields, as (name, value)
    pairs (e.g. ``(("lss_save_kv", "local"),)``)."""
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(position_embedding=pos, causal=causal, **MODEL),
        parallel=ParallelConfig(
            mode=mode, world_size=world, seq_parallel=n, data_parallel=d, **dict(parallel)
        ),
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, seed=SEED),
    ).validate()


def model_worker(rank, world, layouts):
    """For each (N, D, pos, mode[, causal, bucket_bytes[, parallel]]): one forward/backward step +
    gradient averaging (`parallel`: more ParallelConfig fields as (name, value) pairs)."""
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.model import build_model
    from lss_megatron.parallel import comm
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.parallel.params import is_sequence_local
    from lss_megatron.training.micro_batches import (
        forward_backward,
        global_mean_loss,
        step_micro_batches,
    )

    out = []
    for layout in layouts:
        n, d, pos, mode, causal, bucket_bytes, parallel = (
            (*layout, True, None, ())[:7] if len(layout) == 4 else (*layout, ())[:7]
        )
        cfg = model_configs(world, n, d, pos, mode, causal, parallel)
        grid = initialize_grid(cfg.parallel)
        # the reference runs Megatron's own DotProductAttention; the parallel modes flash
        model = build_model(
            cfg.model, grid, mode=mode, seed=SEED, kernel="dense" if mode == "serial" else "flash"
        )
        micro = step_micro_batches(cfg, grid, step=1)
        local_loss, token_losses = forward_backward(model, micro, return_token_losses=True)
        averager = GradientAverager(
            model, grid, **({"bucket_bytes": bucket_bytes} if bucket_bytes else {})
        )
        with comm.record() as grad_log:
            averager()
        loss = global_mean_loss(local_loss, grid)
        grads, local_grads, tp_dims = {}, {}, {}
        for name, p in model.named_parameters():
            if is_sequence_local(p):
                local_grads[name] = (p.grad.numpy().copy(), p.data.numpy().copy())
            else:
                grads[name] = p.grad.numpy().copy()
            if getattr(p, "tensor_model_parallel", False):
                tp_dims[name] = p.partition_dim
        out.append(
            {
                "layout": layout,
                "grad_calls": grad_log.count(category="grad"),
                "expected_grad_calls": averager.num_collectives,
                "num_params": sum(1 for _ in model.parameters()),
                "seq_rank": grid.seq_rank,
                "data_rank": grid.data_rank,
                "tp_rank": grid.tp_rank,
                "tp_dims": tp_dims,
                "loss": loss,
                "grads": grads,
                "local": local_grads,
                "token_losses": token_losses.numpy().copy(),  # [G/D, l/N]
                "init": {k: v.data.numpy().copy() for k, v in model.named_parameters()},
            }
        )
        destroy_grid()
    return out


def check_model(ref, ranks, n, d, pos):
    """The ranks of one parallel layout against the one-process run `ref` of `model_worker`:
    same initial weights (position slices = rows of the full table), the loss, every replicated
    gradient, the position slice gradient and per-token losses (segment edges included)."""
    import numpy as np

    assert len(ranks) == n * d
    seg = MODEL["seq_length"] // n
    per_replica = GLOBAL_BATCH // d
    for r in ranks:
        tag = f"N={n} D={d} {pos} seq_rank={r['seq_rank']} data_rank={r['data_rank']}"
        # same initial weights (the position slice = rows of the full table)
        for name, w in r["init"].items():
            ref_w = ref["init"][name]
            if name in r["local"]:
                ref_w = ref_w[r["seq_rank"] * seg : (r["seq_rank"] + 1) * seg]
            assert np.array_equal(w, ref_w), f"{tag}: initial {name} differs"
        assert r["grad_calls"] == r["expected_grad_calls"], tag
        assert abs(r["loss"] - ref["loss"]) < TOL, f"{tag}: loss {r['loss']} vs {ref['loss']}"
        # every replicated parameter gradient
        assert set(r["grads"]) | set(r["local"]) == set(ref["grads"]), tag
        for name, g in r["grads"].items():
            err = np.abs(g - ref["grads"][name]).max()
            assert err < TOL, f"{tag}: grad {name} max error {err:.3e}"
            assert err <= REL_TOL * np.abs(ref["grads"][name]).max(), f"{tag}: grad {name} rel"
        # the position slice gradient = matching rows of the full table's gradient
        if pos == "learned":
            assert list(r["local"]) == ["embedding.position_embeddings.weight"], tag
            g, _ = r["local"]["embedding.position_embeddings.weight"]
            ref_g = ref["grads"]["embedding.position_embeddings.weight"]
            rows = slice(r["seq_rank"] * seg, (r["seq_rank"] + 1) * seg)
            err = np.abs(g - ref_g[rows]).max()
            assert g.shape == (seg, MODEL["hidden_size"]), tag
            assert err < TOL, f"{tag}: position slice grad max error {err:.3e}"
        else:
            assert not r["local"], f"{tag}: RoPE must add no sequence-local parameter"
        # per-token losses, including both sides of every segment boundary
        rows = slice(r["data_rank"] * per_replica, (r["data_rank"] + 1) * per_replica)
        cols = slice(r["seq_rank"] * seg, (r["seq_rank"] + 1) * seg)
        ref_tok = ref["token_losses"][rows, cols]
        assert r["token_losses"].shape == ref_tok.shape, tag
        err = np.abs(r["token_losses"] - ref_tok).max()
        assert err < TOL, f"{tag}: token losses max error {err:.3e}"
        for edge in (0, seg - 1):  # first and last token of the segment
            e = np.abs(r["token_losses"][:, edge] - ref_tok[:, edge]).max()
            assert e < TOL, f"{tag}: boundary token {edge} loss error {e:.3e}"


# --- data ----------------------------------------------------------------------------------------
def byte_corpus(n_docs: int = 60, seed: int = 0, separator: bytes = b"<END>") -> bytes:
    """Documents of 20..300 random bytes (values < 250), each ending in `separator`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = [
        rng.integers(0, 250, rng.integers(20, 300), dtype=np.uint8).tobytes() + separator
        for _ in range(n_docs)
    ]
    return b"".join(docs)
