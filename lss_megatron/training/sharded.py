"""Sharded checkpoint files through torch.distributed.checkpoint (DCP), driven step by step.

What a rank contributes is an `Entries` map: for every key (``model/<param>``,
``optim/<param>/<state>``) the canonical shape of the tensor in the one-process model and this
rank's pieces of it, each a box given by its global offsets. Any sharding is a list of boxes:
a replicated tensor is one box at offset 0 (written once: DCP's `dedup_save_plans` keeps it in
one rank's plan, the least loaded), an LSS position slice is one box per run of consecutive
global rows, a tensor-parallel shard one box offset along its partition dimension, a ZeRO
partition the boxes its flat fragment of each parameter covers (`flat_boxes`). Loading asks for
boxes the same way, so a checkpoint written under any sharding is read under any other: DCP reads, from
each stored chunk, the overlap with each requested box (`create_read_items_for_chunk_list`).

The steps of a save (`SavePlan` per rank, global plan, writes, metadata) are run here one by one
instead of through `dcp.save`, so that the exchanges between them go through `parallel.comm`
(checkpoint.py) and a failed write on any rank becomes one error on every rank. Loading needs no
exchange: every rank reads the ``.metadata`` file itself and only the chunks that overlap its
own boxes.

Nothing arbitrary is unpickled: DCP's `FileSystemReader.read_metadata` uses plain
`pickle.load`; `SafeReader` reads it through `MetadataUnpickler`, which allows only DCP's metadata
classes, ``torch.Size``, torch dtypes and layouts (by name); tensor payloads are read by DCP with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Pieces = list[tuple[tuple, torch.Tensor]]
"""(global offsets, tensor) boxes of one full tensor held by this rank."""
Entries = dict[str, tuple[tuple, Pieces]]
"""key -> (the full tensor's shape, this rank's pieces of it)."""


class ShardError(ValueError):
    """A sharded checkpoint that does not hold what is asked of it (checkpoint.py words it)."""


def flat_boxes(shape: tuple, start: int, numel: int) -> list[tuple[tuple, tuple]]:
    """(offsets, sizes) boxes covering the row-major flat range [start, start + numel) of a tensor
    of `shape`, in order; each box is itself a contiguous flat range (a ZeRO fragment)."""
    if numel <= 0:
        return []
    if len(shape) <= 1:
        return [((start,), (numel,))] if shape else [((), ())]
    inner, end, out = math.prod(shape[1:]), start + numel, []
    row, col = divmod(start, inner)
    if col:  # the head: part of one row
        n = min(inner - col, numel)
        out += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], col, n)]
        start, row = start + n, row + 1
    whole = (end - start) // inner
    if whole > 0:  # whole rows
        out.append(((row, *[0] * (len(shape) - 1)), (whole, *shape[1:])))
        start, row = start + whole * inner, row + whole
    if start < end:  # the tail: the start of one row
        out += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], 0, end - start)]
    return out


def fragment_pieces(flat: torch.Tensor, shape: tuple, start: int, base: tuple) -> Pieces:
    """Views of `flat` (elements [start, start + flat.numel()) of a tensor of `shape`, flattened)
    as boxes, offset by `base` (where that tensor lies in the full one)."""
    pieces, pos = [], 0
    for offsets, sizes in flat_boxes(tuple(shape), start, flat.numel()):
        n = math.prod(sizes)
        box = flat[pos : pos + n].view(sizes)  # [*sizes]
        pieces.append((tuple(b + o for b, o in zip(base, offsets, strict=True)), box))
        pos += n
    return pieces


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        t = t.narrow(dim, o, n)
    return t


# --- save ---------------------------------------------------------------------------------------
class _Saver(SavePlanner):
    """Writes `Entries` as DCP shards (each piece one ``SHARD`` write item)."""

    def set_up_planner(self, state_dict: Entries, storage_meta=None, is_coordinator=False):
        self.entries = state_dict
        self.lookup = {(k, tuple(o)): t for k, (_, ps) in state_dict.items() for o, t in ps}

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, (shape, pieces) in self.entries.items():
            for offsets, t in pieces:
                t = t.detach()
                chunk = dcp_md.ChunkStorageMetadata(torch.Size(offsets), t.size())
                data = TensorWriteData(
                    chunk=chunk,
                    size=torch.Size(shape),
                    properties=dcp_md.TensorProperties.create_from_tensor(t),
                )
                items.append(
                    WriteItem(
                        index=dcp_md.MetadataIndex(key, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=data,
                    )
                )
        return SavePlan(items)

    def create_global_plan(self, all_plans: list[SavePlan]):
        plans, md = create_default_global_save_plan(dedup_save_plans(all_plans))
        for key, m in md.state_dict_metadata.items():  # every element exactly once
            held = sum(math.prod(c.sizes) for c in m.chunks)
            if held != math.prod(m.size):
                raise ShardError(f"{key}: the ranks hold {held} of {math.prod(m.size)} elements")
        return plans, md

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        t = self.lookup[(write_item.index.fqn, tuple(write_item.index.offset))]
        # a copy with its own storage: torch.save of a view writes the whole storage
        return t.detach().to("cpu", copy=True).contiguous()


class _Writer(FileSystemWriter):
    """DCP's file writer, without the temporary folder's path in the metadata (it is renamed)."""

    def storage_meta(self):
        return dcp_md.StorageMeta(save_id=self.save_id)


class ShardWrite:
    """One sharded save into `folder`, in the steps checkpoint.py runs on every rank and
    between which it exchanges the plans and results (`comm.all_gather_object`)."""

    def __init__(self, folder: Path, entries: Entries, rank: int):
        self.rank = rank
        self.planner = _Saver()
        self.writer = _Writer(folder, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.planner.set_up_planner(entries, None, rank == 0)
        self.writer.set_up_storage_writer(rank == 0, rank=rank)
        self.metadata = None

    def local_plan(self) -> SavePlan:
        return self.writer.prepare_local_plan(self.planner.create_local_plan())

    def write(self, all_plans: list[SavePlan]) -> list:
        """Every rank derives the same global plan from all local plans, then writes its own."""
        plans, self.metadata = self.planner.create_global_plan(all_plans)
        plans = self.writer.prepare_global_plan(plans)
        future = self.writer.write_data(self.planner.finish_plan(plans[self.rank]), self.planner)
        future.wait()
        return future.value()

    def finish(self, all_results: list[list]) -> None:
        """Rank 0: the ``.metadata`` file (chunks and which file holds each)."""
        self.writer.finish(self.metadata, all_results)


# --- load ---------------------------------------------------------------------------------------
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # a layout by its name, from torch's own table
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: its dataclasses, ``torch.Size``, torch dtypes and layouts."""

    def find_class(self, module: str, name: str):
        obj = getattr(torch, name, None) if module == "torch" else None
        if name in _ALLOWED.get(module, ()) or isinstance(obj, (torch.dtype, torch.layout)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with the ``.metadata`` file read by `MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> dcp_md.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_md.Metadata) or not isinstance(metadata.storage_data, dict):
            raise pickle.UnpicklingError(f"{type(metadata).__name__} is not DCP metadata")
        for info in metadata.storage_data.values():  # payload files: plain names in the folder
            name = getattr(info, "relative_path", "")
            if not isinstance(info, _StorageInfo) or Path(name).name != name or name[:1] in "./":
                raise pickle.UnpicklingError(f"storage entry {name!r} is not a file of the folder")
        metadata.storage_meta = dcp_md.StorageMeta(load_id=self.load_id)
        return metadata


class _Loader(LoadPlanner):
    """Reads, for every key, the boxes in `targets` (views written in place)."""

    def __init__(self, targets: dict[str, Pieces]):
        self.targets = targets

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        stored = self.metadata.state_dict_metadata
        for key, pieces in self.targets.items():
            md = stored.get(key)
            if not isinstance(md, dcp_md.TensorStorageMetadata):
                raise ShardError(f"it holds no tensor {key!r}")
            chunks = [dcp_md.ChunkStorageMetadata(torch.Size(o), t.size()) for o, t in pieces]
            reads = create_read_items_for_chunk_list(key, md, chunks)
            got = [0] * len(chunks)
            for r in reads:
                got[r.dest_index.index] += math.prod(r.lengths)
            for (offsets, t), n in zip(pieces, got, strict=True):
                if n != t.numel():
                    raise ShardError(
                        f"{key}: it holds {n} of the {t.numel()} elements of the "
                        f"box at {tuple(offsets)} size {tuple(t.shape)} (shape "
                        f"{tuple(md.size)})"
                    )
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise ShardError(f"{read_item.dest_index.fqn}: unexpected bytes entry")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        _, t = self.targets[read_item.dest_index.fqn][read_item.dest_index.index]
        return _narrow(t.detach(), read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Nothing: the tensor was read into a view of its destination."""


def read_metadata(folder: Path) -> dcp_md.Metadata:
    """The folder's DCP metadata, read safely (`MetadataUnpickler`)."""
    return SafeReader(folder).read_metadata()


def read_shards(folder: Path, metadata: dcp_md.Metadata, targets: dict[str, Pieces]) -> None:
    """Read into every box of `targets` its data from `folder` (no communication)."""
    planner, reader = _Loader(targets), SafeReader(folder)
    planner.set_up_planner({}, metadata, False)
    reader.set_up_storage_reader(metadata, False)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    reader.read_data(planner.finish_plan(plan), planner).wait()
