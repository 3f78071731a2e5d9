"""The cost model (analysis.costmodel) against real trainer runs.

Trainer runs (fp32, small models, micro-batching) cover serial, lss (N=2 D=1, N=2 D=2 learned,
N=4 rope) and nvidia-sp (N=2, N=2 D=2); they are launched together under torchrun with a hard
timeout (each run spends most of its time importing, so running them side by side is faster than
in a row even on 2 cores). Every metrics row must show exactly the predicted ``sp_comm_bytes``,
``grad_comm_bytes`` (and other counters), and ``activation_bytes``, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from analysis.costmodel import predict
from tests.support import ROOT

RUN_TIMEOUT_S = 150


COMMON = (
    "--num-layers 2 --hidden-size 32 --num-heads 4 --seq-length 64 --vocab-size 64 --steps 2 "
    "--progress off --dist-timeout 60 --optimizer adamw --dtype fp32"
).split()


RUNS = {  # name: (processes, flags); G / (D B) > 1 everywhere: micro-batching
    "serial": (2, "--mode serial --global-batch-size 4 --micro-batch-size 1".split()),
    "lss-n2": (
        2,
        "--mode lss --seq-parallel 2 --data-parallel 1 --global-batch-size 2 "
        "--micro-batch-size 1".split(),
    ),
    "lss-n2d2": (
        4,
        "--mode lss --seq-parallel 2 --data-parallel 2 --position-embedding learned "
        "--global-batch-size 4 --micro-batch-size 1".split(),
    ),
    "lss-n4-rope": (
        4,
        "--mode lss --seq-parallel 4 --position-embedding rope --num-kv-heads 2 "
        "--global-batch-size 4 --micro-batch-size 2".split(),
    ),
    "nvsp-n2": (
        2,
        "--mode nvidia-sp --seq-parallel 2 --global-batch-size 2 --micro-batch-size 1".split(),
    ),
    "nvsp-n2d2": (
        4,
        "--mode nvidia-sp --seq-parallel 2 --data-parallel 2 --position-embedding rope "
        "--global-batch-size 4 --micro-batch-size 1".split(),
    ),
}


EXACT = (
    "sp_comm_bytes",
    "grad_comm_bytes",
    "other_comm_bytes",
    "sp_comm_calls",
    "grad_comm_calls",
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "model_flops_per_step",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Launch every run at once; return {name: (config, metrics rows)}."""
    base = tmp_path_factory.mktemp("costmodel")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name, (nproc, flags) in RUNS.items():
        out = base / name
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "lss_megatron.train",
            *COMMON,
            *flags,
            "--out",
            str(out),
        ]
        log = (base / f"{name}.log").open("w")
        procs[name] = (
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            ),
            out,
            log,
        )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    failed, late = [], []
    try:
        for name, (p, _, _) in procs.items():
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(name)
                break
            if p.returncode != 0:
                failed.append(
                    f"{name}: exit {p.returncode}\n" + (base / f"{name}.log").read_text()[-2000:]
                )
    finally:
        for p, _, log in procs.values():  # hard stop: the whole process group of a live run
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
            log.close()
    assert not late, f"trainer run {late[0]} did not finish within {RUN_TIMEOUT_S} s"
    assert not failed, "\n".join(failed)
    result = {}
    for name, (_, out, _) in procs.items():
        config = json.loads((out / "config.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
        assert len(rows) == 2, name
        result[name] = (config, rows)
    return result


@pytest.mark.slow  # the module fixture launches six trainer runs
@pytest.mark.parametrize("name", list(RUNS))
def test_counts_match_trainer(runs, name):
    config, rows = runs[name]
    pred = predict(config)
    assert config["train"]["num_micro_batches"] > 1  # micro-batching is exercised
    for row in rows:  # the first step counts the same collectives as the others
        for key in EXACT:
            assert pred[key] == row[key], (name, row["step"], key, pred[key], row[key])
        assert pred["activation_bytes"] == row["activation_bytes"], (
            name,
            pred["activation_bytes"],
            row["activation_bytes"],
        )
    assert pred["parameters_per_rank"] == config["runtime"]["parameters_per_rank"]
