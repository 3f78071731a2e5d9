"""Megatron indexed data (``PREFIX.bin`` + ``PREFIX.idx``) as a `Dataset`: ``--data megatron``.

The files are what Megatron-LM's ``tools/preprocess_data.py`` (or `make_indexed` here) writes;
the tokens are read through ``megatron.core.datasets.indexed_dataset.IndexedDataset`` (memory
mapped). Each item of the index (a "sequence" in Megatron's words; one per document for GPT
data) is one document here.

Splits: the documents in file order are cut 90 / 5 / 5 (`SPLIT_FRACTIONS`, like enwik8's bytes),
or by Megatron-LM's ``--split`` weights (``969,30,1``: `parse_split`, Megatron-Core's
``parse_and_normalize_split``), into train, valid and test: document ``i`` of ``n`` is in the
first split whose cumulative fraction bound ``round(f * n)`` exceeds ``i``, Megatron-Core's own
bounds (``BlendedMegatronDatasetBuilder``: ``round(bookend * n)`` of the cumulative normalised
weights).

Samples, as Megatron's GPTDataset builds them (documents concatenated, one token shared between
consecutive samples): a split's documents, in the order of epoch ``e``, form one token stream of
``T`` tokens; it holds ``S = (T - 1) // l`` samples, sample ``k`` being stream tokens
``k l .. k l + l`` (``l + 1`` tokens: the inputs and the shifted labels).

* ``train``: samples are consumed in Megatron's order: sample ``index`` of optimizer step
  ``step`` is global sample ``g = (step - 1) G + index`` (``G`` = `global_batch_size`), in epoch
  ``e = g // S``, at position ``j = g mod S`` of the epoch. The epoch's document order is
  ``default_rng([seed, 0, e]).permutation(n_train)`` and its sample order
  ``default_rng([seed, 0, e, 1]).permutation(S)``: ``k = shuffle[j]``.
* ``valid`` / ``test``: documents in file order, samples in order, no shuffling: sample
  ``index`` of eval step ``step`` (1-based) is ``k = ((step - 1) G + index) mod S``.

So a sample is a pure function of (seed, split, step, index): the same global batch in every
mode and layout. A read of positions ``lo..hi`` touches only those tokens (the documents they
span, from their offsets on), so each rank reads only its own segments.

`indexed_problems` checks a prefix without torch (header, sizes, token dtype, that the train split
holds a sample, the vocabulary), parsing only the ``.idx`` header that ``megatron.core.datasets``
writes (version 1: magic, version, dtype code, counts, then int32 lengths).
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .base import SPLIT_CODES, SPLITS, DataError, check_read_args

SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
"""Fractions of the documents (in file order) in train, valid and test."""
INDEX_HEADER = b"MMIDIDX\x00\x00"
"""The magic bytes of a Megatron ``.idx`` file (version 1)."""
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
"""Megatron's dtype codes of integer token data (6, 7 are float64 / float32: not tokens)."""
SCAN_LIMIT_BYTES = 256 * 2**20
"""`indexed_problems` checks every token against the vocabulary in ``.bin`` files up to this size;
larger files are checked as they are read."""
HINT = (
    "build one with `python -m lss_megatron.data.make_indexed --input FILE --output-prefix PREFIX`"
)


def split_prefix(path: str | os.PathLike) -> str:
    """``PREFIX`` from ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    p = str(path)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


def read_index_header(idx_path: str | os.PathLike) -> tuple[type, np.ndarray]:
    """(token dtype, int32 document lengths) of a ``.idx`` file; raises `DataError`."""
    idx = Path(idx_path)
    with idx.open("rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise DataError(f"{idx}: not a Megatron .idx file (bad header)")
    version, code, n_seq, _n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{idx}: .idx version {version}, only version 1 is known")
    if code not in TOKEN_DTYPES:
        raise DataError(f"{idx}: token dtype code {code} is not an integer type")
    if idx.stat().st_size < 34 + 12 * n_seq:
        raise DataError(f"{idx}: truncated ({idx.stat().st_size:,} bytes for {n_seq:,} documents)")
    lengths = np.fromfile(idx, dtype=np.int32, count=n_seq, offset=34)  # [documents]
    return TOKEN_DTYPES[code], lengths


def parse_split(text: str) -> tuple[float, float, float]:
    """Megatron-LM's ``--split`` (``"969,30,1"``, ``"99,1"``) as normalised train, valid, test
    fractions, read as Megatron-Core's ``parse_and_normalize_split`` reads it (the numbers in the
    text, missing ones 0, each over their sum); raises ValueError naming what is wrong."""
    parts = [p.strip() for p in str(text).replace("/", ",").split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"[0-9]*\.?[0-9]+", p) for p in parts):
        raise ValueError("expected up to three weights >= 0 for train,valid,test, e.g. 969,30,1")
    weights = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    total = sum(weights)
    if not total > 0 or weights[0] <= 0:
        raise ValueError("the train weight must be > 0")
    w = np.asarray(weights, dtype=np.float64) / np.sum(np.asarray(weights, dtype=np.float64))
    return (float(w[0]), float(w[1]), float(w[2]))


def split_bounds(
    n_docs: int, fractions: tuple[float, ...] | None = None
) -> dict[str, tuple[int, int]]:
    """Document ranges ``[lo, hi)`` of train, valid and test (module docstring); `fractions`:
    `parse_split`'s, default `SPLIT_FRACTIONS`."""
    fractions = SPLIT_FRACTIONS if fractions is None else fractions
    cumulative, total = [], 0.0
    for f in fractions:  # Megatron-Core's bookends: running Python float sums
        total += f
        cumulative.append(total)
    ends = [round(f * n_docs) for f in cumulative]
    ends[-1] = n_docs
    starts = [0, *ends[:-1]]
    return {s: (lo, hi) for s, lo, hi in zip(SPLITS, starts, ends, strict=True)}


def _vocab_problem(bin_path: Path, dtype: type, vocab_size: int) -> str | None:
    info = np.iinfo(dtype)
    if info.min >= 0 and info.max < vocab_size:
        return None  # every value of the dtype is a token
    if bin_path.stat().st_size > SCAN_LIMIT_BYTES or bin_path.stat().st_size == 0:
        return None
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= vocab_size:
        return (
            f"holds token ids {lo}..{hi}, outside --vocab-size {vocab_size} "
            f"(ids 0..{vocab_size - 1})"
        )
    return None


def _document_table_problem(idx_path: Path, lengths: np.ndarray, itemsize: int, bin_size: int):
    """Why the index's document table does not fit the .bin (a negative length, a document that
    starts before 0 or ends past the end of the file), or None. Reads the index's pointers."""
    if len(lengths) and int(lengths.min()) < 0:
        i = int(np.argmin(lengths))
        return f"{idx_path}: document {i} has a negative length {int(lengths[i])}"
    pointers = np.fromfile(
        idx_path, dtype=np.int64, count=len(lengths), offset=34 + 4 * len(lengths)
    )
    if len(pointers) != len(lengths):
        return f"{idx_path}: truncated (the document pointers are cut short)"
    ends = pointers + lengths.astype(np.int64) * itemsize  # [documents] byte end of each
    bad = np.flatnonzero((pointers < 0) | (ends > bin_size))
    if len(bad):
        i = int(bad[0])
        return (
            f"{idx_path}: document {i} spans bytes {int(pointers[i]):,}..{int(ends[i]):,} of a "
            f"{bin_size:,}-byte .bin (the index does not describe this .bin)"
        )
    return None


def indexed_problems(
    path: str | None,
    vocab_size: int,
    seq_length: int | None = None,
    evaluates: bool = False,
    split: tuple[float, ...] | None = None,
) -> list[str]:
    """Configuration problems of ``--data megatron --data-path PREFIX`` (torch-free, fast);
    `evaluates`: the valid split must hold one sample too."""
    if path is None:
        return [f"--data megatron needs --data-path PREFIX (PREFIX.bin and PREFIX.idx; {HINT})"]
    prefix = split_prefix(path)
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        return [f"--data-path {path}: no such file {' or '.join(missing)} ({HINT})"]
    try:
        dtype, lengths = read_index_header(idx_path)
    except (DataError, OSError) as e:
        return [f"--data-path {path}: {e}"]
    itemsize = np.dtype(dtype).itemsize
    if bin_path.stat().st_size != int(lengths.sum(dtype=np.int64)) * itemsize:
        return [
            f"--data-path {path}: {bin_path} has {bin_path.stat().st_size:,} bytes, the index "
            f"says {int(lengths.sum(dtype=np.int64)) * itemsize:,}"
        ]
    table = _document_table_problem(idx_path, lengths, itemsize, bin_path.stat().st_size)
    if table:
        return [f"--data-path {path}: {table}"]
    problems, fractions = [], split
    for part in ("train", "valid") if evaluates else ("train",):
        lo, hi = split_bounds(len(lengths), fractions)[part]
        tokens = int(lengths[lo:hi].sum(dtype=np.int64))
        if seq_length is not None and tokens < seq_length + 1:
            why = " (--eval-interval evaluates on it)" if part == "valid" else ""
            problems.append(
                f"--data-path {path}: the {part} split ({hi - lo} documents, "
                f"{tokens:,} tokens) cannot hold one sample of --seq-length "
                f"{seq_length} + 1 tokens{why}"
            )
    bad = _vocab_problem(bin_path, dtype, vocab_size)
    if bad:
        problems.append(f"--data-path {path}: {bin_path} {bad}")
    return problems


class MegatronIndexed:
    """A Megatron indexed dataset as a `Dataset` (module docstring)."""

    name = "megatron"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        seq_length: int,
        vocab_size: int,
        seed: int,
        global_batch_size: int,
        split: tuple[float, ...] | None = None,
    ):
        problems = indexed_problems(str(path), vocab_size, seq_length, split=split)
        if problems:
            raise DataError("; ".join(problems))
        if global_batch_size < 1 or seed < 0:
            raise DataError(
                f"need global_batch_size >= 1 and seed >= 0, got {global_batch_size}, {seed}"
            )
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = split_prefix(path)
        self.indexed = IndexedDataset(self.prefix, mmap=True)
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed
        self.global_batch_size = global_batch_size
        lengths = self.indexed.sequence_lengths.astype(np.int64)  # [documents]
        self.lengths = lengths
        self.splits = split_bounds(len(lengths), split)

    def split_tokens(self, split: str) -> int:
        lo, hi = self.splits[split]
        return int(self.lengths[lo:hi].sum())

    def samples_per_epoch(self, split: str) -> int:
        """S: samples of ``l + 1`` tokens (sharing one token with the next) in `split`."""
        return max(0, (self.split_tokens(split) - 1) // self.seq_length)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs per dataset, kept for its life
    def _epoch(self, split: str, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(document ids in stream order, their stream offsets [n + 1], the sample order or
        None for in-order) of `split` in `epoch`."""
        lo, hi = self.splits[split]
        docs = np.arange(lo, hi, dtype=np.int64)  # [n]
        shuffle = None
        if split == "train":
            docs = lo + np.random.default_rng([self.seed, SPLIT_CODES[split], epoch]).permutation(
                hi - lo
            )
            shuffle = np.random.default_rng([self.seed, SPLIT_CODES[split], epoch, 1]).permutation(
                self.samples_per_epoch(split)
            )
        offsets = np.concatenate([[0], np.cumsum(self.lengths[docs])])  # [n + 1]
        return docs, offsets, shuffle

    def locate(self, split: str, step: int, index: int) -> tuple[int, int]:
        """(epoch, sample k of that epoch's stream) of sample `index` of `step` (docstring)."""
        s = self.samples_per_epoch(split)
        if s < 1:
            raise DataError(
                f"--data-path {self.prefix}: the {split} split ({self.split_tokens(split):,} "
                f"tokens) cannot hold one sample of {self.seq_length + 1} tokens"
            )
        g = max(step - 1, 0) * self.global_batch_size + index
        if split != "train":
            return 0, g % s
        epoch, j = divmod(g, s)
        return epoch, int(self._epoch(split, epoch)[2][j])

    def _stream(self, split: str, epoch: int, a: int, b: int) -> np.ndarray:
        """Stream tokens ``a..b`` (inclusive) of `split` in `epoch`, read document by document."""
        docs, offsets, _ = self._epoch(split, epoch)
        first = int(np.searchsorted(offsets, a, side="right")) - 1
        parts, pos, d = [], a, first
        while pos <= b:
            start = pos - int(offsets[d])
            take = min(b + 1, int(offsets[d + 1])) - pos
            if take > 0:
                parts.append(self.indexed.get(int(docs[d]), offset=start, length=take))
                pos += take
            d += 1
        return np.concatenate(parts).astype(np.int64)

    def read(self, split: str, step: int, indices: Iterable[int], lo: int, hi: int) -> np.ndarray:
        """int64 [len(indices), hi - lo + 1]: tokens at positions lo..hi of each sample."""
        idx = check_read_args(self, split, step, indices, lo, hi)
        out = np.empty((idx.size, hi - lo + 1), dtype=np.int64)  # [b, w]
        for row, i in enumerate(idx.tolist()):
            epoch, k = self.locate(split, step, i)
            base = k * self.seq_length
            out[row] = self._stream(split, epoch, base + lo, base + hi)  # only these tokens
        if out.size and (out.min() < 0 or out.max() >= self.vocab_size):
            raise DataError(
                f"--data-path {self.prefix}: token ids {out.min()}..{out.max()} are "
                f"outside --vocab-size {self.vocab_size}"
            )
        return out
