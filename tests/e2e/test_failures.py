"""Failure behaviour under torchrun: crashes and hangs end the job non-zero, within twice the
collective timeout, leaving no process behind; a non-finite loss is one decision on every rank.

Failures are injected with the trainer's testing aid ``--fault KIND:RANK:STEP``.
"""

from __future__ import annotations

import time

import psutil
import pytest

from tests.support import read_metrics, torchrun_train

TIMEOUT_S = 8
STARTUP_S = 20  # interpreter + torch + megatron imports and model build on a busy 2-core machine
ARGS = (
    "--mode lss --seq-parallel 2 --num-layers 1 --hidden-size 32 --num-heads 2 --seq-length 32 "
    f"--global-batch-size 2 --steps 6 --dist-timeout {TIMEOUT_S}"
).split()


def _orphans(marker: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "pytest" not in cmd:
            found.append(f"{p.pid}: {cmd[:120]}")
    return found


@pytest.mark.timeout(180)
# the hang waits out the 8 s collective timeout, then torchrun takes the job down
@pytest.mark.parametrize("kind", ["crash", pytest.param("hang", marks=pytest.mark.slow)])
def test_failing_rank_takes_the_job_down(tmp_path, kind):
    out = tmp_path / f"out-{kind}"
    t0 = time.monotonic()
    res = torchrun_train(2, [*ARGS, "--out", str(out), "--fault", f"{kind}:1:3"], timeout=150)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < STARTUP_S + 2 * TIMEOUT_S, f"took {elapsed:.1f} s"
    assert f"injected {kind} at step 3" in res.stderr
    if kind == "hang":
        # the healthy rank reports why it stopped
        assert f"a collective timed out after {TIMEOUT_S} s (--dist-timeout)" in res.stderr, (
            res.stderr[-3000:]
        )
    time.sleep(1.0)
    assert _orphans(str(out)) == [], "processes left behind"
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [1, 2], "rank 0 logged the steps before the failure, and no more"


@pytest.mark.timeout(120)
@pytest.mark.slow  # ~10 s launch; unit/test_faults_nonfinite keeps the non-finite checks fast
def test_nonfinite_loss_stops_with_the_step_named(tmp_path):
    res = torchrun_train(2, [*ARGS, "--out", str(tmp_path), "--fault", "nan:1:2"], timeout=100)
    assert res.returncode != 0
    assert "non-finite loss nan at step 2: stopping" in res.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


@pytest.mark.timeout(120)
@pytest.mark.slow  # ~8 s launch; unit/test_faults_nonfinite keeps the non-finite checks fast
def test_skip_nonfinite_is_the_same_decision_on_every_rank(tmp_path):
    """Only rank 1's loss is NaN; the all-reduced loss makes every rank skip step 2, so the run
    finishes with replicas still bitwise equal (the trainer checks that at the end)."""
    res = torchrun_train(
        2, [*ARGS, "--out", str(tmp_path), "--fault", "nan:1:2", "--skip-nonfinite"], timeout=100
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, False]
    assert rows[-1]["skipped_steps"] == 1
    assert "non-finite loss at step 2: step skipped" in res.stderr
