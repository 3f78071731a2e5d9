"""Turn a byte file (enwik8, or any file) into a Megatron indexed dataset, one token per byte.

    python -m lss_megatron.data.make_indexed --input data/enwik8.zip --output-prefix data/enwik8 \\
        --document-separator '</page>'
    torchrun ... -m lss_megatron.train --data megatron --data-path data/enwik8 --vocab-size 256

Writes ``PREFIX.bin`` and ``PREFIX.idx`` with Megatron-Core's own
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``: tokens are the byte values
(uint8, vocabulary 256), one index item per document. Documents end after each occurrence of
``--document-separator`` (kept in the document: e.g. ``</page>`` for enwik8's Wikipedia pages),
or, without one, every ``--document-bytes`` bytes (default 65,536). The documents concatenated in
order are exactly the input bytes. An ``enwik8.zip`` is extracted first (`enwik8.resolve_enwik8`);
any other file is read as it is. The two files are written under temporary names and renamed
into place, ``.bin`` before ``.idx``, so a prefix whose ``.idx`` exists is complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..resources import prog

DEFAULT_DOCUMENT_BYTES = 65536


def documents(
    data: bytes, separator: bytes | None = None, document_bytes: int = DEFAULT_DOCUMENT_BYTES
) -> Iterator[bytes]:
    """The documents of `data` (module docstring); their concatenation is `data`."""
    if separator:
        start = 0
        while start < len(data):
            end = data.find(separator, start)
            end = len(data) if end < 0 else end + len(separator)
            yield data[start:end]
            start = end
        return
    for start in range(0, len(data), document_bytes):
        yield data[start : start + document_bytes]


def make_indexed(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    separator: bytes | None = None,
    document_bytes: int = DEFAULT_DOCUMENT_BYTES,
) -> tuple[int, int]:
    """Write ``output_prefix.bin/.idx`` from the bytes of `input_path`; returns (documents,
    tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from .enwik8 import _is_zip, resolve_enwik8

    src = Path(input_path)
    if _is_zip(src):
        src = resolve_enwik8(src)
    data = src.read_bytes()
    if not data:
        raise ValueError(f"--input {input_path}: the file is empty")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix.name + ".", suffix=".tmp", dir=prefix.parent)
    tmp_prefix = os.path.join(tmp, "data")
    try:
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=np.uint8)
        n_docs = 0
        for doc in documents(data, separator, document_bytes):
            builder.add_document(np.frombuffer(doc, dtype=np.uint8), [len(doc)])  # [bytes]
            n_docs += 1
        builder.finalize(tmp_prefix + ".idx")
        os.replace(tmp_prefix + ".bin", str(prefix) + ".bin")
        os.replace(tmp_prefix + ".idx", str(prefix) + ".idx")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n_docs, len(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("python -m lss_megatron.data.make_indexed"), description=__doc__.split("\n")[0]
    )
    p.add_argument("--input", required=True, metavar="FILE", help="a byte file or enwik8.zip")
    p.add_argument(
        "--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--document-separator",
        metavar="TEXT",
        default=None,
        help="end a document after each occurrence of TEXT (UTF-8), e.g. '</page>'",
    )
    g.add_argument(
        "--document-bytes",
        type=int,
        default=DEFAULT_DOCUMENT_BYTES,
        metavar="N",
        help=f"without a separator: documents of N bytes (default {DEFAULT_DOCUMENT_BYTES})",
    )
    args = p.parse_args(argv)
    if not Path(args.input).is_file():
        p.error(f"--input {args.input}: no such file")
    if args.document_bytes < 1:
        p.error(f"--document-bytes must be >= 1, got {args.document_bytes}")
    if args.document_separator == "":
        p.error("--document-separator must not be empty")
    sep = args.document_separator.encode() if args.document_separator else None
    try:
        n_docs, n_tokens = make_indexed(args.input, args.output_prefix, sep, args.document_bytes)
    except (ValueError, OSError) as e:
        print(f"make_indexed: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.output_prefix}.bin/.idx: {n_docs:,} documents, {n_tokens:,} tokens (bytes); "
        f"train with --data megatron --data-path {args.output_prefix} --vocab-size 256"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
