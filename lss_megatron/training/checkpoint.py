"""Sharded, grid-independent, atomic checkpoints (written on one rank grid and mode, read on any).

Every rank writes its own part with torch.distributed.checkpoint (DCP, `training.sharded`), in
CANONICAL form: each tensor is stored as boxes of the full tensor of the one-process model, at
their global offsets (`parallel.params.local_pieces`): a replicated parameter once (DCP keeps one
copy, on the least loaded rank), an LSS position slice as its runs of global rows, a
tensor-parallel shard at its offset along ``partition_dim``, a ZeRO partition as the boxes its
flat fragment covers (`training.zero.ZeroSharding`: fp32 master weights and optimizer state per
parameter). On load each rank reads only the boxes it holds, from whichever chunks overlap them,
so a checkpoint saved with LSS at N = 4 loads at N = 2, in serial, nvidia-sp or Ulysses, with or
without ZeRO: anything with the same model. Why DCP and not Megatron's dist_checkpointing: our
own shardings (position slices holding arbitrary global rows, `optim.MasterWeights`, DeepSpeed's
flat ZeRO partitions) are not Megatron ShardedTensors; DCP takes any list of boxes.

Layout on disk (``--save DIR``), format version 2::

    DIR/step_00000010/__R_0.distcp  the chunks rank R wrote (one file per rank; torch.save'd tensors)
    DIR/step_00000010/.metadata     DCP's index: every key's shape, chunks and the file holding each
    DIR/step_00000010/state.pt      rank 0's torch RNG state (torch.save, tensors only)
    DIR/step_00000010/meta.json     step, effective config, model config, format version
    DIR/latest                      name of the newest complete checkpoint

Keys: ``model/<parameter>`` (fp32 master weights under bf16) and ``optim/<parameter>/<state>``.
Version 1 checkpoints (one ``state.pt`` holding every full tensor, gathered to rank 0) still load.

Writes are atomic: rank 0 makes a temporary folder and tells every rank its name; every rank
writes its chunks there (fsynced); once every rank has reported success, rank 0 writes
``.metadata``, state.pt and meta.json, fsyncs, renames the folder into place, then replaces
``latest``. A crash during a save leaves the previous checkpoint, and ``latest`` pointing at
it, intact; a failed write on any rank (a full disk) is one `CheckpointWriteError` on every rank
naming the folder and its free space. ``--keep-last K`` then deletes this run's oldest complete
checkpoints beyond K (never the one ``latest`` names; runs.prune_checkpoints). Loading trusts
``latest`` when it names a complete checkpoint, else falls back to the newest complete
``step_*`` folder and says so (runs.py, which also records which run owns the folder). The data
position is the step: batches are a pure function of (seed, step, sample index).

Loading never unpickles arbitrary objects: tensors with ``torch.load(weights_only=True)``, DCP's
``.metadata`` through a restricted unpickler (`sharded.SafeReader`).

Every rank must be able to read and write DIR (a shared file system on clusters).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import full_shape, local_pieces, to_local
from ..runs import disk_full, free_space, latest_checkpoint, manifest_update, prune_checkpoints
from . import sharded

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "seq_length",
    "padded_vocab_size",
    "position_embedding",
    "causal",
)
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, corrupt or another model)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, unwritable); the same on every rank."""


# --- what a rank holds (`parallel.params`) ------------------------------------------------------
class PlainSharding:
    """The model's (or `optim.MasterWeights`') parameters and a torch optimizer's state, each as
    this rank's boxes of the full tensor (`local_pieces`). `ZeroSharding` is the ZeRO counterpart."""

    def __init__(self, model, optimizer, grid: Grid):
        self.model, self.optimizer, self.grid = model, optimizer, grid
        self._state: list = []

    def entries(self) -> sharded.Entries:
        """key -> (full shape, this rank's pieces) of every tensor to save (views, no copies)."""
        out = {}
        for name, p in self.model.named_parameters():
            shape = full_shape(p, self.grid)
            out[f"model/{name}"] = (shape, local_pieces(p.detach(), p, self.grid))
            for k, v in sorted(self.optimizer.state.get(p, {}).items()):
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                    out[f"optim/{name}/{k}"] = (shape, local_pieces(v.detach(), p, self.grid))
                else:  # a scalar (Adam's step): the same on every rank
                    v = v.detach() if torch.is_tensor(v) else torch.tensor(v)
                    out[f"optim/{name}/{k}"] = (tuple(v.shape), [((0,) * v.dim(), v)])
        return out

    def targets(self, stored: dict) -> dict:
        """Boxes to read into: the parameters themselves, and new optimizer state tensors (put
        in place by `commit`). Raises ValueError when the checkpoint holds another model."""
        params = dict(self.model.named_parameters())
        check_parameters(stored, params)
        out, self._state = {}, []
        for name, p in params.items():
            shape = check_shape(stored, name, full_shape(p, self.grid))
            out[f"model/{name}"] = local_pieces(p.detach(), p, self.grid)
            state = {}
            for key, m in optimizer_keys(stored, name):
                if tuple(m.size) == shape and shape:  # parameter-shaped
                    state[key] = torch.empty_like(p, dtype=p.dtype).detach()
                    out[f"optim/{name}/{key}"] = local_pieces(state[key], p, self.grid)
                else:
                    state[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
                    out[f"optim/{name}/{key}"] = [((0,) * len(m.size), state[key])]
            if state:
                self._state.append((p, state))
        return out

    def commit(self) -> None:
        for p, state in self._state:
            self.optimizer.state[p] = state


def check_parameters(stored: dict, params) -> None:
    saved = {k[len("model/") :] for k in stored if k.startswith("model/")}
    missing, extra = sorted(set(params) - saved), sorted(saved - set(params))
    if missing or extra:
        raise ValueError(f"parameters missing {missing}, unexpected {extra}")


def check_shape(stored: dict, name: str, shape: tuple) -> tuple:
    saved = tuple(stored[f"model/{name}"].size)
    if saved != tuple(shape):
        raise ValueError(f"{name}: shape {saved} from checkpoint does not fit {tuple(shape)}")
    return saved


def optimizer_keys(stored: dict, name: str) -> list:
    """(state key, DCP metadata) of parameter `name`'s optimizer state in the checkpoint."""
    prefix = f"optim/{name}/"
    return sorted((k[len(prefix) :], m) for k, m in stored.items() if k.startswith(prefix))


# --- save --------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path,
    step: int,
    model,
    optimizer,
    grid: Grid,
    config: dict,
    *,
    keep_last: int = 0,
    sharding=None,
    extra: dict | None = None,
) -> Path | None:
    """Collective: every rank writes its part. Returns the path (rank 0; None elsewhere).
    `sharding`: what the ranks hold (default `PlainSharding(model, optimizer, grid)`); `extra`:
    JSON-able state the same on every rank, kept in the metadata (fp16's loss scaler)."""
    directory, name = Path(directory), f"step_{step:08d}"
    sharding = sharding or PlainSharding(model, optimizer, grid)
    agree = _Agreement(directory, step, grid)
    tmp = agree(lambda: _make_temporary(directory, name), only_rank0=True)[0]
    agree.tmp = tmp
    write = sharded.ShardWrite(tmp, sharding.entries(), grid.rank)
    plans = agree(write.local_plan)
    results = agree(lambda: write.write(plans))
    meta = {"format_version": FORMAT_VERSION, "step": step, "config": config, **(extra or {})}
    state = {"torch_rng": torch.get_rng_state()}
    final = agree(
        lambda: _publish(directory, name, tmp, write, results, state, meta), only_rank0=True
    )[0]
    if grid.rank != 0:
        return None
    if keep_last:
        _prune(directory, keep_last, config.get("run_id"))
    return final


class _Agreement:
    """Runs one step of a save on every rank (or rank 0) and exchanges the outcomes: the values
    on every rank, or the first rank's failure as one `CheckpointWriteError` on every rank (rank
    0 first removes the temporary folder)."""

    def __init__(self, directory: Path, step: int, grid: Grid):
        self.directory, self.step, self.grid, self.tmp = directory, step, grid, None

    def __call__(self, fn, only_rank0: bool = False) -> list:
        value, error = None, None
        if not only_rank0 or self.grid.rank == 0:
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001 - torch.save wraps a full disk in RuntimeError
                error = _write_failure(self.directory, self.step, e)
        outcomes = comm.all_gather_object((value, error), None)  # every rank's, in rank order
        errors = [e for _, e in outcomes if e is not None]
        if errors:
            if self.grid.rank == 0 and self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointWriteError(errors[0])
        return [v for v, _ in outcomes]


def _make_temporary(directory: Path, name: str) -> Path:
    """The save's temporary folder, listed in the folder's manifest (runs.py) so that the next
    run of this folder knows it as this run's own if the save is killed."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory))
    manifest_update(directory, "temporaries", add=[tmp.name])
    return tmp


def _publish(directory: Path, name: str, tmp: Path, write, results, state, meta) -> Path:
    """Rank 0, once every rank's chunks are on disk: the metadata, state.pt and meta.json, then
    the folder renamed into place and ``latest`` pointed at it."""
    final = directory / name
    write.finish(results)
    _write_synced(tmp / "state.pt", lambda f: torch.save(state, f))
    _write_synced(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _fsync_dir(tmp)
    try:
        if final.exists():  # re-saving a step: move the old one aside first
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=directory))
            manifest_update(directory, "temporaries", add=[trash.name])
            os.rename(final, trash / name)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
            manifest_update(directory, "temporaries", remove=[trash.name])
        else:
            os.rename(tmp, final)
        _fsync_dir(directory)
        manifest_update(directory, "checkpoints", add=[name])
        manifest_update(directory, "temporaries", remove=[tmp.name])
        _write_synced(directory / ".latest.tmp", lambda f: f.write(name.encode()))
        os.replace(directory / ".latest.tmp", directory / "latest")
        _fsync_dir(directory)
    finally:
        (directory / ".latest.tmp").unlink(missing_ok=True)
    return final


def _prune(directory: Path, keep: int, run_id) -> None:
    """``--keep-last``: a failed deletion is a warning, the new checkpoint is already safe."""
    try:
        for gone in prune_checkpoints(directory, keep, run_id):
            log.info("--keep-last %d: deleted %s", keep, gone)
    except OSError as e:
        log.warning(
            "--keep-last %d: could not delete old checkpoints in %s: %s", keep, directory, e
        )


def _write_failure(directory: Path, step: int, e: Exception) -> str:
    """One line: what was not written, where, why, the free space, what is still there. A full
    disk is recognised behind any wrapper (`runs.disk_full`: torch.save's RuntimeError)."""
    free = free_space(directory)
    full = disk_full(e)
    if full is not None:
        why = "disk quota exceeded" if full.errno == errno.EDQUOT else "no space left"
    elif isinstance(e, OSError):
        why = e.strerror or str(e)
    else:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
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
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs run {model_config.get(k)!r}"
        for k in MODEL_KEYS
        if saved.get(k) != model_config.get(k)
    ]
    if meta.get("format_version") not in READABLE_VERSIONS:
        diffs.append(
            f"format_version: {meta.get('format_version')} (this version reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if diffs:
        raise CheckpointError(f"checkpoint {path} is for another model: " + "; ".join(diffs))


def load_checkpoint(path: Path, model, optimizer, grid: Grid, *, sharding=None) -> int:
    """Load `path` into this rank's model and optimizer (reading its part); returns the step.
    `sharding`: what the ranks hold (default `PlainSharding(model, optimizer, grid)`). No
    communication: every rank reads the metadata and the chunks it needs itself."""
    meta = read_meta(path)
    version = meta.get("format_version")
    if version == 1:
        return _load_version_1(path, model, optimizer, grid)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format_version {version!r} is not one this "
            f"version reads ({READABLE_VERSIONS})"
        )
    state = _read_state_file(path, {"torch_rng": torch.Tensor})
    try:
        stored = sharded.read_metadata(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(
            f"checkpoint {path}: cannot read .metadata: it is corrupt, "
            f"truncated or not DCP metadata ({_load_failure(e)})"
        ) from None
    sharding = sharding or PlainSharding(model, optimizer, grid)
    try:
        with torch.no_grad():
            sharded.read_shards(path, stored, sharding.targets(stored.state_dict_metadata))
    except (ValueError, sharded.ShardError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - unreadable chunk files
        raise CheckpointError(
            f"checkpoint {path}: cannot read its chunks: they are corrupt, "
            f"truncated or missing ({_load_failure(e)})"
        ) from None
    sharding.commit()
    torch.set_rng_state(state["torch_rng"])
    return int(meta["step"])


def _read_state_file(path: Path, want: dict) -> dict:
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(
            f"checkpoint {path}: cannot read state.pt: it is corrupt, truncated "
            f"or not a checkpoint ({_load_failure(e)})"
        ) from None
    _check_structure(state, path, want)
    return state


def _load_version_1(path: Path, model, optimizer, grid: Grid) -> int:
    """A version-1 checkpoint: every full tensor in one state.pt; each rank cuts its part."""
    want = {"model": dict, "optimizer": dict, "torch_rng": torch.Tensor}
    state = _read_state_file(path, want)
    params = dict(model.named_parameters())
    try:
        check_parameters({f"model/{k}": None for k in state["model"]}, params)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(to_local(state["model"][name], p, grid))
        for name, p in params.items():
            saved = state["optimizer"].get(name, {})
            if saved:
                optimizer.state[p] = {
                    k: (
                        to_local(v, p, grid)
                        if torch.is_tensor(v) and v.dim() > 0
                        else (v.clone() if torch.is_tensor(v) else v)
                    )
                    for k, v in saved.items()
                }
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    torch.set_rng_state(state["torch_rng"])
    return int(read_meta(path)["step"])


def _load_failure(e: Exception) -> str:
    """torch.load's reason in a few words, without its advice to retry with weights_only=False
    (unsafe, and never the remedy for a damaged checkpoint)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|\. Please|$)", text, re.S)
    reason = m.group(1) if m else re.split(r"\.\s", text, maxsplit=1)[0]
    return " ".join(reason.split())[:200] or type(e).__name__


def _check_structure(state, path: Path, want: dict) -> None:
    """A loadable torch file that is not one of ours is a clear error, not a KeyError."""
    if not isinstance(state, dict):
        got = type(state).__name__
    else:
        bad = [k for k, kind in want.items() if not isinstance(state.get(k), kind)]
        got = f"missing or wrong {bad}" if bad else ""
    if got:
        raise CheckpointError(
            f"checkpoint {path}: state.pt is a valid torch file but not an "
            f"lss_megatron checkpoint ({got}; expected {sorted(want)})"
        )
