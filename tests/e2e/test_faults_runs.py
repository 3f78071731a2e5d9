"""Runs never overwrite each other, through the trainer as a user runs it: a refused second run
changes no byte of the first run's folders; resuming and ``--overwrite`` work; a failed resume
leaves no stale summary; ``--load`` warns when it falls back."""

from __future__ import annotations

import json
import shutil

import pytest

from lss_megatron import runs
from tests.support import TINY, error_lines, snapshot, train

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


# --- ownership under concurrency, resume that knows what it resumes --------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_runs_started_at_once_into_one_save(tmp_path):
    """The issue's first case: both start while --save is empty. The lock (runlock.py) lets one
    take it; the other ends with exit 2 and one line naming the holder or the owner, and every
    checkpoint in --save is the winner's."""
    import subprocess
    import sys

    from tests.support import clean_env

    ck = tmp_path / "ck"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lss_megatron.train",
                *TINY,
                "--steps",
                "3",
                "--save-interval",
                "1",
                "--out",
                str(tmp_path / name),
                "--save",
                str(ck),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for name in ("A", "B")
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    winner = "AB"[[rc for rc, _ in results].index(0)]
    loser_err = [err for rc, err in results if rc == 2][0]
    lines = [x for x in loser_err.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert len(lines) == 1 and "Traceback" not in loser_err, loser_err
    assert "is in use by another run: pid" in lines[0] or "holds the checkpoints of run" in lines[0]
    rid = json.loads((tmp_path / winner / "run.json").read_text())["run_id"]
    steps = sorted(ck.glob("step_*"))
    assert [d.name for d in steps] == ["step_00000001", "step_00000002", "step_00000003"]
    assert {json.loads((d / "meta.json").read_text())["config"]["run_id"] for d in steps} == {rid}
    assert not (ck / ".lss-megatron.lock").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_knows_what_it_resumes(tmp_path):
    """An older step into the run's own folders is refused (no byte changes), and so is a change
    of meaning (causal, seed); an allowed change is one line each; a partial last line of
    metrics.jsonl does not block the resume; --overwrite continues from the older step and
    discards exactly the later checkpoints."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    base = [*TINY, "--out", out, "--save", ck]
    res = train([*base, "--steps", "3", "--save-interval", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    before = snapshot(tmp_path)

    older = train([*base, "--steps", "4", "--load", ck / "step_00000001"])
    assert older.returncode == 2 and "Traceback" not in older.stderr
    assert len(error_lines(older.stderr)) == 1
    assert "at step 1, but that run went on to step_00000003" in older.stderr
    meaning = train([*base, "--steps", "4", "--load", ck, "--seed", "9", "--no-causal"])
    assert meaning.returncode == 2 and "Traceback" not in meaning.stderr
    assert "causal: checkpoint True vs run False" in meaning.stderr
    assert "seed: checkpoint 1234 vs run 9" in meaning.stderr
    assert snapshot(tmp_path) == before, "a refused resume changed files"

    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    res = train([*base, "--steps", "4", "--load", ck, "--lr", "5e-4"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming with --lr 0.0005 (the checkpoint's run had 0.001)" in res.stderr
    assert "resuming with --steps 4 (the checkpoint's run had 3)" in res.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    kept = snapshot(ck / "step_00000001")
    res = train([*base, "--steps", "4", "--load", ck / "step_00000002", "--overwrite"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "its later checkpoints are discarded (step_00000003, step_00000004)" in res.stderr
    assert sorted(d.name for d in ck.glob("step_*")) == [
        "step_00000001",
        "step_00000002",
        "step_00000004",
    ]
    assert (ck / "latest").read_text() == "step_00000004"
    assert snapshot(ck / "step_00000001") == kept
