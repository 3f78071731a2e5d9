"""The trainer with ``--mode lss --seq-parallel N --tensor-parallel T``: losses, counters, checkpoints.

* N=2 x T=2 (4 processes) and N=2 x T=2 x D=2 (8 processes, zigzag) against serial: every step's
  global loss within 1e-5 (fp32; only kernels and reduction order differ, observed ~1e-7);
* every counter the cost model reproduces (`analysis.costmodel.COUNTED`: sp bytes = LSS's K/V
  gathers of h_kv/T heads + Megatron's TP/SP collectives on l/N tokens, gradient bytes with the
  TP sums, parameter and optimizer bytes) exactly, and ``activation_bytes`` exactly;
* checkpoints reshard across T like across N and modes: written at N=2 x T=2 (step 2), resumed
  at N=4 x T=1 and in serial, the losses continue as the uninterrupted run's within 1e-5;
* bad T: one clear error, exit 2, before any process group.

The runs of a phase start together (each spends most of its time importing); slow: 8 + 4 + 1
processes on a small machine take minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from analysis.costmodel import COUNTED, compare_run
from tests.support import ROOT, read_metrics

TOL = 1e-5
STEPS = 4
ARGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-heads",
    "4",
    "--seq-length",
    "32",
    "--vocab-size",
    "64",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "1",
    "--steps",
    str(STEPS),
    "--optimizer",
    "adamw",
    "--lr",
    "3e-3",
    "--seed",
    "9",
    "--progress",
    "off",
    "--dist-timeout",
    "120",
]


def _launch(runs: dict, base, timeout: float) -> None:
    """Start every run {name: (nproc, flags)} at once; fail with the log of any that fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name, (nproc, flags) in runs.items():
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "lss_megatron.train",
            *ARGS,
            *flags,
            "--out",
            str(base / name),
        ]
        log = (base / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    try:
        for name, p in procs.items():
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, (
                f"{name}: exit {p.returncode}\n" + (base / f"{name}.log").read_text()[-3000:]
            )
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lss_tp")
    ckpt = base / "ckpt"
    _launch(
        {
            "serial": (1, ["--mode", "serial"]),
            "n2t2": (
                4,
                [
                    "--mode",
                    "lss",
                    "--seq-parallel",
                    "2",
                    "--tensor-parallel",
                    "2",
                    "--save",
                    str(ckpt),
                    "--save-interval",
                    "2",
                ],
            ),
            "n2t2d2": (
                8,
                [
                    "--mode",
                    "lss",
                    "--seq-parallel",
                    "2",
                    "--tensor-parallel",
                    "2",
                    "--data-parallel",
                    "2",
                    "--lss-layout",
                    "zigzag",
                ],
            ),
        },
        base,
        timeout=600,
    )
    _launch(
        {
            "resume_n4t1": (
                4,
                ["--mode", "lss", "--seq-parallel", "4", "--load", str(ckpt / "step_00000002")],
            ),
            "resume_serial": (1, ["--mode", "serial", "--load", str(ckpt / "step_00000002")]),
        },
        base,
        timeout=400,
    )
    return base


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.parametrize("name", ["n2t2", "n2t2d2"])
def test_losses_match_serial(runs, name):
    serial, got = _losses(runs / "serial"), _losses(runs / name)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - serial[step]) < TOL, (name, step, got[step], serial[step])


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.parametrize("name", ["n2t2", "n2t2d2"])
def test_counters_match_the_cost_model(runs, name):
    """Every counted field equals the cost model's prediction (the same in every step)."""
    for key, (predicted, counted) in compare_run(runs / name).items():
        assert key in (*COUNTED, "activation_bytes")
        assert predicted == counted, f"{name}: {key} predicted {predicted}, counted {counted}"
    rows = read_metrics(runs / name)
    assert all(r["sp_comm_bytes"] > 0 and r["grad_comm_bytes"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(1100)
@pytest.mark.parametrize("name", ["resume_n4t1", "resume_serial"])
def test_checkpoint_written_at_t2_resumes_elsewhere(runs, name):
    """Saved at N=2 x T=2: TP shards concatenated, position slices stitched; re-cut on load."""
    serial, got = _losses(runs / "serial"), _losses(runs / name)
    assert sorted(got) == list(range(3, STEPS + 1)), "resumed after step 2"
    for step in got:
        assert abs(got[step] - serial[step]) < TOL, (name, step, got[step], serial[step])


@pytest.mark.parametrize(
    "world,args,fragment",
    [
        (
            6,
            ["--tensor-parallel", "3"],
            "--tensor-parallel: --num-heads 4 is not divisible by T = 3",
        ),
        (4, ["--tensor-parallel", "2", "--vocab-size", "63"], "the model vocabulary 63"),
        (
            8,
            ["--seq-parallel", "2", "--tensor-parallel", "2", "--data-parallel", "3"],
            "P = 8 processes must equal --seq-parallel N x --tensor-parallel T x --data-parallel D",
        ),
        (
            4,
            ["--mode", "nvidia-sp", "--seq-parallel", "2", "--tensor-parallel", "2"],
            "--tensor-parallel 2 applies to --mode lss only",
        ),
        (
            4,
            ["--tensor-parallel", "2", "--num-kv-heads", "2", "--kv-gather-chunks", "2"],
            "does not divide the key/value heads 2 / T = 1 per rank",
        ),
    ],
)
def test_bad_tensor_parallel_fails_fast(world, args, fragment):
    """WORLD_SIZE as a launcher sets it, no MASTER_ADDR: exit 2 at validation, no traceback."""
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    res = subprocess.run(
        [sys.executable, "-m", "lss_megatron.train", *ARGS, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert fragment in res.stderr, res.stderr
    assert res.stderr.count("error:") == 1 and "Traceback" not in res.stderr
