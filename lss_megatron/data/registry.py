"""Datasets by name: `build_dataset` for the trainer, `check_data_config` for config validation.

Both import only numpy (enwik8's module is imported when it is asked for).
"""

from __future__ import annotations

import os

from .base import DataError, Dataset
from .synthetic import SyntheticRecall, synthetic_problems

DATASETS = ("synthetic", "enwik8")
"""`--data` choices: the built-in synthetic recall task, and enwik8 from `--data-path`."""


def check_data_config(name: str, path: str | None, vocab_size: int) -> list[str]:
    """Problems of ``--data name --data-path path --vocab-size V``, as messages naming the values
    (missing file, wrong size, corrupt zip or missing member, vocabulary mismatch). Fast: reads
    only file sizes and zip directories. Empty when the data can be used."""
    if name == "synthetic":
        problems = synthetic_problems(vocab_size)
        if path is not None:
            problems.append(f"--data-path {path} is not used by --data synthetic")
        return problems
    if name == "enwik8":
        from .enwik8 import enwik8_problems

        return enwik8_problems(path, vocab_size)
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
) -> Dataset:
    """The dataset `name` (one of `DATASETS`); raises `DataError` listing every problem.

    `eval_batch_size` (the global batch G of an evaluation step) makes enwik8's valid/test reads
    contiguous windows (see `enwik8.py`); `cache_dir` is where a zip is extracted (default: next
    to it). The synthetic task ignores both.
    """
    problems = check_data_config(name, None if path is None else str(path), vocab_size)
    if problems:
        raise DataError("; ".join(problems))
    if name == "synthetic":
        return SyntheticRecall(seq_length=seq_length, vocab_size=vocab_size, seed=seed)
    from .enwik8 import Enwik8

    assert path is not None  # checked above
    return Enwik8(
        path,
        seq_length=seq_length,
        seed=seed,
        eval_batch_size=eval_batch_size,
        cache_dir=cache_dir,
    )
