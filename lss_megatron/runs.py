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

import errno
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


def metric_lines(path: Path, warn=None) -> list[tuple[int, str]]:
    """(step, line) of every whole record of a metrics.jsonl; a line cut short by a kill
    mid-write (not JSON, or no integer step) is dropped, and `warn(fmt, ...)` told, not an error."""
    kept = []
    for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            if warn is not None:
                warn("%s line %d is not a whole record (a kill mid-write?): dropped", path, i)
            continue
        kept.append((step, line))
    return kept


# --- full disks --------------------------------------------------------------------------------------
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space error behind `exc` (ENOSPC or EDQUOT), or None. Follows the chain of
    causes and contexts: torch.save raises a RuntimeError ("unexpected pos ...") whose context is
    the OSError of the file write that failed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def free_space(path: str | Path) -> str:
    """``1.5 MiB free`` of the file system holding `path` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free"
    except OSError:
        return "free space unknown"


def disk_full_line(exc: OSError, folder: str | Path) -> str:
    """One line for a write that failed on a full disk: the folder, its free space."""
    where = Path(exc.filename).parent if getattr(exc, "filename", None) else Path(folder)
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
    return f"could not write to {where}: {what} ({free_space(where)})"


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
        _remove(directory, d)
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


# --- the manifest: what a run wrote into its --save folder -----------------------------------------
def _meta_run_id(d: Path) -> str | None:
    meta = read_json(d / "meta.json") or {}
    cfg = meta.get("config")
    rid = cfg.get("run_id") if isinstance(cfg, dict) else None
    return str(rid) if rid else None


def manifest_update(directory: Path, key: str, add=(), remove=()) -> None:
    """Add names to / remove names from the list `key` (``checkpoints``: complete checkpoints the
    folder's run wrote; ``temporaries``: folders of its saves in progress) of the folder's
    ``checkpoints.json`` (rank 0, under the run's lock). Atomic."""
    directory = Path(directory)
    if not (directory / CHECKPOINTS_RECORD).exists():  # a folder no run has claimed: no manifest
        return
    rec = read_json(directory / CHECKPOINTS_RECORD) or {}
    names = [x for x in rec.get(key, []) if isinstance(x, str) and x not in set(remove)]
    names += [x for x in add if x not in names]
    rec[key] = names
    write_json(directory / CHECKPOINTS_RECORD, rec)


def owned_checkpoints(directory: Path, owner: str | None) -> list[Path]:
    """The ``step_*`` folders of `directory` that its run wrote: listed in its manifest, or (a
    folder from before manifests) carrying the owner's run id in their meta.json."""
    directory = Path(directory)
    rec = read_json(directory / CHECKPOINTS_RECORD) or {}
    listed = {x for x in rec.get("checkpoints", []) if isinstance(x, str) and _STEP.fullmatch(x)}
    return sorted(
        d
        for d in directory.glob("step_*")
        if _STEP.fullmatch(d.name)
        and (d.name in listed or (owner is not None and _meta_run_id(d) == owner))
    )


def _remove(directory: Path, d: Path) -> None:
    """Delete checkpoint folder `d`: renamed to ``.old-*`` first (never a half-deleted step_*)."""
    trash = directory / f"{STALE_PREFIXES[1]}{d.name}-{uuid.uuid4().hex[:8]}"
    manifest_update(directory, "temporaries", add=[trash.name])
    os.rename(d, trash)
    shutil.rmtree(trash)
    manifest_update(directory, "temporaries", remove=[trash.name])
    manifest_update(directory, "checkpoints", remove=[d.name])


# --- the plan: read-only, every rank -------------------------------------------------------------
@dataclass
class Plan:
    problems: list[str] = field(default_factory=list)
    run_id: str | None = None
    """Inherited from the checkpoint this run continues; None: a new run (rank 0 makes an id)."""
    out: str = "new"
    """``new``, ``resume`` (the folder is this run's) or ``overwrite``."""
    save: str = "new"
    load_path: Path | None = None
    load_note: str = ""
    loaded_step: int | None = None
    discard: list[Path] = field(default_factory=list)
    """With --overwrite: the resumed run's checkpoints after the step loaded (deleted by claim)."""
    notes: list[str] = field(default_factory=list)
    """What the run says when it starts (a branch, discarded steps)."""


def _owner(d: Path, record: str) -> str:
    rec = read_json(d / record) or {}
    return str(rec.get("run_id") or "an earlier run")


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _lock_problems(train) -> list[str]:
    from .runlock import describe, holder

    p, seen = [], set()
    for flag, value in (("--out", train.out), ("--save", train.save)):
        if value is None or not str(value).strip():
            continue
        key = Path(value).expanduser().resolve()
        if key in seen:
            continue
        seen.add(key)
        who = holder(value)
        if who is not None:
            p.append(
                f"{flag} {value} is in use by another run: {describe(who)}; wait for it to "
                f"end or choose another {flag}"
            )
    return p


def _later_steps(p: Plan, save: Path | None) -> list[Path]:
    """Complete checkpoints of the run `p` resumes with a step after the one it loads, in the
    folder it loads from and in --save."""
    folders = [p.load_path.parent]
    if save is not None and save.is_dir() and not _same(save, p.load_path.parent):
        folders.append(save)
    return sorted(
        (
            d
            for f in folders
            for d in complete_checkpoints(f)
            if checkpoint_run_id(d) == p.run_id and (_step_of(d) or 0) > (p.loaded_step or 0)
        ),
        key=lambda d: (_step_of(d), str(d)),
    )


def plan(train, *, check_paths: bool = True) -> Plan:
    """Decide how this run uses ``--out``, ``--save`` and ``--load`` (`train`: a TrainConfig)."""
    p = Plan()
    for flag, value in (("--out", train.out), ("--save", train.save)):
        why = folder_problem(flag, value) if check_paths else None
        if why:
            p.problems.append(why)
    if check_paths and not p.problems:
        p.problems += _lock_problems(train)
    if train.load is not None:
        if not str(train.load).strip():
            p.problems.append(f"--load must name a folder, got {train.load!r}")
        else:
            p.load_path, p.load_note = latest_checkpoint(train.load)
            megatron = (Path(train.load) / "latest_checkpointed_iteration.txt").is_file()
            if p.load_path is None and not megatron:  # a Megatron-LM checkpoint loads as such
                p.problems.append(f"--load {train.load}: no complete checkpoint there")
            elif p.load_path is not None:
                p.run_id = checkpoint_run_id(p.load_path)
                p.loaded_step = _step_of(p.load_path)
    if p.problems:
        return p
    overwrite = bool(getattr(train, "overwrite", False))
    out = Path(train.out).expanduser()
    save = Path(train.save).expanduser() if train.save is not None else None
    out_id = (read_json(out / "run.json") or {}).get("run_id")
    save_id = (read_json(save / CHECKPOINTS_RECORD) or {}).get("run_id") if save else None
    resumes_here = (
        p.load_path is not None
        and save is not None
        and any(_same(save, x) for x in (p.load_path, p.load_path.parent))
    )
    legacy_in_place = resumes_here and not save_id and save is not None and _holds_checkpoints(save)

    if p.load_path is not None:  # does this run continue the run it loads, or branch off it?
        later = _later_steps(p, save)
        own = (p.run_id is not None and p.run_id in (out_id, save_id)) or legacy_in_place
        if later and own and not overwrite:
            p.problems.append(
                f"--load {train.load} resumes run {p.run_id or 'of ' + str(p.load_path.parent)} "
                f"at step {p.loaded_step}, but that run went on to {later[-1].name} (in "
                f"{later[-1].parent}): continuing it in its own folders would replace its later "
                f"steps; --load {later[-1]} to continue it, write to a new --out and --save to "
                f"branch off, or pass --overwrite to discard its steps after {p.loaded_step}"
            )
            return p
        if later and own:  # --overwrite: the later steps in --save go
            p.discard = [d for d in later if save is not None and _same(d.parent, save)]
            names = ", ".join(d.name for d in p.discard) or "none in --save"
            p.notes.append(
                f"--overwrite: run {p.run_id} continues from step {p.loaded_step}; its later "
                f"checkpoints are discarded ({names})"
            )
            if len(p.discard) < len(later):  # later steps elsewhere: this is another run now
                p.run_id = None
        elif later:
            p.notes.append(
                f"--load {p.load_path}: step {p.loaded_step} is not the newest of run "
                f"{p.run_id} ({later[-1]}): this run branches off it as a new run"
            )
            p.run_id = None

    if any((out / f).exists() for f in OUTPUTS):
        if p.run_id and out_id == p.run_id:
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
    if save is not None and _holds_checkpoints(save):
        if (p.run_id and save_id == p.run_id) or legacy_in_place:
            p.save = "resume"
        elif overwrite:
            p.save = "overwrite"
            owner = save_id or None
            mine = {d.name for d in owned_checkpoints(save, owner)}
            foreign = sorted(
                d.name
                for d in save.glob("step_*")
                if _STEP.fullmatch(d.name) and d.name not in mine
            )
            if foreign:
                p.problems.append(
                    f"--save {train.save}: --overwrite deletes only the checkpoints run "
                    f"{_owner(save, CHECKPOINTS_RECORD)} recorded, and {', '.join(foreign[:3])}"
                    f"{' ...' if len(foreign) > 3 else ''} is not one of them: move it away or "
                    "choose another --save"
                )
        else:
            p.problems.append(
                f"--save {train.save} holds the checkpoints of run "
                f"{_owner(save, CHECKPOINTS_RECORD)}: saving there would mix two runs; pass "
                "--overwrite to delete them, --load them to continue that run, or choose "
                "another --save"
            )
    return p


# --- claiming the folders: rank 0, once the run starts ---------------------------------------------
def claim(train, record: dict, notes: list[str] | None = None) -> str:
    """Take ``--out`` (and ``--save``) for this run, as `plan` decided; returns the run id.

    Each folder is locked first (runlock.py) and held until the process ends or
    ``runlock.release_all()``, then the plan is made again, so a folder another run took since
    the up-front check is refused and two runs started at once cannot both take it.
    `record`: what ``checkpoints.json`` keeps besides the id (model and optimizer configuration).
    `notes` (if given) receives what the run should say (a stale lock taken over, discarded
    steps, a branch).
    """
    from .runlock import FolderInUse, acquire, describe, release

    notes = notes if notes is not None else []
    taken = []
    try:
        for flag, value in (("--out", train.out), ("--save", train.save)):
            if value is not None:
                lock = acquire(value, flag, "lss_megatron.train")
                taken.append(value)
                if lock.stale:
                    notes.append(
                        f"{flag} {value}: took over the lock of a run that ended without "
                        f"releasing it ({describe(lock.stale)})"
                    )
                    lock.stale = None
    except FolderInUse as e:
        for value in taken:
            release(value)
        raise RunFolderError(str(e)) from None
    p = plan(train)
    if p.problems:
        for value in taken:
            release(value)
        raise RunFolderError("; ".join(p.problems))
    notes += p.notes
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
        _claim_save(Path(train.save).expanduser(), p, run_id, record)
    return run_id


def _claim_save(save: Path, p: Plan, run_id: str, record: dict) -> None:
    save.mkdir(parents=True, exist_ok=True)
    old = read_json(save / CHECKPOINTS_RECORD) or {}
    named = (
        (save / "latest").read_text(errors="replace").strip() if (save / "latest").is_file() else ""
    )
    gone = list(p.discard)
    if p.save == "overwrite":
        gone += owned_checkpoints(save, old.get("run_id") or None)
    for d in sorted(set(gone)):
        if d.exists():
            _remove(save, d)
    if named and (named in {d.name for d in gone} or not (save / named).exists()):
        kept = complete_checkpoints(save)
        if kept and p.save != "overwrite":
            write_json_text(save / "latest", kept[-1].name)
        else:
            (save / "latest").unlink(missing_ok=True)
    # temporaries of this folder's killed saves (listed in its manifest), and our own .latest.tmp
    listed = {x for x in old.get("temporaries", []) if isinstance(x, str)}
    for d in stale_temporaries(save):
        if d.name in listed or d.name == ".latest.tmp":
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    left = {d.name for d in stale_temporaries(save)}
    mine: list[str] = []
    if p.save == "resume":  # what the run wrote here so far (the manifest after the deletions)
        cur = read_json(save / CHECKPOINTS_RECORD) or {}
        listed_steps = {x for x in cur.get("checkpoints", []) if isinstance(x, str)}
        mine = sorted(
            {d.name for d in owned_checkpoints(save, run_id)}
            | {x for x in listed_steps if (save / x).is_dir()}
        )
    write_json(
        save / CHECKPOINTS_RECORD,
        {"run_id": run_id, **record, "checkpoints": mine, "temporaries": sorted(listed & left)},
    )


def write_json_text(path: Path, text: str) -> None:
    """Write `text` atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
