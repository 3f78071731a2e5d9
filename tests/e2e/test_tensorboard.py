"""`--tensorboard-dir`, the Megatron-style iteration line and the output folder in the log.

The TensorBoard events are read back with TensorBoard's own `EventAccumulator`; every scalar
must equal the ``metrics.jsonl`` value of the same step and key (Megatron-LM's tag name where it
has one: tracking.MEGATRON_TAGS) (float32 in the event file:
relative 1e-6, since TensorBoard stores scalars as float32, whose relative spacing is 6e-8).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lss_megatron.training.tracking import scalars
from tests.support import ROOT, read_metrics, torchrun_train

COMMON = (
    "--num-layers 1 --hidden-size 32 --num-heads 4 --seq-length 16 --global-batch-size 2 "
    "--vocab-size 64 --steps 4 --optimizer sgd --lr 0.1 --seed 3 --dist-timeout 60 --progress off "
    "--eval-interval 2 --eval-steps 1"
).split()
F32_REL = 1e-6


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(300)
@pytest.mark.slow  # ~9 s: a trainer launch
def test_tensorboard_events_equal_metrics_and_log_lines(tmp_path):
    """2-rank LSS run: the event file's scalars are metrics.jsonl's; one iteration line per step
    (--log-interval 1) and a validation line at steps 2 and 4; the output folder named at the
    start and at the end; only rank 0 writes events."""
    out, tb = tmp_path / "out", tmp_path / "tb"
    res = torchrun_train(
        2, ["--mode", "lss", "--out", str(out), "--tensorboard-dir", str(tb), *COMMON]
    )
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
    for key in (
        "lm loss",
        "learning-rate",
        "grad-norm",
        "iteration-time",
        "tokens_per_s",
        "lm loss validation",
        "lm loss validation ppl",
        "activation_bytes",
        "consumed_tokens",
        "tflops_per_s_per_rank",
    ):
        assert key in events, key
    for tag, by_step in expected.items():
        assert set(events[tag]) == set(by_step), tag
        for step, value in by_step.items():
            assert math.isclose(events[tag][step], value, rel_tol=F32_REL, abs_tol=1e-30), (
                tag,
                step,
                events[tag][step],
                value,
            )
    log = res.stderr
    lines = [x for x in log.splitlines() if "iteration " in x and "lm loss:" in x]
    assert len(lines) == 4, log[-3000:]
    tokens = 2 * 16
    for step, line in enumerate(lines, start=1):
        assert f"iteration {step:8d}/       4" in line
        assert f"consumed tokens: {step * tokens:14d}" in line
        for frag in (
            "elapsed time per iteration (ms):",
            "TFLOP/s/rank",
            "learning rate:",
            "grad norm:",
            "peak memory (MiB):",
        ):
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
    res = subprocess.run(
        [sys.executable, "-m", "lss_megatron.train", "--tensorboard-dir", str(blocker / "tb")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert f"--tensorboard-dir {blocker / 'tb'}: {blocker} is not a folder" in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("--tensorboard-dir") == 1
