"""Turn a byte file (enwik8, or any file) or a JSONL file into a Megatron indexed dataset, one
token per byte.

    python -m lss_megatron.data.make_indexed --input data/enwik8.zip --output-prefix data/enwik8 \\
        --document-separator '</page>'
    torchrun ... -m lss_megatron.train --data megatron --data-path data/enwik8 --vocab-size 256
    python -m lss_megatron.data.make_indexed --input FILE.jsonl --json-keys text --append-eod \\
        --output-prefix PREFIX           # as Megatron-LM's tools/preprocess_data.py
    torchrun ... -m lss_megatron.train --data megatron --data-path PREFIX --vocab-size 257 \\
        --reset-position-ids --reset-attention-mask --eod-mask-loss

JSONL (``--json-keys KEY``, an input ending in ``.jsonl`` or ``.json``): one JSON object per
line, document = the UTF-8 bytes of its ``KEY`` string. ``--append-eod`` ends every document with
the end-of-document token `EOD_TOKEN` = 256 (the byte tokenizer: bytes 0..255, EOD 256, so
training needs ``--vocab-size`` >= 257); the tokens are then stored as uint16. It applies to byte
files too (``--document-separator '</page>' --append-eod``: enwik8's Wikipedia pages as
documents). Empty documents (an empty string, or an empty piece between separators) are skipped
and counted, as Megatron-LM's preprocessing skips them.

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
EOD_TOKEN = 256
"""The end-of-document id of the byte tokenizer (bytes are 0..255): ``--append-eod`` writes it,
the trainer's ``--eod-token`` defaults to it."""


def is_jsonl(path: str | os.PathLike) -> bool:
    return str(path).endswith((".jsonl", ".json"))


def json_documents(path: str | os.PathLike, key: str) -> Iterator[bytes]:
    """The UTF-8 bytes of field `key` of each JSON line of `path` (blank lines are ignored);
    raises ValueError naming the line that is not an object with a string `key`."""
    import json

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--input {path} line {lineno}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise ValueError(
                    f"--input {path} line {lineno}: no string field {key!r} (--json-keys {key})"
                )
            yield obj[key].encode("utf-8")


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
    *,
    json_key: str | None = None,
    append_eod: bool = False,
    stats: dict | None = None,
) -> tuple[int, int]:
    """Write ``output_prefix.bin/.idx`` from the bytes of `input_path` (or, with `json_key`, the
    documents of a JSONL file); returns (documents, tokens). `append_eod` ends each document with
    `EOD_TOKEN` (uint16 tokens). Empty documents are skipped; `stats` (a dict) receives
    ``empty_documents``, their count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from .enwik8 import _is_zip, resolve_enwik8

    src = Path(input_path)
    if json_key is not None:
        docs: Iterator[bytes] = json_documents(src, json_key)
    else:
        if _is_zip(src):
            src = resolve_enwik8(src)
        data = src.read_bytes()
        if not data:
            raise ValueError(f"--input {input_path}: the file is empty")
        docs = documents(data, separator, document_bytes)
    dtype = np.uint16 if append_eod else np.uint8
    eod = np.array([EOD_TOKEN], dtype=np.uint16)  # used with append_eod only
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix.name + ".", suffix=".tmp", dir=prefix.parent)
    tmp_prefix = os.path.join(tmp, "data")
    try:
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
        n_docs = n_tokens = n_empty = 0
        for doc in docs:
            if not doc:
                n_empty += 1
                continue
            tokens = np.frombuffer(doc, dtype=np.uint8).astype(dtype)  # [bytes]
            if append_eod:
                tokens = np.concatenate([tokens, eod])  # [bytes + 1]
            builder.add_document(tokens, [len(tokens)])
            n_docs += 1
            n_tokens += len(tokens)
        if not n_docs:
            raise ValueError(f"--input {input_path}: no non-empty document ({n_empty} empty)")
        builder.finalize(tmp_prefix + ".idx")
        os.replace(tmp_prefix + ".bin", str(prefix) + ".bin")
        os.replace(tmp_prefix + ".idx", str(prefix) + ".idx")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stats is not None:
        stats["empty_documents"] = n_empty
    return n_docs, n_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("python -m lss_megatron.data.make_indexed"), description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--input", required=True, metavar="FILE", help="a byte file, enwik8.zip, or FILE.jsonl"
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        metavar="KEY",
        default=None,
        help="JSONL input: the field holding each document's text (one key)",
    )
    p.add_argument(
        "--append-eod",
        action="store_true",
        help=f"end every document with the EOD token {EOD_TOKEN} (uint16 tokens; train with "
        f"--vocab-size >= {EOD_TOKEN + 1})",
    )
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
    if args.json_keys is not None and len(args.json_keys) != 1:
        p.error(f"--json-keys: one key per output prefix, got {len(args.json_keys)}")
    json_key = args.json_keys[0] if args.json_keys else None
    if json_key is None and is_jsonl(args.input):
        p.error(f"--input {args.input} is JSONL: name its text field with --json-keys KEY")
    if json_key is not None and args.document_separator is not None:
        p.error("--document-separator applies to byte input, not to --json-keys")
    sep = args.document_separator.encode() if args.document_separator else None
    stats: dict = {}
    try:
        n_docs, n_tokens = make_indexed(
            args.input,
            args.output_prefix,
            sep,
            args.document_bytes,
            json_key=json_key,
            append_eod=args.append_eod,
            stats=stats,
        )
    except (ValueError, OSError, UnicodeDecodeError) as e:
        print(f"make_indexed: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    vocab = EOD_TOKEN + 1 if args.append_eod else 256
    eod = f" (each ending in EOD {EOD_TOKEN})" if args.append_eod else ""
    print(
        f"{args.output_prefix}.bin/.idx: {n_docs:,} documents{eod}, {n_tokens:,} tokens; "
        f"{stats['empty_documents']:,} empty documents skipped; train with --data megatron "
        f"--data-path {args.output_prefix} --vocab-size {vocab}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
