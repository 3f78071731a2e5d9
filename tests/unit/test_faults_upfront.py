"""Up-front checks and checkpoint files, in process: folders must be creatable and writable; the
per-rank memory estimate against the cost model's independent enumeration, and the refusal that
names it; files that are not checkpoints are one clear line without PyTorch's
``weights_only=False`` advice."""

from __future__ import annotations

import errno
import itertools
import json
import os

import pytest
import torch

from lss_megatron import estimate as est
from lss_megatron import runs
from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.faults


# --- folders ----------------------------------------------------------------------------------------
def test_folder_checks(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert runs.folder_problem("--out", str(tmp_path / "new" / "deep")) is None
    assert "exists and is not a folder" in runs.folder_problem("--out", str(a_file))
    msg = runs.folder_problem("--save", str(a_file / "ck"))
    assert msg == f"--save {a_file / 'ck'}: cannot be created, {a_file} is a file, not a folder"
    assert runs.folder_problem("--out", "") == "--out must name a folder, got ''"
    # we run as root, so permission bits do not stop us: stand in for a read-only mount
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert "cannot be created in" in runs.folder_problem("--out", str(tmp_path / "x"))
    assert runs.folder_problem("--out", str(tmp_path)).endswith("is not writable")


# --- the memory estimate ----------------------------------------------------------------------------


def _configs():
    grid = itertools.product(
        ["serial", "lss", "nvidia-sp", "ulysses"],
        [1, 2, 4],
        ["learned", "rope"],
        [None, 2],
        [True, False],
        ["adamw", "sgd"],
        [1, 2],
        [64, 256],
    )
    for mode, n, pos, kv, causal, opt, b, seq in grid:
        if (mode == "serial") != (n == 1) or (mode in ("nvidia-sp", "ulysses") and (kv or 4) % n):
            continue
        model = ModelConfig(
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            num_kv_heads=kv,
            seq_length=seq,
            position_embedding=pos,
            causal=causal,
        )
        yield RunConfig(
            model=model,
            parallel=ParallelConfig(mode=mode, world_size=n, seq_parallel=n),
            train=TrainConfig(global_batch_size=b, optimizer=opt),
        )


def test_estimate_against_the_cost_model():
    """Parameters and optimizer state are exact (the cost model enumerates every tensor
    independently); activations are a per-layer formula, within 25% of the cost model's exact
    enumeration of saved tensors over modes, N, positions, GQA, masks, batch and length."""
    from analysis.costmodel import counts as cm

    ratios = []
    for cfg in _configs():
        d = {**cfg.to_dict(), "runtime": {"backend": "gloo"}}
        shape, lay = cm.shape_from_config(d["model"]), cm.layout_from_config(d)
        e = est.estimate(cfg)
        assert e.params == e.grads == 4 * cm.param_count(shape, lay), cfg
        assert e.optimizer == cm.optimizer_state_bytes(shape, lay, cfg.train.optimizer), cfg
        ratios.append(e.activations / cm.activation_bytes(shape, lay))
    assert len(ratios) > 100 and 0.75 <= min(ratios) and max(ratios) <= 1.25, (
        min(ratios),
        max(ratios),
    )


def test_a_run_that_cannot_fit_is_refused_naming_the_estimate():
    cfg = RunConfig(model=ModelConfig(hidden_size=16384, num_heads=16))
    (msg,) = est.memory_problems(cfg, 0, 1, available=2**30)
    assert msg.startswith("per-rank memory estimate 100.9") and "parameters 24.05" in msg
    assert "optimizer state 48.10" in msg and "exceeds the 1.00 GiB available" in msg
    assert "--no-memory-check" in msg
    assert est.memory_problems(RunConfig(), 0, 1, available=2**30) == []


# --- files that are not checkpoints -----------------------------------------------------------------


def _state_file(tmp_path, payload):
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"step": 1, "format_version": 1, "config": {}}))
    if isinstance(payload, bytes):
        (d / "state.pt").write_bytes(payload)
    else:
        torch.save(payload, d / "state.pt")
    return d


@pytest.mark.parametrize(
    "payload,fragment",
    [
        (
            {"weights": torch.zeros(2)},
            "state.pt is a valid torch file but not an lss_megatron "
            "checkpoint (missing or wrong ['model', 'optimizer', "
            "'torch_rng']",
        ),
        ([1, 2, 3], "state.pt is a valid torch file but not an lss_megatron checkpoint (list"),
        (b"not a checkpoint", "cannot read state.pt: it is corrupt, truncated or not a checkpoint"),
        (
            "truncated",
            "cannot read state.pt: it is corrupt, truncated or not a checkpoint "
            "(PytorchStreamReader failed reading zip archive",
        ),
        ("pickled-object", "Unsupported global: GLOBAL datetime.datetime"),
    ],
)
def test_foreign_and_corrupt_state_files(tmp_path, payload, fragment):
    import datetime

    from lss_megatron.training.checkpoint import CheckpointError, load_checkpoint

    if payload == "truncated":
        d = _state_file(tmp_path, {"model": {"w": torch.zeros(1000)}})
        data = (d / "state.pt").read_bytes()
        (d / "state.pt").write_bytes(data[: len(data) // 2])
    elif payload == "pickled-object":
        d = _state_file(tmp_path, {"model": {}, "when": datetime.datetime(2020, 1, 1)})
    else:
        d = _state_file(tmp_path, payload)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, None, None, None)  # fails before the model is touched
    msg = str(e.value)
    assert fragment in msg, msg
    assert "weights_only" not in msg and "\n" not in msg and len(msg) < 400


def test_meta_without_a_step_is_a_clear_error(tmp_path):
    from lss_megatron.training.checkpoint import CheckpointError, read_meta

    (tmp_path / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(CheckpointError, match="meta.json has no integer 'step'"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="meta.json has no integer 'step'"):
        read_meta(tmp_path)


def test_torch_save_on_a_real_full_disk_is_a_full_disk(tmp_path):
    """What torch.save really raises on a full file system (a 64 KiB tmpfs): a RuntimeError
    ("unexpected pos") whose context is OSError(ENOSPC). `runs.disk_full` finds it, and the
    checkpoint's failure line says "no space left" with the free space."""
    from lss_megatron.training.checkpoint import _write_failure, _write_synced
    from tests.support import small_filesystem

    with small_filesystem(tmp_path / "fs", 64) as fs:
        with pytest.raises(RuntimeError) as info:
            _write_synced(fs / "state.pt", lambda f: torch.save({"x": torch.zeros(100_000)}, f))
        full = runs.disk_full(info.value)
        assert full is not None and full.errno == errno.ENOSPC, repr(info.value)
        line = _write_failure(fs, 3, info.value)
        assert line.startswith(f"checkpoint step 3 not written to {fs}: no space left (0.")
        assert "\n" not in line


def test_disk_full_behind_any_wrapper():
    """The mock beside the real test: EDQUOT as a cause, ENOSPC as a context; another error is
    not a full disk."""
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/q/metrics.jsonl")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        found = runs.disk_full(e)
        assert found is not None and found.errno == errno.EDQUOT
        assert runs.disk_full_line(found, "/elsewhere").startswith(
            "could not write to /q: disk quota exceeded ("
        )
    assert runs.disk_full(RuntimeError("unexpected pos 1 vs 2")) is None
    assert runs.disk_full(OSError(errno.EACCES, "denied")) is None


# --- data files, checked before the model is built ---------------------------------------------
@pytest.fixture
def indexed(tmp_path):
    """A small Megatron indexed dataset (60 documents of 20..300 bytes; valid: 3 documents)."""
    from lss_megatron.data.make_indexed import make_indexed
    from tests.support import byte_corpus

    src = tmp_path / "corpus.raw"
    src.write_bytes(byte_corpus())
    make_indexed(src, tmp_path / "corpus", separator=b"<END>")
    return tmp_path / "corpus"


def test_an_index_that_does_not_describe_its_bin_is_refused(indexed):
    """The document table must fit the .bin: a pointer past its end or a negative length is one
    line up front (Megatron's reader would fail, or read garbage, after the model is built)."""
    import numpy as np

    from lss_megatron.data import check_data_config
    from lss_megatron.data.megatron_indexed import read_index_header

    assert check_data_config("megatron", str(indexed), 256, 32) == []
    idx = indexed.with_suffix(".idx")
    good = idx.read_bytes()
    n = len(read_index_header(idx)[1])
    pointers = np.frombuffer(good, dtype=np.int64, count=n, offset=34 + 4 * n).copy()
    pointers[5] = indexed.with_suffix(".bin").stat().st_size  # document 5 starts at the end
    idx.write_bytes(good[: 34 + 4 * n] + pointers.tobytes() + good[34 + 12 * n :])
    p = check_data_config("megatron", str(indexed), 256, 32)
    assert len(p) == 1 and "document 5 spans bytes" in p[0] and "does not describe" in p[0], p
    lengths = np.frombuffer(good, dtype=np.int32, count=n, offset=34).copy()
    lengths[0], lengths[1] = -lengths[0], lengths[1] + 2 * lengths[0]  # the same total
    idx.write_bytes(good[:34] + lengths.tobytes() + good[34 + 4 * n :])
    p = check_data_config("megatron", str(indexed), 256, 32)
    assert len(p) == 1 and "document 0 has a negative length" in p[0], p


def test_evaluation_needs_a_valid_split_that_holds_a_sample(indexed):
    from lss_megatron.data import check_data_config

    longest = 600  # the train split (54 documents) holds it
    assert check_data_config("megatron", str(indexed), 256, longest) == []
    p = check_data_config("megatron", str(indexed), 256, 2000, evaluates=True)
    assert any("the valid split" in x and "--eval-interval evaluates on it" in x for x in p), p
    assert not any("valid" in x for x in check_data_config("megatron", str(indexed), 256, 2000))


def test_a_zip_whose_data_does_not_inflate_is_refused(tmp_path):
    """A zip whose directory reads but whose member's data is damaged is found up front (it
    used to be found when extracting, after the model was built)."""
    import zipfile

    from lss_megatron.data.enwik8 import enwik8_file_problems

    data = bytes(range(256)) * 400
    z = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    assert enwik8_file_problems(z, expected_size=len(data)) == []
    raw = bytearray(z.read_bytes())
    start = 30 + len("enwik8")  # the local header, then the deflated data
    raw[start : start + 40] = b"\xff" * 40
    z.write_bytes(bytes(raw))
    p = enwik8_file_problems(z, expected_size=len(data))
    assert len(p) == 1 and "corrupt or not a zip file" in p[0], p
