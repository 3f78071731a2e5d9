"""Run folders on disk: who owns them, whether they can be written, which checkpoint to load.

Runs never overwrite each other:

* ``--out DIR`` gets ``DIR/run.json`` (the run id). A folder that already holds a run's outputs
  (run.json, config.json, metrics.jsonl, summary.json) is refused unless this run resumes that
  run (``--load`` a checkpoint carrying the same run id) or ``--overwrite`` is given, which
  deletes exactly those four files first. A run never leaves an old summary.json beside its own
  config.json: it is removed when the run starts.
* ``--save DIR`` gets ``DIR/checkpoints.json`` (run id, model and optimizer configuration), and
  every checkpoint's meta.json carries the run id in its config. Saving into a folder that holds
  another run's checkpoints is refused; ``--overwrite`` deletes them first. A run that resumes
  from a folder's checkpoint continues that run (inherits its id) and may save into it.
* ``--load DIR`` trusts ``DIR/latest`` when it names a complete checkpoint, and says so when it
  falls back to the newest complete ``step_*`` folder instead.

`plan` decides all of this read-only, on every rank before any process group exists (so a refusal
changes no byte on disk); `claim` acts on it on rank 0 once the run starts. Import-light: no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

OUTPUTS = ("run.json", "config.json", "metrics.jsonl", "summary.json")
"""What the trainer writes into ``--out``; the files that make a folder a run's."""
CHECKPOINTS_RECORD = "checkpoints.json"
STALE_PREFIXES = (".tmp-", ".old-")
"""Temporary folders of a save that was killed (checkpoint.save_checkpoint's naming)."""
_STEP = re.compile(r"step_\d+")


class RunFolderError(ValueError):
    """``--out`` / ``--save`` / ``--load`` cannot be used as asked. The message names the folder."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def launch_time() -> float:
    """When this job was launched, the same on every rank of a node: the launcher's start time
    (torchrun's or DeepSpeed's agent is every local rank's parent), else this process's."""
    import psutil

    launched = any(os.environ.get(v) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    try:
        proc = psutil.Process(os.getppid() if launched else os.getpid())
        return proc.create_time()
    except (psutil.Error, OSError):
        return time.time()


def default_out(mode: str, root: str = "runs") -> str:
    """The default ``--out``: a fresh ``runs/<launch date-time>-<mode>`` per run (so the README's
    command works twice); a SLURM job adds its job and step ids, since its ranks have no common
    parent. Multi-node launches outside SLURM should name ``--out`` (launch/ scripts do)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(launch_time()))
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        stamp += f"-job{job}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return str(Path(root) / f"{stamp}-{mode}")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --- can the folder be written? -------------------------------------------------------------------
def folder_problem(flag: str, value: str | None) -> str | None:
    """Why `value` cannot be (created and) written as a folder, or None. Read-only: the folder is
    not created here; the nearest existing ancestor must be a writable folder."""
    if value is None:
        return None
    if not str(value).strip():
        return f"{flag} must name a folder, got {value!r}"
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        return f"{flag} {value}: exists and is not a folder"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{flag} {value}: cannot be created, {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = (
            "is not writable" if probe == path else f"cannot be created in {probe} (not writable)"
        )
        return f"{flag} {value}: {what}"
    return None


# --- checkpoint folders ----------------------------------------------------------------------------
def _step_of(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (state.pt present, meta.json readable, and from
    format version 2 on DCP's ``.metadata`` index of the chunks), else None."""
    if not (folder / "state.pt").is_file():
        return None
    meta = read_json(folder / "meta.json")
    step = meta.get("step") if meta else None
    if meta and meta.get("format_version", 1) != 1 and not (folder / ".metadata").is_file():
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete ``step_*`` checkpoints in `directory`, oldest first."""
    found = [d for d in Path(directory).glob("step_*") if _STEP.fullmatch(d.name)]
    return sorted(d for d in found if _step_of(d) is not None)


def latest_checkpoint(directory: str | Path) -> tuple[Path | None, str]:
    """(the checkpoint ``--load directory`` resumes from, a note when it is not the one ``latest``
    names). `directory` may be a checkpoint itself (``DIR/step_K``)."""
    d = Path(directory)
    if not d.is_dir():
        return None, ""
    if _step_of(d) is not None:
        return d, ""
    named = ""
    if (d / "latest").is_file():
        named = (d / "latest").read_text(errors="replace").strip()
        if _STEP.fullmatch(named) and _step_of(d / named) is not None:
            return d / named, ""
    done = complete_checkpoints(d)
    if not done:
        return None, ""
    why = (
        f"'latest' names {named!r}, which is not a complete checkpoint"
        if named
        else "it has no 'latest' file"
    )
    return done[-1], f"--load {d}: {why}; falling back to the newest complete one, {done[-1].name}"


def prune_checkpoints(directory: Path, keep: int, run_id: str | None) -> list[Path]:
    """``--keep-last keep``: delete the oldest complete checkpoints of run `run_id` (all of them
    when None) beyond the newest `keep`, never the one ``latest`` names. Each is first renamed
    to a ``.old-`` folder (so a crash never leaves a half-deleted ``step_*`` that looks
    complete), then removed. Returns the deleted folders."""
    directory = Path(directory)
    named = (directory / "latest").read_text(errors="replace").strip()
    ours = [
        d
        for d in complete_checkpoints(directory)
        if run_id is None or checkpoint_run_id(d) == run_id
    ]
    gone = []
    for d in ours[: max(0, len(ours) - keep)]:
        if d.name == named:
            continue
        trash = directory / f"{STALE_PREFIXES[1]}{d.name}-{uuid.uuid4().hex[:8]}"
        os.rename(d, trash)
        shutil.rmtree(trash)
        gone.append(d)
    return gone


def checkpoint_run_id(path: Path) -> str | None:
    """The run id a checkpoint was saved by (its meta.json, else its folder's record)."""
    meta = read_json(path / "meta.json") or {}
    rid = (meta.get("config") or {}).get("run_id") if isinstance(meta.get("config"), dict) else None
    if rid:
        return str(rid)
    rec = read_json(path.parent / CHECKPOINTS_RECORD) or {}
    return str(rec["run_id"]) if rec.get("run_id") else None


def _holds_checkpoints(d: Path) -> bool:
    return d.is_dir() and (
        any(_STEP.fullmatch(x.name) for x in d.glob("step_*")) or (d / "latest").exists()
    )


def stale_temporaries(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(
        x for x in d.iterdir() if x.name.startswith(STALE_PREFIXES) or x.name == ".latest.tmp"
    )


# --- the plan: read-only, every rank -------------------------------------------------------------
@dataclass
class Plan:
    problems: list[str] = field(default_factory=list)
    run_id: str | None = None
    """Inherited from the checkpoint this run resumes; None: a new run (rank 0 makes an id)."""
    out: str = "new"
    """``new``, ``resume`` (the folder is this run's) or ``overwrite``."""
    save: str = "new"
    load_path: Path | None = None
    load_note: str = ""


def _owner(d: Path, record: str) -> str:
    rec = read_json(d / record) or {}
    return str(rec.get("run_id") or "an earlier run")


def plan(train, *, check_paths: bool = True) -> Plan:
    """Decide how this run uses ``--out``, ``--save`` and ``--load`` (`train`: a TrainConfig)."""
    p = Plan()
    for flag, value in (("--out", train.out), ("--save", train.save)):
        why = folder_problem(flag, value) if check_paths else None
        if why:
            p.problems.append(why)
    if train.load is not None:
        if not str(train.load).strip():
            p.problems.append(f"--load must name a folder, got {train.load!r}")
        else:
            p.load_path, p.load_note = latest_checkpoint(train.load)
            if p.load_path is None:
                p.problems.append(f"--load {train.load}: no complete checkpoint there")
            else:
                p.run_id = checkpoint_run_id(p.load_path)
    if p.problems:
        return p
    overwrite = bool(getattr(train, "overwrite", False))
    out = Path(train.out).expanduser()
    if any((out / f).exists() for f in OUTPUTS):
        theirs = (read_json(out / "run.json") or {}).get("run_id")
        if p.run_id and theirs == p.run_id:
            p.out = "resume"
        elif overwrite:
            p.out = "overwrite"
        else:
            held = ", ".join(f for f in OUTPUTS if (out / f).exists())
            p.problems.append(
                f"--out {train.out} already holds the outputs of run {_owner(out, 'run.json')} "
                f"({held}): pass --overwrite to replace them, --load that run's checkpoint to "
                "resume it, or choose another --out"
            )
    if train.save is not None:
        save = Path(train.save).expanduser()
        if _holds_checkpoints(save):
            theirs = (read_json(save / CHECKPOINTS_RECORD) or {}).get("run_id")
            resumes_here = p.load_path is not None and save.resolve() in (
                p.load_path.resolve(),
                p.load_path.resolve().parent,
            )
            if (p.run_id and theirs == p.run_id) or (resumes_here and not theirs):
                p.save = "resume"
            elif overwrite:
                p.save = "overwrite"
            else:
                p.problems.append(
                    f"--save {train.save} holds the checkpoints of run "
                    f"{_owner(save, CHECKPOINTS_RECORD)}: saving there would mix two runs; pass "
                    "--overwrite to delete them, --load them to continue that run, or choose "
                    "another --save"
                )
    return p


# --- claiming the folders: rank 0, once the run starts ---------------------------------------------
def claim(train, record: dict) -> str:
    """Take ``--out`` (and ``--save``) for this run, as `plan` decided; returns the run id.

    `record`: what ``checkpoints.json`` keeps besides the id (model and optimizer configuration).
    Re-plans first, so a folder taken by another run since the up-front check is still refused.
    """
    p = plan(train)
    if p.problems:
        raise RunFolderError("; ".join(p.problems))
    run_id = p.run_id or new_run_id()
    out = Path(train.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS if p.out == "overwrite" else ("summary.json",):
        (out / name).unlink(missing_ok=True)
    write_json(
        out / "run.json",
        {
            "run_id": run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resumed": p.out == "resume",
        },
    )
    if train.save is not None:
        save = Path(train.save).expanduser()
        save.mkdir(parents=True, exist_ok=True)
        if p.save == "overwrite":
            for d in save.glob("step_*"):
                shutil.rmtree(d, ignore_errors=True)
            (save / "latest").unlink(missing_ok=True)
        for d in stale_temporaries(save):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        write_json(save / CHECKPOINTS_RECORD, {"run_id": run_id, **record})
    return run_id
