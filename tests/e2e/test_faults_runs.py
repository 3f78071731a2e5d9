"""Runs never overwrite each other, through the trainer as a user runs it: a refused second run
changes no byte of the first run's folders; resuming and ``--overwrite`` work; a failed resume
leaves no stale summary; ``--load`` warns when it falls back."""

from __future__ import annotations

import json
import shutil

import pytest

from lss_megatron import runs
from tests.support import TINY, snapshot, train

pytestmark = pytest.mark.faults


# --- end to end, as a user would ----------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out, ck = root / "A", root / "ck"
    res = train([*TINY, "--out", out, "--save", ck, "--save-interval", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    return root, out, ck


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_runs_change_no_byte_then_resume_and_overwrite_work(first_run):
    root, out, ck = first_run
    rid = json.loads((out / "run.json").read_text())["run_id"]
    assert json.loads((ck / runs.CHECKPOINTS_RECORD).read_text())["run_id"] == rid
    assert json.loads((ck / "step_00000002" / "meta.json").read_text())["config"]["run_id"] == rid
    before = snapshot(root)

    again = train([*TINY, "--out", out])  # the same command twice
    assert again.returncode == 2 and f"--out {out} already holds the outputs of run {rid}" in (
        again.stderr
    )
    other = train([*TINY, "--out", root / "B", "--save", ck])  # a new run, the first run's --save
    assert other.returncode == 2 and f"--save {ck} holds the checkpoints of run {rid}" in (
        other.stderr
    )
    assert snapshot(root) == before, "a refused run changed files on disk"

    # resuming the first run into its own folders: allowed, same run id, summary rewritten
    res = train([*TINY, "--steps", "3", "--out", out, "--save", ck, "--load", ck])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["run_id"] == rid
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["last_step"] == 3
    assert (ck / "latest").read_text() == "step_00000003"

    # --overwrite: a new run id, the first run's outputs gone; its checkpoints untouched
    ck_before = snapshot(ck)
    res = train([*TINY, "--out", out, "--overwrite"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["run_id"] != rid
    assert snapshot(ck) == ck_before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_resume_leaves_no_stale_summary(first_run, tmp_path):
    """The issue's trap: a new config beside the old summary.json looks finished. A run that
    resumes and then crashes leaves config.json and metrics, never the old summary."""
    root, _, ck = first_run
    out = tmp_path / "part"
    res = train([*TINY, "--steps", "4", "--out", out, "--load", ck, "--fault", "crash:0:4"])
    assert res.returncode != 0
    assert (out / "config.json").exists() and not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_falls_back_with_a_warning(first_run, tmp_path):
    _, _, ck = first_run

    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    newest = sorted(copy.glob("step_*"))[-1]
    (newest / "state.pt").unlink()  # the newest, named by latest, is now incomplete
    res = train([*TINY, "--steps", "4", "--out", tmp_path / "o", "--load", copy])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"'latest' names '{newest.name}', which is not a complete checkpoint" in res.stderr
