"""Non-finite numbers never pass silently, end to end: a diverging run under ``--skip-nonfinite``
stops after ``--max-consecutive-skips`` (exit 3) and checkpoints only its good steps; a skipped
last step writes no checkpoint."""

from __future__ import annotations

import json

import pytest

from tests.support import TINY, train

pytestmark = pytest.mark.faults


# SGD at lr 1e38 (finite, accepted) throws the weights so far that every loss after step 1 is
# non-finite: a run that diverges for good, as a user would meet it.
DIVERGING = [
    *TINY,
    "--optimizer",
    "sgd",
    "--lr",
    "1e38",
    "--clip-grad",
    "0",
    "--lr-schedule",
    "constant",
    "--skip-nonfinite",
    "--save-interval",
    "1",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_diverging_run_stops_after_the_bound_and_saves_only_good_steps(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    res = train(
        [*DIVERGING, "--steps", "6", "--max-consecutive-skips", "2", "--out", out, "--save", ck]
    )
    assert res.returncode == 3, res.stderr[-3000:]
    assert "non-finite loss in 2 consecutive steps (2..3): stopping" in res.stderr
    assert res.stderr.count("ERROR") == 1 and "Traceback" not in res.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True)]
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000001"]
    assert (ck / "latest").read_text() == "step_00000001"
    assert not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_skipped_last_step_writes_no_checkpoint(tmp_path):
    """Within the bound the run finishes (exit 0), but the final save at a skipped step is
    refused with a warning: `latest` still names the last good step."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    res = train(
        [*DIVERGING, "--steps", "3", "--max-consecutive-skips", "5", "--out", out, "--save", ck]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 3 was skipped (non-finite loss): no checkpoint written for it" in res.stderr
    assert (ck / "latest").read_text() == "step_00000001"
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 2
