"""Runs never overwrite each other (runs.py), on folders built by hand: ``--out`` and ``--save``
belong to one run; resuming continues it; ``--overwrite`` replaces on request; ``--load`` trusts
``latest`` and says when it falls back; stale temporaries are cleaned. (The same through the
trainer, byte for byte: tests/e2e/test_faults_runs.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lss_megatron import runs
from lss_megatron.config import TrainConfig

pytestmark = pytest.mark.faults


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
    new_id = runs.claim(cfg, {})
    assert new_id != "run-A"
    assert sorted(x.name for x in out.iterdir()) == ["notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text())["run_id"] == new_id


def test_a_resumed_run_never_keeps_the_old_summary(tmp_path):
    out = tmp_path / "out"
    _outputs(out, "run-A")
    _ckpt(tmp_path / "ck", 2, "run-A")
    assert runs.claim(_train_cfg(tmp_path, load=str(tmp_path / "ck")), {}) == "run-A"
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
    rid = runs.claim(_train_cfg(tmp_path, save=str(ck), overwrite=True), {"model": {"x": 1}})
    assert sorted(x.name for x in ck.iterdir()) == [runs.CHECKPOINTS_RECORD]
    assert json.loads((ck / runs.CHECKPOINTS_RECORD).read_text()) == {
        "run_id": rid,
        "model": {"x": 1},
    }


def test_a_legacy_folder_resumed_in_place_is_allowed(tmp_path):
    """Checkpoints saved before folders had owners: resuming from the folder itself is fine."""
    ck = tmp_path / "ck"
    _ckpt(ck, 3, None)
    assert runs.plan(_train_cfg(tmp_path, save=str(ck), load=str(ck))).problems == []
    assert runs.plan(_train_cfg(tmp_path, save=str(ck))).problems != []


def test_stale_temporary_folders_are_cleaned(tmp_path):
    ck = tmp_path / "ck"
    (ck / ".tmp-step_00000004-abc").mkdir(parents=True)
    (ck / ".tmp-step_00000004-abc" / "state.pt").write_bytes(b"half")
    (ck / ".old-step_00000002-def").mkdir()
    (ck / ".latest.tmp").write_text("step_")
    _ckpt(ck, 2, None)
    runs.claim(_train_cfg(tmp_path, save=str(ck), load=str(ck)), {})
    assert sorted(x.name for x in ck.iterdir()) == [runs.CHECKPOINTS_RECORD, "step_00000002"]


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
