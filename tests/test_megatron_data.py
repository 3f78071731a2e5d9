"""`--data megatron`: a Megatron indexed dataset built on the spot from bytes, read token-exactly,
and trained on: serial and LSS (N = 2) agree within 1e-5 per step (fp32 on CPU: the modes differ
only in attention kernel and reduction order, ~1e-7; see test_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dist_utils import read_metrics, torchrun_train

from lss_megatron.data import build_dataset, check_data_config, segment_batch
from lss_megatron.data.make_indexed import documents, make_indexed
from lss_megatron.data.megatron_indexed import read_index_header, split_bounds

ROOT = Path(__file__).resolve().parents[1]
SEED, L, G = 5, 32, 4
TOL = 1e-5


def _corpus(n_docs: int = 60, seed: int = 0) -> bytes:
    """Documents of 20..300 random bytes, each ending in a separator."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 250, rng.integers(20, 300), dtype=np.uint8).tobytes() + b"<END>"
            for _ in range(n_docs)]  # fmt: skip
    return b"".join(docs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("indexed")
    data = _corpus()
    src = folder / "corpus.raw"
    src.write_bytes(data)
    prefix = folder / "corpus"
    n_docs, n_tokens = make_indexed(src, prefix, separator=b"<END>")
    return {"data": data, "prefix": str(prefix), "n_docs": n_docs, "n_tokens": n_tokens,
            "docs": list(documents(data, b"<END>"))}  # fmt: skip


def reference_sample(corpus, split: str, step: int, index: int, seed=SEED, length=L, g=G):
    """The documented rule (megatron_indexed.py), from the raw documents, independently."""
    docs = corpus["docs"]
    lo, hi = split_bounds(len(docs))[split]
    code = {"train": 0, "valid": 1, "test": 2}[split]
    order = list(range(lo, hi))
    n = (sum(len(docs[i]) for i in order) - 1) // length
    gnum = (step - 1) * g + index
    if split == "train":
        epoch, j = divmod(gnum, n)
        order = [lo + i for i in np.random.default_rng([seed, code, epoch]).permutation(hi - lo)]
        k = int(np.random.default_rng([seed, code, epoch, 1]).permutation(n)[j])
    else:
        k = gnum % n
    stream = np.frombuffer(b"".join(docs[i] for i in order), dtype=np.uint8)
    return stream[k * length : k * length + length + 1].astype(np.int64)


def test_converter_is_lossless_and_the_header_parse_is_megatrons(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(corpus["prefix"])
    assert len(ds) == corpus["n_docs"] == 60 and corpus["n_tokens"] == len(corpus["data"])
    assert b"".join(ds[i].tobytes() for i in range(len(ds))) == corpus["data"]
    assert all(ds[i].tobytes().endswith(b"<END>") for i in range(len(ds)))
    dtype, lengths = read_index_header(corpus["prefix"] + ".idx")
    assert dtype == np.uint8 and np.array_equal(lengths, ds.sequence_lengths)
    fixed = list(documents(b"abcdefg", None, 3))
    assert fixed == [b"abc", b"def", b"g"]


def test_reads_are_token_exact(corpus):
    ds = build_dataset("megatron", seq_length=L, vocab_size=256, seed=SEED, path=corpus["prefix"],
                       eval_batch_size=G)  # fmt: skip
    s = ds.samples_per_epoch("train")
    last_step = (2 * s) // G + 2  # runs into the third epoch
    for step in [1, 2, 3, s // G, s // G + 1, last_step]:
        got = ds.read("train", step, range(G), 0, L)  # [G, l + 1]
        for i in range(G):
            assert np.array_equal(got[i], reference_sample(corpus, "train", step, i)), (step, i)
    for split in ("valid", "test"):
        for step in (1, 2, 7):
            got = ds.read(split, step, range(G), 0, L)
            for i in range(G):
                assert np.array_equal(got[i], reference_sample(corpus, split, step, i))
    # a window is the same tokens as the slice of the whole sample
    whole = ds.read("train", 4, [1, 3], 0, L)
    assert np.array_equal(ds.read("train", 4, [1, 3], 9, 20), whole[:, 9:21])
    # Megatron's epochs: the first S consumed samples are each sample of epoch 0 once
    located = [ds.locate("train", 1 + j // G, j % G) for j in range(s + 1)]
    assert sorted(k for e, k in located[:s] if e == 0) == list(range(s))
    assert located[s][0] == 1


@pytest.mark.parametrize("n,layout", [(2, "contiguous"), (4, "contiguous"), (2, "zigzag")])
def test_segments_reassemble_the_sample(corpus, n, layout):
    """Each rank's segment (inputs and globally shifted labels) is the sample's tokens at its
    global positions."""
    from lss_megatron.data import segment_chunks

    ds = build_dataset("megatron", seq_length=L, vocab_size=256, seed=SEED, path=corpus["prefix"],
                       eval_batch_size=G)  # fmt: skip
    whole = ds.read("train", 3, range(G), 0, L)  # [G, l + 1]
    for rank in range(n):
        tokens, labels, pos = segment_batch(ds, "train", 3, range(G), rank, n, layout)
        cols = np.concatenate([np.arange(lo, hi) for lo, hi in segment_chunks(L, rank, n, layout)])
        assert np.array_equal(tokens.numpy(), whole[:, cols])
        assert np.array_equal(labels.numpy(), whole[:, cols + 1])
        assert np.array_equal(pos[0].numpy(), cols)


def test_problems_name_the_value(corpus, tmp_path):
    prefix = corpus["prefix"]
    assert check_data_config("megatron", prefix, 256, L) == []
    assert check_data_config("megatron", prefix + ".bin", 256, L) == []  # suffix tolerated
    assert "needs --data-path PREFIX" in check_data_config("megatron", None, 256)[0]
    missing = check_data_config("megatron", str(tmp_path / "nope"), 256)
    assert f"no such file {tmp_path / 'nope'}.bin" in missing[0]
    vocab = check_data_config("megatron", prefix, 64, L)
    assert "outside --vocab-size 64" in vocab[0] and "corpus.bin" in vocab[0]
    too_long = check_data_config("megatron", prefix, 256, 100_000)
    assert "cannot hold one sample of --seq-length 100000" in too_long[0]
    bad = tmp_path / "bad"
    bad.with_suffix(".bin").write_bytes(b"x" * 10)
    bad.with_suffix(".idx").write_bytes(b"not an index at all, no, not at all")
    assert "not a Megatron .idx file" in check_data_config("megatron", str(bad), 256)[0]
    assert split_bounds(60) == {"train": (0, 54), "valid": (54, 57), "test": (57, 60)}


def test_cli_converter_and_bad_data_path_exit(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"hello world " * 100)
    res = subprocess.run([sys.executable, "-m", "lss_megatron.data.make_indexed", "--input",
                          str(src), "--output-prefix", str(tmp_path / "out" / "p"),
                          "--document-bytes", "100"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "12 documents, 1,200 tokens" in res.stdout
    assert (tmp_path / "out" / "p.bin").read_bytes() == src.read_bytes()
    assert [x.name for x in (tmp_path / "out").iterdir()] != [] and not list(
        (tmp_path / "out").glob("*.tmp")
    )
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    res = subprocess.run([sys.executable, "-m", "lss_megatron.train", "--data", "megatron",
                          "--data-path", str(tmp_path / "missing")], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"--data-path {tmp_path / 'missing'}: no such file" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serial_and_lss_train_on_it_alike(corpus, tmp_path):
    common = ["--data", "megatron", "--data-path", corpus["prefix"], "--vocab-size", "256",
              "--num-layers", "2", "--hidden-size", "32", "--num-heads", "4", "--seq-length",
              str(L), "--global-batch-size", str(G), "--steps", "6", "--optimizer", "sgd",
              "--lr", "0.5", "--seed", str(SEED), "--dist-timeout", "60", "--progress", "off",
              "--eval-interval", "3", "--eval-steps", "1"]  # fmt: skip
    runs = {}
    for name, nproc, extra in (("serial", 1, ["--mode", "serial"]),
                               ("lss", 2, ["--mode", "lss", "--seq-parallel", "2"])):  # fmt: skip
        out = tmp_path / name
        res = torchrun_train(nproc, [*common, *extra, "--out", str(out)])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = read_metrics(out)
    serial, lss = runs["serial"], runs["lss"]
    assert len(serial) == len(lss) == 6
    for a, b in zip(serial, lss, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL, (a["step"], a["loss"], b["loss"])
        if "valid_loss" in a:
            assert abs(a["valid_loss"] - b["valid_loss"]) < TOL
    assert serial[-1]["loss"] < serial[0]["loss"]  # it learns something (random bytes: ln 250)
