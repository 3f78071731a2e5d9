"""`--tensorboard-dir`, the Megatron-style iteration line and the output folder in the log.

The TensorBoard events are read back with TensorBoard's own `EventAccumulator`; every scalar
must equal the ``metrics.jsonl`` value of the same step and key (float32 in the event file:
relative 1e-6, since TensorBoard stores scalars as float32, whose relative spacing is 6e-8).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import read_metrics, torchrun_train

from lss_megatron.tracking import iteration_line, scalars, validation_line

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--num-layers", "1", "--hidden-size", "32", "--num-heads", "4", "--seq-length", "16",
    "--global-batch-size", "2", "--vocab-size", "64", "--steps", "4", "--optimizer", "sgd",
    "--lr", "0.1", "--seed", "3", "--dist-timeout", "60", "--progress", "off",
    "--eval-interval", "2", "--eval-steps", "1",
]  # fmt: skip
F32_REL = 1e-6


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_scalars_are_the_numeric_metrics():
    rec = {"step": 3, "loss": 1.5, "skipped": False, "note": "x", "per_rank": [4, 5],
           "bytes": 7}  # fmt: skip
    assert scalars(rec) == {"loss": 1.5, "skipped": 0.0, "per_rank/0": 4.0, "per_rank/1": 5.0,
                            "bytes": 7.0}  # fmt: skip


def test_iteration_line_fields():
    rec = {"step": 7, "consumed_samples": 56, "consumed_tokens": 56 * 128, "step_time_s": 0.0412,
           "tflops_per_s_per_rank": 0.00123, "lr": 1e-3, "loss": 2.07944, "grad_norm": 0.5123,
           "skipped_steps": 1, "peak_mem_bytes": 612 * 2**20}  # fmt: skip
    line = iteration_line(rec, steps=100, global_batch=8)
    for frag in ("iteration        7/     100", "consumed samples:           56",
                 "consumed tokens:           7168", "elapsed time per iteration (ms): 41.2",
                 "throughput per rank (TFLOP/s/rank): 0.00123", "learning rate: 1.000000E-03",
                 "global batch size:     8", "lm loss: 2.079440E+00", "grad norm: 0.512",
                 "number of skipped iterations:   1", "peak memory (MiB): 612.0 (CPU RSS)"):  # fmt: skip
        assert frag in line, (frag, line)
    gpu = iteration_line(rec, steps=100, global_batch=8, device_type="cuda")
    assert "(GPU max allocated)" in gpu
    valid = validation_line({"step": 7, "valid_loss": 2.0, "valid_bpb": 2.0 / math.log(2)})
    assert "lm loss value: 2.000000E+00" in valid and f"PPL: {math.exp(2):.6E}" in valid


@pytest.mark.timeout(300)
def test_tensorboard_events_equal_metrics_and_log_lines(tmp_path):
    """2-rank LSS run: the event file's scalars are metrics.jsonl's; one iteration line per step
    (--log-interval 1) and a validation line at steps 2 and 4; the output folder named at the
    start and at the end; only rank 0 writes events."""
    out, tb = tmp_path / "out", tmp_path / "tb"
    res = torchrun_train(2, ["--mode", "lss", "--out", str(out), "--tensorboard-dir", str(tb),
                             *COMMON])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    events = _events(tb)
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    expected = {}
    for r in rows:
        for tag, value in scalars(r).items():
            expected.setdefault(tag, {})[r["step"]] = value
    assert set(events) == set(expected)
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "valid_loss",
                "activation_bytes", "consumed_tokens", "tflops_per_s_per_rank"):  # fmt: skip
        assert key in events, key
    for tag, by_step in expected.items():
        assert set(events[tag]) == set(by_step), tag
        for step, value in by_step.items():
            assert math.isclose(events[tag][step], value, rel_tol=F32_REL, abs_tol=1e-30), (
                tag, step, events[tag][step], value)  # fmt: skip
    log = res.stderr
    lines = [x for x in log.splitlines() if "iteration " in x and "lm loss:" in x]
    assert len(lines) == 4, log[-3000:]
    tokens = 2 * 16
    for step, line in enumerate(lines, start=1):
        assert f"iteration {step:8d}/       4" in line
        assert f"consumed tokens: {step * tokens:14d}" in line
        for frag in ("elapsed time per iteration (ms):", "TFLOP/s/rank", "learning rate:",
                     "grad norm:", "peak memory (MiB):"):  # fmt: skip
            assert frag in line, line
    assert sum("validation loss at iteration" in x for x in log.splitlines()) == 2
    assert f"output folder: {out.resolve()}" in log and f"TensorBoard: {tb.resolve()}" in log
    assert f"outputs in {out.resolve()}" in log
    assert log.index("output folder:") < log.index("iteration ") < log.index("outputs in")


def test_bad_tensorboard_dir_fails_at_validation(tmp_path):
    """A folder under a regular file cannot be made: exit 2, one message, no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    res = subprocess.run([sys.executable, "-m", "lss_megatron.train", "--tensorboard-dir",
                          str(blocker / "tb")], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert f"--tensorboard-dir {blocker / 'tb'}: {blocker} is not a folder" in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("--tensorboard-dir") == 1
