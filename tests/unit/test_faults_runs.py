"""Runs never overwrite each other (runs.py), on folders built by hand: ``--out`` and ``--save``
belong to one run; resuming continues it; ``--overwrite`` replaces on request; ``--load`` trusts
``latest`` and says when it falls back; stale temporaries are cleaned. (The same through the
trainer, byte for byte: tests/e2e/test_faults_runs.py.)"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from lss_megatron import runlock, runs
from lss_megatron.config import TrainConfig

pytestmark = pytest.mark.faults


def _claim(cfg, record, notes=None) -> str:
    """runs.claim, then the locks released (as the trainer does when it ends)."""
    try:
        return runs.claim(cfg, record, notes)
    finally:
        runlock.release_all()


def _ckpt(folder: Path, step: int, run_id: str | None, complete: bool = True) -> Path:
    d = folder / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, "config": {"run_id": run_id}}))
    if complete:
        (d / "state.pt").write_bytes(b"tensors")
    return d


def _outputs(folder: Path, run_id: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"run_id": run_id}))
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        (folder / name).write_text("{}\n")


def _train_cfg(tmp_path, **kw) -> TrainConfig:
    return replace(TrainConfig(out=str(tmp_path / "out")), **kw)


# --- --out ----------------------------------------------------------------------------------------
def test_fresh_or_foreign_files_only_is_a_new_run(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stderr.log").write_text("a launcher's log, not a run's output")
    p = runs.plan(_train_cfg(tmp_path))
    assert (p.problems, p.out, p.run_id) == ([], "new", None)


def test_another_runs_outputs_are_refused(tmp_path):
    _outputs(tmp_path / "out", "run-A")
    p = runs.plan(_train_cfg(tmp_path))
    assert len(p.problems) == 1
    assert "--out" in p.problems[0] and "run-A" in p.problems[0] and "--overwrite" in p.problems[0]


def test_resuming_the_same_run_is_allowed(tmp_path):
    _outputs(tmp_path / "out", "run-A")
    _ckpt(tmp_path / "ck", 2, "run-A")
    p = runs.plan(_train_cfg(tmp_path, load=str(tmp_path / "ck")))
    assert (p.problems, p.out, p.run_id) == ([], "resume", "run-A")
    _ckpt(tmp_path / "other", 2, "run-B")  # another run's checkpoint: not a resume of run-A
    p = runs.plan(_train_cfg(tmp_path, load=str(tmp_path / "other")))
    assert len(p.problems) == 1 and "run-A" in p.problems[0]


def test_overwrite_replaces_exactly_the_run_files(tmp_path):
    out = tmp_path / "out"
    _outputs(out, "run-A")
    (out / "notes.txt").write_text("mine")
    cfg = _train_cfg(tmp_path, overwrite=True)
    assert runs.plan(cfg).out == "overwrite"
    new_id = _claim(cfg, {})
    assert new_id != "run-A"
    assert sorted(x.name for x in out.iterdir()) == ["notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text())["run_id"] == new_id


def test_a_resumed_run_never_keeps_the_old_summary(tmp_path):
    out = tmp_path / "out"
    _outputs(out, "run-A")
    _ckpt(tmp_path / "ck", 2, "run-A")
    assert _claim(_train_cfg(tmp_path, load=str(tmp_path / "ck")), {}) == "run-A"
    assert not (out / "summary.json").exists()
    assert (out / "metrics.jsonl").exists(), "the resumed run keeps (and trims) its metrics"


# --- --save ---------------------------------------------------------------------------------------
def test_saving_into_another_runs_checkpoints_is_refused(tmp_path):
    ck = tmp_path / "ck"
    _ckpt(ck, 3, "run-A")
    (ck / runs.CHECKPOINTS_RECORD).write_text(json.dumps({"run_id": "run-A"}))
    p = runs.plan(_train_cfg(tmp_path, save=str(ck)))
    assert len(p.problems) == 1 and "--save" in p.problems[0] and "run-A" in p.problems[0]
    assert runs.plan(_train_cfg(tmp_path, save=str(ck), load=str(ck))).save == "resume"
    assert runs.plan(_train_cfg(tmp_path, save=str(ck), overwrite=True)).save == "overwrite"


def test_overwrite_of_checkpoints_deletes_the_old_steps(tmp_path):
    ck = tmp_path / "ck"
    _ckpt(ck, 3, "run-A")
    (ck / "latest").write_text("step_00000003")
    (ck / runs.CHECKPOINTS_RECORD).write_text(json.dumps({"run_id": "run-A"}))
    rid = _claim(_train_cfg(tmp_path, save=str(ck), overwrite=True), {"model": {"x": 1}})
    assert sorted(x.name for x in ck.iterdir()) == [runs.CHECKPOINTS_RECORD]
    assert json.loads((ck / runs.CHECKPOINTS_RECORD).read_text()) == {
        "run_id": rid,
        "model": {"x": 1},
        "checkpoints": [],
        "temporaries": [],
    }


def test_a_legacy_folder_resumed_in_place_is_allowed(tmp_path):
    """Checkpoints saved before folders had owners: resuming from the folder itself is fine."""
    ck = tmp_path / "ck"
    _ckpt(ck, 3, None)
    assert runs.plan(_train_cfg(tmp_path, save=str(ck), load=str(ck))).problems == []
    assert runs.plan(_train_cfg(tmp_path, save=str(ck))).problems != []


def test_stale_temporary_folders_are_cleaned(tmp_path):
    """Temporaries of this folder's killed saves (listed in its manifest) go when the run takes
    the folder; one it did not list (someone else's) stays."""
    ck = tmp_path / "ck"
    (ck / ".tmp-step_00000004-abc").mkdir(parents=True)
    (ck / ".tmp-step_00000004-abc" / "state.pt").write_bytes(b"half")
    (ck / ".old-step_00000002-def").mkdir()
    (ck / ".tmp-not-ours").mkdir()
    (ck / ".latest.tmp").write_text("step_")
    _ckpt(ck, 2, None)
    (ck / runs.CHECKPOINTS_RECORD).write_text(
        json.dumps({"temporaries": [".tmp-step_00000004-abc", ".old-step_00000002-def"]})
    )
    _claim(_train_cfg(tmp_path, save=str(ck), load=str(ck)), {})
    assert sorted(x.name for x in ck.iterdir()) == [
        ".tmp-not-ours",
        runs.CHECKPOINTS_RECORD,
        "step_00000002",
    ]


# --- --load: which checkpoint -------------------------------------------------------------------
def test_load_trusts_latest_over_a_newer_step(tmp_path):
    ck = tmp_path / "ck"
    _ckpt(ck, 2, "run-A")
    _ckpt(ck, 9, "run-B")  # e.g. left by another run: not what `latest` names
    (ck / "latest").write_text("step_00000002\n")
    assert runs.latest_checkpoint(ck) == (ck / "step_00000002", "")


@pytest.mark.parametrize(
    "latest,why",
    [
        ("step_00000007", "'latest' names 'step_00000007', which is not a complete checkpoint"),
        ("../../etc", "'latest' names '../../etc', which is not a complete checkpoint"),
        (None, "it has no 'latest' file"),
    ],
)
def test_load_says_when_it_falls_back(tmp_path, latest, why):
    ck = tmp_path / "ck"
    _ckpt(ck, 2, "run-A")
    _ckpt(ck, 5, "run-A")
    _ckpt(ck, 7, "run-A", complete=False)
    if latest is not None:
        (ck / "latest").write_text(latest)
    path, note = runs.latest_checkpoint(ck)
    assert path == ck / "step_00000005"
    assert why in note and "falling back to the newest complete one, step_00000005" in note


def test_broken_meta_is_not_complete(tmp_path):
    ck = tmp_path / "ck"
    _ckpt(ck, 2, "run-A")
    d = _ckpt(ck, 3, "run-A")
    (d / "meta.json").write_text("{not json")
    assert runs.complete_checkpoints(ck) == [ck / "step_00000002"]


# --- ownership under concurrency: a lock held for the whole run (runlock.py) --------------------
_HOLDER = """
import sys, time
from lss_megatron import runlock
runlock.acquire(sys.argv[1], "--save", "holder-test")
print("ready", flush=True)
time.sleep(120)
"""


def test_a_live_holder_is_refused_then_its_stale_lock_taken_over(tmp_path):
    """Another live process holds --save: plan (read-only, up front) and claim (at the start)
    refuse in one line naming its pid, host and start time. Killed with SIGKILL it leaves its
    lock file; the next run takes it over and says whose it was."""
    import socket
    import subprocess
    import sys

    ck = tmp_path / "ck"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(ck)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        cfg = _train_cfg(tmp_path, save=str(ck))
        p = runs.plan(cfg)
        assert len(p.problems) == 1, p.problems
        line = p.problems[0]
        assert f"--save {ck} is in use by another run: pid {holder.pid} on " in line
        assert socket.gethostname() in line and "started 20" in line and "\n" not in line
        before = sorted(x.name for x in ck.iterdir())
        with pytest.raises(runs.RunFolderError, match=f"pid {holder.pid}"):
            _claim(cfg, {})
        assert sorted(x.name for x in ck.iterdir()) == before, "a refused claim changed --save"
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    finally:
        holder.kill()
        holder.wait()
    assert (ck / runlock.LOCK_NAME).exists(), "SIGKILL leaves the lock file (not the lock)"
    assert runs.plan(cfg).problems == []
    notes: list[str] = []
    _claim(cfg, {}, notes)
    assert any("took over the lock" in n and f"pid {holder.pid}" in n for n in notes), notes
    assert not (ck / runlock.LOCK_NAME).exists(), "released at the end"


def test_the_lock_is_one_per_folder_and_released(tmp_path):
    """--out and --save the same folder: one lock; a second acquire in another process fails
    while it is held (flock is per open file), and the file is gone after release."""
    ck = tmp_path / "both"
    cfg = _train_cfg(tmp_path, save=str(ck))
    cfg = replace(cfg, out=str(ck))
    runs.claim(cfg, {})
    try:
        assert len(runlock._HELD) == 1
        assert runlock.holder(ck) is None, "this process's own lock is not a conflict"
    finally:
        runlock.release_all()
    assert not (ck / runlock.LOCK_NAME).exists()


# --- resume that knows what it resumes -----------------------------------------------------------
def _finished_run(tmp_path, steps=(1, 2)) -> tuple[Path, Path]:
    out, ck = tmp_path / "out", tmp_path / "ck"
    _outputs(out, "run-A")
    for s in steps:
        _ckpt(ck, s, "run-A")
    (ck / "latest").write_text(f"step_{steps[-1]:08d}")
    (ck / runs.CHECKPOINTS_RECORD).write_text(
        json.dumps({"run_id": "run-A", "checkpoints": [f"step_{s:08d}" for s in steps]})
    )
    return out, ck


@pytest.mark.parametrize("into", ["out", "save", "both"])
def test_an_older_step_never_replaces_the_runs_later_steps(tmp_path, into):
    out, ck = _finished_run(tmp_path)
    kw = {"load": str(ck / "step_00000001")}
    if into in ("save", "both"):
        kw["save"] = str(ck)
    if into == "save":
        kw["out"] = str(tmp_path / "new-out")
    p = runs.plan(_train_cfg(tmp_path, **kw))
    assert len(p.problems) == 1, p.problems
    assert "resumes run run-A at step 1, but that run went on to step_00000002" in p.problems[0]
    assert "--overwrite" in p.problems[0]


def test_an_older_step_into_new_folders_branches_off(tmp_path):
    _, ck = _finished_run(tmp_path)
    p = runs.plan(
        _train_cfg(
            tmp_path,
            load=str(ck / "step_00000001"),
            out=str(tmp_path / "b"),
            save=str(tmp_path / "bk"),
        )
    )
    assert p.problems == [] and p.run_id is None, "a branch is a new run"
    assert "branches off it as a new run" in p.notes[0]


def test_the_newest_step_continues_the_run(tmp_path):
    out, ck = _finished_run(tmp_path)
    p = runs.plan(_train_cfg(tmp_path, load=str(ck), save=str(ck)))
    assert (p.problems, p.run_id, p.out, p.save) == ([], "run-A", "resume", "resume")


def test_overwrite_discards_exactly_the_later_steps(tmp_path):
    out, ck = _finished_run(tmp_path, steps=(1, 2, 3))
    (ck / "step_00000009").mkdir()  # someone else's folder: not in the manifest, no meta
    cfg = _train_cfg(tmp_path, load=str(ck / "step_00000002"), save=str(ck), overwrite=True)
    p = runs.plan(cfg)
    assert p.problems == [] and p.run_id == "run-A"
    assert [d.name for d in p.discard] == ["step_00000003"]
    notes: list[str] = []
    assert _claim(cfg, {}, notes) == "run-A"
    assert sorted(x.name for x in ck.glob("step_*")) == [
        "step_00000001",
        "step_00000002",
        "step_00000009",
    ]
    assert (ck / "latest").read_text() == "step_00000002"
    assert json.loads((ck / runs.CHECKPOINTS_RECORD).read_text())["checkpoints"] == [
        "step_00000001",
        "step_00000002",
    ]
    assert any("discarded (step_00000003)" in n for n in notes), notes


def test_overwrite_deletes_only_what_the_manifest_lists(tmp_path):
    """A new run --overwrite of another run's --save deletes that run's checkpoints only; a
    step_* it never wrote makes the overwrite a refusal, not a deletion."""
    _, ck = _finished_run(tmp_path)
    (ck / "step_00000007").mkdir()
    (ck / "step_00000007" / "precious.bin").write_bytes(b"not the run's")
    cfg = _train_cfg(tmp_path, out=str(tmp_path / "o2"), save=str(ck), overwrite=True)
    p = runs.plan(cfg)
    assert len(p.problems) == 1 and "step_00000007 is not one of them" in p.problems[0]
    with pytest.raises(runs.RunFolderError):
        _claim(cfg, {})
    assert (ck / "step_00000001").is_dir() and (ck / "step_00000007" / "precious.bin").exists()
    shutil.rmtree(ck / "step_00000007")
    _claim(cfg, {})
    assert sorted(x.name for x in ck.iterdir()) == [runs.CHECKPOINTS_RECORD]


def test_a_partial_last_metrics_line_is_dropped(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    warned = []
    rows = runs.metric_lines(m, lambda *a: warned.append(a))
    assert [s for s, _ in rows] == [1, 2] and len(warned) == 1


def _saved(tmp_path, **train) -> tuple[Path, dict]:
    """A checkpoint of the default configuration (train fields changed by `train`), and the
    effective configuration of a run that resumes it unchanged."""
    from lss_megatron.config import RunConfig

    cfg = RunConfig(train=replace(TrainConfig(), steps=10))
    run = cfg.to_dict()
    saved = json.loads(json.dumps(run))
    saved["train"].update(train)
    d = tmp_path / "ck" / "step_00000004"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"format_version": 2, "step": 4, "config": saved}))
    return d, run


def test_a_resume_refuses_a_change_of_meaning(tmp_path):
    from lss_megatron.resume import resume_problems

    d, run = _saved(tmp_path, seed=7, optimizer="sgd", global_batch_size=16)
    run["model"]["causal"] = False
    p = resume_problems(d, run)
    assert len(p) == 2, p
    assert "is for another model: causal: checkpoint True vs run False" in p[0]
    for key in ("seed: checkpoint 7 vs run 1234", "optimizer: checkpoint 'sgd'", "global_batch"):
        assert key in p[1], p[1]
    run["train"]["steps"] = 4
    assert "already at step 4 >= --steps 4" in resume_problems(d, run)[-1]


def test_a_resume_names_each_allowed_change(tmp_path):
    from lss_megatron.resume import changed_hyperparameters, resume_problems

    d, run = _saved(tmp_path, lr=5e-4, steps=8, weight_decay=0.1)
    assert resume_problems(d, run) == []
    lines = changed_hyperparameters(d, run)
    assert lines == [
        "resuming with --lr 0.001 (the checkpoint's run had 0.0005)",
        "resuming with --weight-decay 0.0 (the checkpoint's run had 0.1)",
        "resuming with --steps 10 (the checkpoint's run had 8)",
    ]
