"""`--data megatron`: a Megatron indexed dataset built on the spot from bytes (make_indexed) and
read token-exactly through megatron.core's IndexedDataset, against the documented sampling rule
recomputed from the raw documents. Training on it: tests/e2e/test_megatron_train.py."""

from __future__ import annotations

import numpy as np
import pytest

from lss_megatron.data import build_dataset, check_data_config, segment_batch
from lss_megatron.data.make_indexed import documents, make_indexed
from lss_megatron.data.megatron_indexed import read_index_header, split_bounds
from tests.support import byte_corpus

SEED, L, G = 5, 32, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("indexed")
    data = byte_corpus()
    src = folder / "corpus.raw"
    src.write_bytes(data)
    prefix = folder / "corpus"
    n_docs, n_tokens = make_indexed(src, prefix, separator=b"<END>")
    return {
        "data": data,
        "prefix": str(prefix),
        "n_docs": n_docs,
        "n_tokens": n_tokens,
        "docs": list(documents(data, b"<END>")),
    }


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
    ds = build_dataset(
        "megatron",
        seq_length=L,
        vocab_size=256,
        seed=SEED,
        path=corpus["prefix"],
        eval_batch_size=G,
    )
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

    ds = build_dataset(
        "megatron",
        seq_length=L,
        vocab_size=256,
        seed=SEED,
        path=corpus["prefix"],
        eval_batch_size=G,
    )
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


@pytest.mark.parametrize(
    "text", ["969,30,1", "99,1", "90,5,5", "1,1,1", "7", "98,2,0", "0.8,0.1,0.1"]
)
def test_split_is_megatron_cores_own_cut(text):
    """`--split`: the fractions are Megatron-Core's `parse_and_normalize_split`, and the document
    ranges its builder's ``int(round(bookend x n))`` of `convert_split_vector_to_split_matrix`'s
    bookends (a split of weight 0 is empty here, None there); exact, integers."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from lss_megatron.data.megatron_indexed import parse_split

    want = parse_and_normalize_split(text)
    assert list(parse_split(text)) == want
    for n in (1, 7, 60, 1001, 12345):
        ours = split_bounds(n, parse_split(text))
        for name, bookend in zip(
            ("train", "valid", "test"), convert_split_vector_to_split_matrix(want), strict=True
        ):
            if bookend is None:
                assert ours[name][0] == ours[name][1], (text, n, name)
            else:
                lo, hi = (int(round(b * float(n))) for b in bookend)
                assert ours[name] == (lo, hi), (text, n, name)


def test_split_flag_is_checked_in_one_line(corpus):
    """`--split` with megatron data cuts there (a split too small for one sample is named);
    bad weights and other data are one line each, before any process group."""
    from lss_megatron.config import ConfigError
    from lss_megatron.train import config_from_args, parse_args

    base = ["--data", "megatron", "--data-path", corpus["prefix"], "--seq-length", str(L)]
    base += ["--num-layers", "1", "--hidden-size", "32", "--num-heads", "2", "--vocab-size", "256"]
    cfg = config_from_args(parse_args([*base, "--split", "969,30,1"]), 1).validate()
    assert cfg.train.fractions == (0.969, 0.03, 0.001)
    for bad, words in (
        (["--split", "9a,1"], "--split '9a,1': expected up to three weights"),
        (["--split", "0,1"], "the train weight must be > 0"),
        (["--split", "1,1", "--data", "synthetic"], "applies to --data megatron only"),
        (["--split", "100,0,0", "--eval-interval", "1"], None),
    ):
        if words is None:  # a valid split whose valid part cannot hold a sample is named
            with pytest.raises(ConfigError, match="the valid split"):
                config_from_args(parse_args([*base, *bad]), 1).validate()
            continue
        with pytest.raises(ConfigError) as e:
            config_from_args(parse_args([*base, *bad]), 1).validate()
        assert words in str(e.value), str(e.value)
