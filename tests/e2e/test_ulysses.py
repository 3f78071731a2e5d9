"""`--mode ulysses` through the trainer: parity with serial under torchrun, and fast failure.

* Trainer parity: 10 SGD steps of `--mode ulysses` under torchrun equal `--mode serial` within
  1e-5 (fp32 on CPU: only kernels and reduction order differ), and `sp_comm_bytes` per step is the
  derived all-to-all volume (`baselines.ulysses.sp_bytes_per_layer`); nothing is JIT-compiled.
* Heads or key/value heads not divisible by N: the trainer exits 2 with the message before any
  process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lss_megatron.baselines.ulysses import sp_bytes_per_layer
from lss_megatron.config import ModelConfig
from tests.support import ROOT, read_metrics, torchrun_train

TOL = 1e-5


COMMON = (
    "--num-layers 2 --hidden-size 32 --num-heads 8 --num-kv-heads 4 --seq-length 32 "
    "--global-batch-size 4 --micro-batch-size 1 --vocab-size 64 --steps 10 --optimizer sgd "
    "--lr 0.5 --seed 11 --dtype fp32 --data synthetic --dist-timeout 60 --progress off "
    "--eval-interval 5 --eval-steps 1"
).split()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ulysses_trainer_matches_serial(tmp_path):
    """torchrun, 10 SGD steps: every step's loss, gradient norm and validation loss equal
    serial's within 1e-5, replicas stay bitwise equal, and sp_comm_bytes per step is the
    all-to-all volume."""
    ext = tmp_path / "torch_extensions"
    outs = {m: tmp_path / m for m in ("serial", "ulysses")}
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    with ThreadPoolExecutor(2) as pool:  # both launches at once
        futures = {
            mode: pool.submit(
                torchrun_train,
                nproc,
                ["--mode", mode, "--seq-parallel", str(nproc), "--out", str(outs[mode]), *COMMON],
                240,
                env,
            )
            for mode, nproc in (("serial", 1), ("ulysses", 2))
        }
        for mode, future in futures.items():
            res = future.result()
            assert res.returncode == 0, f"{mode}: {res.stderr[-3000:]}"
    ser, uly = read_metrics(outs["serial"]), read_metrics(outs["ulysses"])
    assert len(ser) == len(uly) == 10
    for a, b in zip(uly, ser, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * max(1.0, b["grad_norm"])
        assert ("valid_loss" in a) == ("valid_loss" in b) == (a["step"] % 5 == 0)
        if "valid_loss" in a:  # eval mode, no grad, at steps 5 and 10
            assert abs(a["valid_loss"] - b["valid_loss"]) < TOL, (a["step"], a, b)
    config = json.loads((outs["ulysses"] / "config.json").read_text())
    rt = config["runtime"]
    assert (rt["core_attention"], rt["context_parallel"], rt["tensor_parallel"]) == (
        "UlyssesCoreAttention",
        2,
        1,
    )
    assert json.loads((outs["ulysses"] / "summary.json").read_text())["replicas"]["bitwise_equal"]
    # 4 micro-batches of 1 sequence, 2 layers, 4 all-to-alls forward + 4 backward
    model = ModelConfig(num_layers=2, hidden_size=32, num_heads=8, num_kv_heads=4, seq_length=32)
    per_layer = sp_bytes_per_layer(model, 2, micro_batch=1)
    assert per_layer == (2 - 1) * (32 // 2) * 1 * 4 * 4 * (2 * 8 + 2 * 4) // 2  # = 3072
    for row in uly:
        assert row["sp_comm_calls"] == 4 * 2 * 8, row
        assert row["sp_comm_bytes"] == 4 * 2 * 2 * per_layer, row  # = 49152
        assert row["grad_comm_calls"] == 1, row  # D = 1: one bucket over the 2 ranks
    assert not ext.exists(), "DeepSpeed JIT-compiled an extension"


def test_ulysses_cli_fails_fast():
    """The trainer exits 2 with the message before any process group (none could be built:
    WORLD_SIZE is set but MASTER_ADDR is not)."""
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lss_megatron.train",
            "--mode",
            "ulysses",
            "--seq-parallel",
            "4",
            "--num-heads",
            "6",
            "--num-kv-heads",
            "3",
            "--hidden-size",
            "48",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "--num-heads 6 is not divisible by N = 4" in res.stderr, res.stderr
    assert "--num-kv-heads 3 is not divisible by N = 4" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 10
