"""Sharded checkpoints (format 2) without processes: the box arithmetic of ZeRO fragments, a
malicious DCP ``.metadata`` refused before any code in it runs, --keep-last's pruning rules and
an unknown format version. Multi-rank saves and reshards: tests/ranks/test_sharded_checkpoint.py
and tests/e2e/test_sharded_checkpoint.py."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 6)])
def test_flat_boxes_tile_every_flat_range_in_order(shape):
    from lss_megatron.training.sharded import flat_boxes, fragment_pieces

    total = math.prod(shape)
    full = torch.arange(total).view(shape)
    for start in range(total):
        for numel in range(1, total - start + 1):
            boxes = flat_boxes(shape, start, numel)
            got = torch.cat(
                [
                    full[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))].reshape(-1)
                    for off, size in boxes
                ]
            )
            assert torch.equal(got, torch.arange(start, start + numel)), (shape, start, numel)
            assert len(boxes) <= 2 * len(shape) - 1
            # the views of a flat fragment land at the same places, offset by a base
            flat = torch.arange(start, start + numel)
            base = (10,) + (0,) * (len(shape) - 1)
            for off, view in fragment_pieces(flat, shape, start, base):
                local = (off[0] - 10, *off[1:])
                want = full[tuple(slice(o, o + s) for o, s in zip(local, view.shape, strict=True))]
                assert torch.equal(view, want)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a file appears if any code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _v2_folder(tmp_path):
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"step": 1, "format_version": 2, "config": {}}))
    torch.save({"torch_rng": torch.get_rng_state()}, d / "state.pt")
    return d


def test_malicious_metadata_is_refused_and_runs_nothing(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from lss_megatron.training.checkpoint import CheckpointError, load_checkpoint

    d = _v2_folder(tmp_path)
    marker = tmp_path / "pwned"
    (d / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, None, None, None)  # fails before the model is touched
    assert not marker.exists(), "the payload ran"
    msg = str(e.value)
    assert "cannot read .metadata" in msg and "is not allowed in DCP metadata" in msg, msg
    assert "\n" not in msg
    # the file is live: torch's own reader (plain pickle) runs it
    try:
        FileSystemReader(d).read_metadata()
    except Exception:  # noqa: BLE001 - what it returns is not metadata; the point is the marker
        pass
    assert marker.exists(), "the crafted file must be one that plain pickle would execute"


def test_foreign_pickle_and_path_escape_are_refused(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    from lss_megatron.training.checkpoint import CheckpointError, load_checkpoint

    d = _v2_folder(tmp_path)
    (d / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match="dict is not DCP metadata"):
        load_checkpoint(d, None, None, None)
    escape = Metadata({}, storage_data={MetadataIndex("x"): _StorageInfo("../../etc/passwd", 0, 1)})
    (d / ".metadata").write_bytes(pickle.dumps(escape))
    with pytest.raises(CheckpointError, match="is not a file of the folder"):
        load_checkpoint(d, None, None, None)


def test_unknown_format_version_is_a_clear_error(tmp_path):
    from lss_megatron.training.checkpoint import CheckpointError, load_checkpoint

    d = _v2_folder(tmp_path)
    (d / "meta.json").write_text(json.dumps({"step": 1, "format_version": 9, "config": {}}))
    with pytest.raises(CheckpointError, match="format_version 9 is not one this version reads"):
        load_checkpoint(d, None, None, None)


def _step(directory, step, run_id):
    d = directory / f"step_{step:08d}"
    d.mkdir(parents=True)
    meta = {"step": step, "format_version": 2, "config": {"run_id": run_id}}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "state.pt").write_bytes(b"x")
    (d / ".metadata").write_bytes(b"x")


def test_keep_last_deletes_only_this_runs_oldest_never_latest(tmp_path):
    from lss_megatron.runs import complete_checkpoints, prune_checkpoints

    for s in (1, 2, 3, 4, 5):
        _step(tmp_path, s, "mine")
    _step(tmp_path, 6, "other")  # another run's checkpoint is never ours to delete
    (tmp_path / "latest").write_text("step_00000001")  # latest may name an old one: it stays
    gone = prune_checkpoints(tmp_path, 2, "mine")
    assert [g.name for g in gone] == ["step_00000002", "step_00000003"]
    left = [d.name for d in complete_checkpoints(tmp_path)]
    assert left == ["step_00000001", "step_00000004", "step_00000005", "step_00000006"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no trash left"
    # an incomplete v2 folder (no .metadata) is not a checkpoint, so never counted or deleted
    (tmp_path / "step_00000005" / ".metadata").unlink()
    assert "step_00000005" not in [d.name for d in complete_checkpoints(tmp_path)]
