"""Datasets by name: `build_dataset` for the trainer, `check_data_config` for config validation.

Both import only numpy (enwik8's module is imported when it is asked for).
"""

from __future__ import annotations

import os

from .base import DataError, Dataset
from .synthetic import SyntheticRecall, synthetic_problems

DATASETS = ("synthetic", "enwik8", "megatron")
"""`--data` choices: the built-in synthetic recall task, enwik8 from `--data-path`, and a Megatron
indexed dataset (``--data-path PREFIX``: PREFIX.bin + PREFIX.idx)."""


def check_data_config(
    name: str,
    path: str | None,
    vocab_size: int,
    seq_length: int | None = None,
    evaluates: bool = False,
    split: tuple[float, ...] | None = None,
) -> list[str]:
    """Problems of ``--data name --data-path path --vocab-size V``, as messages naming the values
    (missing file, wrong size, corrupt zip or missing member, vocabulary mismatch; megatron: bad
    index, a train split shorter than one sample of `seq_length` + 1 tokens, token ids outside
    the vocabulary). Fast: reads only file sizes, zip directories and index headers (and small
    token files). Empty when the data can be used."""
    if name == "synthetic":
        problems = synthetic_problems(vocab_size)
        if path is not None:
            problems.append(f"--data-path {path} is not used by --data synthetic")
        return problems
    if name == "enwik8":
        from .enwik8 import enwik8_problems

        return enwik8_problems(path, vocab_size)
    if name == "megatron":
        from .megatron_indexed import indexed_problems

        return indexed_problems(path, vocab_size, seq_length, evaluates, split=split)
    return [f"--data {name!r} is not one of {DATASETS}"]


def build_dataset(
    name: str,
    *,
    seq_length: int,
    vocab_size: int,
    seed: int,
    path: str | os.PathLike | None = None,
    eval_batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: tuple[float, ...] | None = None,
) -> Dataset:
    """The dataset `name` (one of `DATASETS`); raises `DataError` listing every problem.

    `eval_batch_size` (the global batch G of an evaluation step) makes enwik8's valid/test reads
    contiguous windows (see `enwik8.py`); `cache_dir` is where a zip is extracted (default: next
    to it). The synthetic task ignores both. ``megatron`` needs `eval_batch_size`: it is the G of
    every step, train included (samples are consumed in order, see `megatron_indexed.py`);
    `split`: its train/valid/test document fractions (``--split``, default 90/5/5).
    """
    problems = check_data_config(
        name, None if path is None else str(path), vocab_size, seq_length, split=split
    )
    if problems:
        raise DataError("; ".join(problems))
    if name == "synthetic":
        return SyntheticRecall(seq_length=seq_length, vocab_size=vocab_size, seed=seed)
    if name == "megatron":
        from .megatron_indexed import MegatronIndexed

        if eval_batch_size is None:
            raise DataError("--data megatron needs the global batch size (eval_batch_size)")
        return MegatronIndexed(
            path,
            seq_length=seq_length,
            vocab_size=vocab_size,
            seed=seed,
            global_batch_size=eval_batch_size,
            split=split,
        )
    from .enwik8 import Enwik8

    assert path is not None  # checked above
    return Enwik8(
        path,
        seq_length=seq_length,
        seed=seed,
        eval_batch_size=eval_batch_size,
        cache_dir=cache_dir,
    )
