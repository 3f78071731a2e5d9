"""Megatron-LM's checkpoint format (the "legacy" torch format), both ways (issue #25 item 10).

On disk, as Megatron-LM's ``training/checkpointing.py`` writes it without pipeline parallelism::

    DIR/latest_checkpointed_iteration.txt             the iteration, as text
    DIR/iter_0000010/mp_rank_00/model_optim_rng.pt    tensor-parallel rank 0's file
    DIR/iter_0000010/mp_rank_01/model_optim_rng.pt    ... rank 1's (one per TP rank)

each a ``torch.save`` of ``{"args": argparse.Namespace, "checkpoint_version": 3.0,
"iteration": K, "model": GPTModel.state_dict() of that TP rank}`` (no optimizer or RNG state:
Megatron-LM loads such a file with ``--no-load-optim --no-load-rng``, or ``--finetune``).

* `write(directory, iteration, full, partition_dims, tp, args)`: the one-process model's full
  tensors `full` (our canonical checkpoint's ``model/<name>`` keys: any N, T, D and mode, LSS
  position slices already stitched) cut into `tp` shards along each tensor-parallel parameter's
  ``partition_dim``; atomic (a temporary folder renamed into place).
* `read(directory, partition_dims)`: (iteration, full tensors), the TP shards concatenated back.
  Files are read with ``torch.load(weights_only=True)``, allowing only ``argparse.Namespace`` and
  numpy's array reconstruction (Megatron-LM's RNG state) besides tensors: nothing arbitrary runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


class MegatronCheckpointError(ValueError):
    """A Megatron-LM checkpoint that cannot be read or written as asked (names the path)."""


def is_megatron_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / TRACKER).is_file()


def iteration_dir(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:07d}"


def write(
    directory: str | Path,
    iteration: int,
    full: dict[str, torch.Tensor],
    partition_dims: dict[str, int | None],
    tp: int,
    args: argparse.Namespace,
) -> Path:
    """Write the Megatron-LM checkpoint of `full` at `iteration` for `tp` tensor-parallel ranks
    into `directory` (which must not exist or be empty); returns the iteration folder."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise MegatronCheckpointError(f"--out {directory}: not empty; choose a new folder")
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rank in range(tp):
            model = {}
            for name, t in full.items():
                dim = partition_dims.get(name)
                if dim is not None and tp > 1:
                    if t.shape[dim] % tp:
                        raise MegatronCheckpointError(
                            f"{name} {tuple(t.shape)}: dim {dim} is not divisible by TP = {tp}"
                        )
                    t = t.chunk(tp, dim=dim)[rank]  # this TP rank's shard, Megatron's split
                model[name] = t.contiguous().clone()
            path = iteration_dir(tmp, iteration) / f"mp_rank_{rank:02d}" / FILE
            path.parent.mkdir(parents=True)
            state = {
                "args": args,
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "model": model,
            }
            torch.save(state, path)
        (tmp / TRACKER).write_text(f"{iteration}\n")
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return iteration_dir(directory, iteration)


def _safe_load(path: Path) -> dict:
    import numpy as np

    allowed = [argparse.Namespace, np.ndarray, np.dtype]
    reconstruct = getattr(getattr(np, "_core", np.core).multiarray, "_reconstruct", None)
    allowed += [reconstruct] if reconstruct is not None else []
    allowed += [type(np.dtype(t)) for t in ("uint32", "float32", "int64")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: one message naming the file
        raise MegatronCheckpointError(
            f"{path}: not a readable Megatron-LM checkpoint file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read(
    directory: str | Path, partition_dims: dict[str, int | None]
) -> tuple[int, dict[str, torch.Tensor], argparse.Namespace | None]:
    """(iteration, the full tensors of every ``model`` key, the saved args) of the Megatron-LM
    checkpoint in `directory`; tensor-parallel shards (``mp_rank_XX``) are concatenated along
    `partition_dims` (replicated tensors are taken from rank 0)."""
    directory = Path(directory)
    try:
        iteration = int((directory / TRACKER).read_text().strip())
    except (OSError, ValueError) as e:
        raise MegatronCheckpointError(f"{directory / TRACKER}: no iteration number ({e})") from None
    folder = iteration_dir(directory, iteration)
    ranks = sorted(folder.glob("mp_rank_*"))
    if not ranks or any("_" in r.name[len("mp_rank_") :] for r in ranks):
        raise MegatronCheckpointError(
            f"{folder}: no mp_rank_XX folders (pipeline-parallel checkpoints are not supported)"
        )
    states = [_safe_load(r / FILE) for r in ranks]
    models = [s.get("model") if isinstance(s, dict) else None for s in states]
    if any(not isinstance(m, dict) for m in models):
        raise MegatronCheckpointError(f"{folder}: a file holds no 'model' state dict")
    full = {}
    for name, first in models[0].items():
        if not torch.is_tensor(first) or name.endswith("_extra_state"):
            continue
        dim = partition_dims.get(name)
        if dim is not None and len(models) > 1:
            full[name] = torch.cat([m[name] for m in models], dim=dim)
        else:
            full[name] = first
    return iteration, full, states[0].get("args")
