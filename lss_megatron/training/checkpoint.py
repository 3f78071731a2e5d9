"""Layout-independent, atomic checkpoints.

A checkpoint holds the model and optimizer state in CANONICAL form: every parameter as the full
tensor of the one-process model (`parallel.params.to_full`): LSS position slices are stitched into
one table (all-gather over the sequence group, rows placed by the global positions each rank
holds, so any layout works) and nvidia-sp tensor-parallel shards are concatenated along their
partition dimension. On load each rank cuts its own part again, so a checkpoint saved with LSS at N = 4
loads at N = 2, N = 1, in serial or nvidia-sp mode: anything with the same model.

Layout on disk (``--save DIR``)::

    DIR/step_00000010/state.pt   model, optimizer state, RNG state (torch.save, tensors only)
    DIR/step_00000010/meta.json  step, effective config, model config, format version
    DIR/latest                   name of the newest complete checkpoint

Writes are atomic: rank 0 writes into a temporary folder, fsyncs, renames it into place, then
replaces ``latest``. A crash during a save leaves the previous checkpoint, and ``latest``
pointing at it, intact; a failed write (a full disk) is one `CheckpointWriteError` on every rank
naming the folder and its free space. Loading trusts ``latest`` when it names a complete
checkpoint, else falls back to the newest complete ``step_*`` folder and says so (runs.py, which
also records which run owns the folder). The data position is the step: batches are a pure
function of (seed, step, sample index).

Every rank must be able to read DIR when loading (a shared file system on clusters).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import to_full, to_local
from ..runs import latest_checkpoint

FORMAT_VERSION = 1
MODEL_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
              "seq_length", "padded_vocab_size", "position_embedding")  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, corrupt or another model)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, unwritable); the same on every rank."""


# --- canonical <-> local tensors (`parallel.params`) -------------------------------------------
def _to_full(t: torch.Tensor, p, grid: Grid) -> torch.Tensor:
    """This rank's piece of parameter-shaped tensor `t` -> the full tensor, on the CPU (collective)."""
    return to_full(t, p, grid).cpu().clone()


def _to_local(full: torch.Tensor, p, grid: Grid) -> torch.Tensor:
    """Cut this rank's piece of a full parameter-shaped tensor."""
    try:
        return to_local(full, p, grid)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


# --- save --------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path, step: int, model, optimizer, grid: Grid, config: dict
) -> Path | None:
    """Collective: every rank takes part in the gathers; rank 0 writes. Returns the path (rank 0)."""
    model_state, optim_state = {}, {}
    for name, p in model.named_parameters():
        model_state[name] = _to_full(p, p, grid)
        st = optimizer.state.get(p, {})
        optim_state[name] = {
            k: (_to_full(v, p, grid) if torch.is_tensor(v) and v.shape == p.shape else
                (v.detach().cpu().clone() if torch.is_tensor(v) else v))
            for k, v in sorted(st.items())
        }  # fmt: skip
    error, final = None, None
    if grid.rank == 0:
        state = {"model": model_state, "optimizer": optim_state, "torch_rng": torch.get_rng_state()}
        meta = {"format_version": FORMAT_VERSION, "step": step, "config": config}
        try:
            final = _write_atomically(Path(directory), f"step_{step:08d}", state, meta)
        except OSError as e:
            error = _write_failure(Path(directory), step, e)
    error = comm.all_gather_object(error, None)[0]  # rank 0's outcome, on every rank
    if error is not None:
        raise CheckpointWriteError(error)
    return final


def _write_atomically(directory: Path, name: str, state: dict, meta: dict) -> Path:
    """Write ``directory/name`` through a temporary folder, then point ``latest`` at it."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory))
    try:
        _write_synced(tmp / "state.pt", lambda f: torch.save(state, f))
        _write_synced(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside first
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=directory))
            os.rename(final, trash / name)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(directory)
        _write_synced(directory / ".latest.tmp", lambda f: f.write(name.encode()))
        os.replace(directory / ".latest.tmp", directory / "latest")
        _fsync_dir(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        (directory / ".latest.tmp").unlink(missing_ok=True)
    return final


def _write_failure(directory: Path, step: int, e: OSError) -> str:
    """One line: what was not written, where, why, the free space, what is still there."""
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    why = "no space left" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    kept, _ = latest_checkpoint(directory) if directory.is_dir() else (None, "")
    still = f"the previous checkpoint {kept.name} is intact" if kept else "no earlier checkpoint"
    return f"checkpoint step {step} not written to {directory}: {why} ({free}); {still}"


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- load --------------------------------------------------------------------------------------
def find_latest(directory: str | Path) -> Path | None:
    """The checkpoint ``--load directory`` resumes from: the one ``latest`` names when complete,
    else the newest complete one (`runs.latest_checkpoint`, which also says why), or None."""
    return latest_checkpoint(directory)[0]


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable meta.json: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: meta.json has no integer 'step'")
    return meta


def check_compatible(meta: dict, model_config: dict, path: Path) -> None:
    """Raise `CheckpointError` naming every model field that differs."""
    saved = meta.get("config", {}).get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {model_config.get(k)!r}"
             for k in MODEL_KEYS if saved.get(k) != model_config.get(k)]  # fmt: skip
    if meta.get("format_version") != FORMAT_VERSION:
        diffs.append(f"format_version: {meta.get('format_version')} vs {FORMAT_VERSION}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} is for another model: " + "; ".join(diffs))


def load_checkpoint(path: Path, model, optimizer, grid: Grid) -> int:
    """Load `path` into this rank's model and optimizer (cutting its part); returns the step."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path}: cannot read state.pt: it is corrupt, truncated "
                              f"or not a checkpoint ({_load_failure(e)})") from None  # fmt: skip
    _check_structure(state, path)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state["model"]))
    extra = sorted(set(state["model"]) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path}: parameters missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_to_local(state["model"][name], p, grid))
    for name, p in params.items():
        saved = state["optimizer"].get(name, {})
        if saved:
            optimizer.state[p] = {
                k: (_to_local(v, p, grid) if torch.is_tensor(v) and v.dim() > 0 else
                    (v.clone() if torch.is_tensor(v) else v))
                for k, v in saved.items()
            }  # fmt: skip
    torch.set_rng_state(state["torch_rng"])
    return int(read_meta(path)["step"])


def _load_failure(e: Exception) -> str:
    """torch.load's reason in a few words, without its advice to retry with weights_only=False
    (unsafe, and never the remedy for a damaged checkpoint)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|\. Please|$)", text, re.S)
    reason = m.group(1) if m else re.split(r"\.\s", text, maxsplit=1)[0]
    return " ".join(reason.split())[:200] or type(e).__name__


def _check_structure(state, path: Path) -> None:
    """A loadable torch file that is not one of ours is a clear error, not a KeyError."""
    want = {"model": dict, "optimizer": dict, "torch_rng": torch.Tensor}
    if not isinstance(state, dict):
        got = type(state).__name__
    else:
        bad = [k for k, kind in want.items() if not isinstance(state.get(k), kind)]
        got = f"missing or wrong {bad}" if bad else ""
    if got:
        raise CheckpointError(f"checkpoint {path}: state.pt is a valid torch file but not an "
                              f"lss_megatron checkpoint ({got}; expected {sorted(want)})")  # fmt: skip
