"""Datasets and sharding: determinism, layout independence, the global label shift, enwik8 files
(raw and zip, small generated ones), split boundaries, segment-only reads, every data error, and
the synthetic task's segment-local loss floor."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lss_megatron.data import (
    DataError,
    Dataset,
    SyntheticRecall,
    build_dataset,
    check_data_config,
    full_attention_loss_floor,
    replica_sample_indices,
    segment_batch,
    segment_local_loss_floor,
    shard_segment,
    synthetic_sequences,
)
from lss_megatron.data.enwik8 import Enwik8, extraction_path
from lss_megatron.data.synthetic import VALUES, num_keys

ROOT = Path(__file__).resolve().parents[2]
SPLIT_SIZES = (9000, 500, 500)  # a small file in enwik8's layout: 10,000 bytes
SEQ = 16


def _bytes(n: int = sum(SPLIT_SIZES)) -> bytes:
    return np.random.default_rng(0).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "enwik8"
    path.write_bytes(_bytes())
    return path


def _zip(path: Path, member: str = "enwik8", data: bytes | None = None, stored=False) -> Path:
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr(member, _bytes() if data is None else data)
    return path


def _small(path, **kw) -> Enwik8:
    return Enwik8(path, seq_length=SEQ, seed=3, split_sizes=SPLIT_SIZES, **kw)


@pytest.fixture(scope="module")
def datasets(raw_file) -> dict[str, Dataset]:
    return {
        "synthetic": build_dataset("synthetic", seq_length=SEQ, vocab_size=64, seed=3),
        "enwik8": _small(raw_file, eval_batch_size=4),
    }


# ---------------------------------------------------------------- interface and layout


def test_import_is_torch_free():
    code = (
        "import sys, lss_megatron.data, lss_megatron.data.synthetic, lss_megatron.data.enwik8; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", ["synthetic", "enwik8"])
def test_read_is_deterministic_and_in_range(datasets, name):
    ds = datasets[name]
    assert isinstance(ds, Dataset) and ds.name == name
    a = ds.read("train", 5, [0, 1, 7], 0, SEQ)
    assert a.shape == (3, SEQ + 1) and a.dtype == np.int64
    assert 0 <= a.min() and a.max() < ds.vocab_size
    assert np.array_equal(a, ds.read("train", 5, [0, 1, 7], 0, SEQ))
    # a sample is a function of its own (step, index), not of its batch-mates
    assert np.array_equal(a[2:], ds.read("train", 5, [7], 0, SEQ))
    assert not np.array_equal(a, ds.read("train", 6, [0, 1, 7], 0, SEQ))
    assert not np.array_equal(a, ds.read("valid", 5, [0, 1, 7], 0, SEQ))
    assert not np.array_equal(a[0], a[1])
    # a sub-range is the same positions of the same sequences
    assert np.array_equal(ds.read("train", 5, [0, 1, 7], 3, 9), a[:, 3:10])


def test_seed_changes_synthetic_data():
    a = SyntheticRecall(seq_length=SEQ, vocab_size=64, seed=1).read("train", 1, range(4), 0, SEQ)
    b = SyntheticRecall(seq_length=SEQ, vocab_size=64, seed=2).read("train", 1, range(4), 0, SEQ)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("name", ["synthetic", "enwik8"])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_segments_concatenate_to_the_sequence(datasets, name, split):
    """For N = 1, 2, 4 the segments' tokens and labels concatenate to inputs x[0:l] and labels
    x[1:l+1]; position ids are global; segment n's last label is segment n+1's first token."""
    ds = datasets[name]
    full = ds.read(split, 2, range(6), 0, SEQ)  # [6, l + 1]
    for n in (1, 2, 4):
        parts = [segment_batch(ds, split, 2, range(6), r, n) for r in range(n)]
        tokens = np.concatenate([t.numpy() for t, _, _ in parts], axis=1)
        labels = np.concatenate([lab.numpy() for _, lab, _ in parts], axis=1)
        positions = np.concatenate([p.numpy() for _, _, p in parts], axis=1)
        assert np.array_equal(tokens, full[:, :SEQ]) and np.array_equal(labels, full[:, 1:])
        assert np.array_equal(positions, np.broadcast_to(np.arange(SEQ), (6, SEQ)))
        for r in range(n - 1):
            assert np.array_equal(parts[r][1][:, -1], parts[r + 1][0][:, 0])
        for t, lab, p in parts:
            assert t.shape == lab.shape == p.shape == (6, SEQ // n)
            assert t.dtype == lab.dtype == p.dtype == __import__("torch").long


@pytest.mark.parametrize("name", ["synthetic", "enwik8"])
def test_data_replicas_partition_the_global_batch(datasets, name):
    ds = datasets[name]
    full = ds.read("train", 4, range(8), 0, SEQ)
    for d in (1, 2, 4):
        blocks = [ds.read("train", 4, replica_sample_indices(8, r, d), 0, SEQ) for r in range(d)]
        assert np.array_equal(np.concatenate(blocks), full)


def test_shard_segment_matches_segment_batch(datasets):
    ds = datasets["synthetic"]
    seqs = synthetic_sequences(3, 2, range(4), SEQ, 64)
    assert np.array_equal(seqs, ds.read("train", 2, range(4), 0, SEQ))
    for r in range(4):
        got = segment_batch(ds, "train", 2, range(4), r, 4)
        for a, b in zip(shard_segment(seqs, r, 4), got, strict=True):
            assert a.equal(b)


def test_bad_reads_are_rejected(datasets):
    ds = datasets["synthetic"]
    for args in [("train", 1, [0], 0, SEQ + 1), ("train", 1, [0], 5, 4), ("dev", 1, [0], 0, 3)]:
        with pytest.raises(ValueError):
            ds.read(*args)
    with pytest.raises(ValueError, match="not divisible"):
        segment_batch(ds, "train", 1, [0], 0, 3)


# ---------------------------------------------------------------- synthetic task and its floor


def test_synthetic_task_structure():
    length, v = 64, 256
    k = num_keys(length, v)
    assert k == 16
    x = synthetic_sequences(9, 1, range(5), length, v)
    keys = np.broadcast_to(np.arange(length + 1) % k, x.shape)
    assert np.array_equal(x // VALUES, keys)
    assert np.array_equal(x[:, k:], x[:, :-k])  # periodic: every later token recalls its key
    assert x.max() < k * VALUES <= v


def _unseen_by_brute_force(x: np.ndarray, n: int) -> int:
    """Labels x_t (t = 1..l) with no earlier token of the same key among their segment's inputs."""
    length = x.size - 1
    s = length // n
    count = 0
    for t in range(1, length + 1):
        start = ((t - 1) // s) * s
        count += not any(x[j] // VALUES == x[t] // VALUES for j in range(start, t))
    return count


@pytest.mark.parametrize("length,v", [(16, 64), (32, 64), (64, 256), (128, 256), (12, 16)])
def test_floor_matches_the_bayes_optimal_local_predictor(length, v):
    """The floor is ln(A) per label whose key has no earlier token in its own segment, counted on
    real sequences (where everything else is exactly predictable and such labels are uniform)."""
    x = synthetic_sequences(0, 1, [0], length, v)[0]
    for n in (1, 2, 4, 8):
        if length % n:
            continue
        expected = _unseen_by_brute_force(x, n) * math.log(VALUES) / length
        assert segment_local_loss_floor(length, n, v) == pytest.approx(expected, rel=1e-12)


def test_floor_values_on_small_cases():
    ln8 = math.log(8)
    # l = 16, V = 64: K = min(16, 8, 4) = 4
    assert segment_local_loss_floor(16, 1, 64) == pytest.approx(3 * ln8 / 16)  # the records
    assert segment_local_loss_floor(16, 2, 64) == pytest.approx(2 * 3 * ln8 / 16)
    assert segment_local_loss_floor(16, 4, 64) == pytest.approx(4 * 3 * ln8 / 16)
    assert segment_local_loss_floor(16, 8, 64) == pytest.approx(ln8)  # s = 2 < K - 1: all
    assert segment_local_loss_floor(16, 16, 64) == pytest.approx(ln8)
    # l = 128, V = 256: K = 16
    assert segment_local_loss_floor(128, 2, 256) == pytest.approx(30 * ln8 / 128)
    assert segment_local_loss_floor(128, 4, 256) == pytest.approx(60 * ln8 / 128)
    assert full_attention_loss_floor(128, 256) == pytest.approx(15 * ln8 / 128)
    floors = [segment_local_loss_floor(256, n, 256) for n in (1, 2, 4, 8, 16)]
    assert floors == sorted(floors) and floors[0] < floors[1]  # more segments, less to see


# ---------------------------------------------------------------- enwik8


def test_enwik8_raw_and_zip_read_the_same(raw_file, tmp_path):
    raw = _small(raw_file)
    assert isinstance(raw._data, np.memmap) and raw.file == raw_file
    zipped = _small(_zip(tmp_path / "enwik8.zip"))
    assert zipped.file == tmp_path / "enwik8" == extraction_path(tmp_path / "enwik8.zip")
    assert isinstance(zipped._data, np.memmap)
    for split in ("train", "valid", "test"):
        assert np.array_equal(
            raw.read(split, 3, range(4), 0, SEQ), zipped.read(split, 3, range(4), 0, SEQ)
        )
    # extracted once: a second open reuses the file, and no temporary file is left behind
    mtime = zipped.file.stat().st_mtime_ns
    again = _small(tmp_path / "enwik8.zip")
    assert again.file.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))


def test_zip_extracts_into_cache_dir(tmp_path):
    z = _zip(tmp_path / "enwik8.zip")
    ds = _small(z, cache_dir=tmp_path / "cache")
    assert ds.file == tmp_path / "cache" / "enwik8" and ds.file.stat().st_size == 10_000


def test_enwik8_reads_are_the_file_bytes_inside_their_split(raw_file):
    data = np.frombuffer(raw_file.read_bytes(), dtype=np.uint8)
    ds = _small(raw_file, eval_batch_size=4)
    bounds = {"train": (0, 9000), "valid": (9000, 9500), "test": (9500, 10000)}
    assert ds.split_bounds == bounds
    starts = np.concatenate([ds.starts("train", s, range(64)) for s in range(1, 40)])
    assert starts.min() >= 0 and starts.max() + SEQ < 9000  # l + 1 bytes inside train
    assert starts.min() < 500 and starts.max() > 8400  # spread over the split
    x = ds.read("train", 7, [5], 0, SEQ)[0]
    s0 = ds.starts("train", 7, [5])[0]
    assert np.array_equal(x, data[s0 : s0 + SEQ + 1])
    # eval: contiguous windows of l + 1 bytes overlapping by one, wrapping after W windows
    w = ds.num_windows("valid")
    assert w == (500 - 1) // SEQ
    assert ds.starts("valid", 1, range(4)).tolist() == [9000 + SEQ * i for i in range(4)]
    assert ds.starts("valid", 2, range(4)).tolist() == [9000 + SEQ * i for i in range(4, 8)]
    assert ds.starts("test", 1, [0])[0] == 9500
    last = ds.starts("valid", 1, [w - 1, w])
    assert last.tolist() == [9000 + SEQ * (w - 1), 9000] and last[0] + SEQ < 9500
    v = ds.read("valid", 1, range(2), 0, SEQ)
    assert v[0, -1] == v[1, 0] == data[9000 + SEQ]


def test_enwik8_read_touches_only_the_segment(raw_file):
    ds = _small(raw_file)

    class Recorder:
        def __init__(self, data):
            self.data, self.keys = data, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.data[key]

    ds._data = rec = Recorder(ds._data)
    starts = ds.starts("train", 2, range(3))
    lo, hi = 8, 12
    out = ds.read("train", 2, range(3), lo, hi)
    assert out.shape == (3, hi - lo + 1)
    assert [(k.start, k.stop, k.step) for k in rec.keys] == [
        (int(s) + lo, int(s) + hi + 1, None) for s in starts
    ]


def test_build_dataset_enforces_the_real_enwik8_size(raw_file):
    with pytest.raises(DataError, match=rf"{raw_file}.*10,000 bytes, expected exactly 100,000,000"):
        build_dataset("enwik8", seq_length=SEQ, vocab_size=256, seed=0, path=raw_file)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "enwik8.zip"
    with pytest.raises(DataError, match=rf"{missing}: no such file"):
        _small(missing)
    assert any(
        str(missing) in m and "no such file" in m
        for m in check_data_config("enwik8", str(missing), 256)
    )


def test_wrong_size_raw_file(tmp_path):
    p = tmp_path / "enwik8"
    p.write_bytes(_bytes(9999))
    with pytest.raises(DataError, match=rf"{p}: 9,999 bytes, expected exactly 10,000"):
        _small(p)


def test_corrupt_zip(tmp_path):
    truncated = tmp_path / "enwik8.zip"
    truncated.write_bytes(_zip(tmp_path / "good.zip").read_bytes()[:2000])
    with pytest.raises(DataError, match=rf"{truncated}: corrupt or not a zip"):
        _small(truncated)
    problems = check_data_config("enwik8", str(truncated), 256)
    assert len(problems) == 1 and "corrupt" in problems[0] and str(truncated) in problems[0]
    # a readable directory but damaged data: caught up front, before the model is built (the
    # check inflates the member's first 64 KiB; this small member whole, so its CRC is checked)
    bad = bytearray(_zip(tmp_path / "stored.zip", stored=True).read_bytes())
    bad[100] ^= 0xFF  # inside the stored member's bytes
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=rf"{damaged}: corrupt or not a zip file \(Bad CRC-32"):
        _small(damaged)
    assert not (tmp_path / "damaged").exists() and not list(tmp_path.glob("*.tmp"))


def test_zip_without_the_member(tmp_path):
    z = _zip(tmp_path / "enwik8.zip", member="data.txt")
    with pytest.raises(DataError, match=rf"{z}: the zip has no member 'enwik8'.*data.txt"):
        _small(z)
    wrong = _zip(tmp_path / "short.zip", data=_bytes(100))
    with pytest.raises(DataError, match=rf"{wrong}: zip member 'enwik8' has 100 bytes"):
        _small(wrong)


def test_check_data_config_messages(raw_file, tmp_path):
    assert check_data_config("synthetic", None, 256) == []
    assert check_data_config("synthetic", None, 16) == []
    [small] = check_data_config("synthetic", None, 15)
    assert "--vocab-size 15" in small and ">= 16" in small
    [unused] = check_data_config("synthetic", "x.bin", 256)
    assert "--data-path x.bin" in unused
    [vocab] = check_data_config("enwik8", str(_zip(tmp_path / "enwik8.zip", data=b"")), 255)[:1]
    assert "--vocab-size 255" in vocab and "256" in vocab
    [no_path] = check_data_config("enwik8", None, 256)
    assert "--data-path" in no_path and "--download" in no_path
    [size] = check_data_config("enwik8", str(raw_file), 256)
    assert str(raw_file) in size and "100,000,000" in size
    [name] = check_data_config("wikitext", None, 256)
    assert "'wikitext'" in name
    with pytest.raises(DataError, match="--vocab-size 255"):
        build_dataset("enwik8", seq_length=SEQ, vocab_size=255, seed=0, path=raw_file)


def test_download_helper_cli_help():
    """The helper's command line exists (it is never run against the network here)."""
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    res = subprocess.run(
        [sys.executable, "-m", "lss_megatron.data.enwik8", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0 and "--download" in res.stdout, res.stderr
