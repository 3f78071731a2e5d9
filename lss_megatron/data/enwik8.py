"""enwik8: the first 10^8 bytes of an English Wikipedia XML dump, as a byte-level dataset.

Accepted files (``--data-path``):

* the raw file, exactly 100,000,000 bytes, memory-mapped read-only;
* the usual ``enwik8.zip`` (a zip whose member ``enwik8`` is the raw file). It is extracted once,
  next to the zip (``DIR/enwik8.zip`` -> ``DIR/enwik8``; into ``~/.cache/lss_megatron`` when that
  folder is not writable, or into ``cache_dir``), atomically: the bytes go to a temporary file in
  the same folder that is renamed into place only after its size and CRC checked out, under a file
  lock (``.lock`` next to it) so that concurrent ranks extract it once. A later run reuses the
  extraction when its size is right and it is newer than the zip.

Splits: the usual 90M / 5M / 5M bytes, train ``[0, 90M)``, valid ``[90M, 95M)``, test
``[95M, 100M)``. Vocabulary: the 256 byte values.

Sampling (a training sequence is ``l + 1`` consecutive bytes of one split):

* ``train``: sample ``index`` of optimizer step ``step`` starts at a pseudo-random offset, uniform
  over the ``len - l`` possible ones, drawn from ``numpy.random.default_rng([seed, 0, step,
  index])``;
* ``valid`` / ``test``: with ``eval_batch_size = B`` (the global eval batch), sample ``index`` of
  eval step ``step`` (1-based) is window ``w = ((step - 1) * B + index) mod W`` of the
  ``W = (len - 1) // l`` contiguous windows starting at ``w * l`` (consecutive windows share one
  byte, so each byte after the first is a label exactly once per pass); without it, offsets are
  drawn like training's with the split's own seed stream.

A read touches only the bytes of the requested positions (one slice of the memory map per
sequence). ``python -m lss_megatron.data.enwik8 --download DIR`` fetches ``enwik8.zip``.
numpy only at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..resources import prog
from .base import SPLIT_CODES, SPLITS, DataError, check_read_args

ENWIK8_SIZE = 100_000_000
"""Bytes in enwik8."""
ENWIK8_SPLITS = (90_000_000, 5_000_000, 5_000_000)
"""Bytes of train, valid and test, in file order."""
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ZIP_MEMBER = "enwik8"
VOCAB_SIZE = 256
DOWNLOAD_HINT = "get it with `python -m lss_megatron.data.enwik8 --download DIR`"

log = logging.getLogger(__name__)


def _is_zip(path: Path) -> bool:
    """A zip by name (``*.zip``) or by its first bytes (a local file header)."""
    if path.suffix.lower() == ".zip":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def enwik8_file_problems(path: str | os.PathLike, expected_size: int = ENWIK8_SIZE) -> list[str]:
    """Fast checks of a raw file or zip (reads no data, only sizes and the zip's directory).

    Each message starts with the path and names the problem; empty when the file looks right.
    """
    p = Path(path)
    if not p.exists():
        return [f"{p}: no such file ({DOWNLOAD_HINT})"]
    if not p.is_file():
        return [f"{p}: not a regular file"]
    try:
        if _is_zip(p):
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
                if ZIP_MEMBER not in names:
                    return [f"{p}: the zip has no member {ZIP_MEMBER!r} (it holds {names[:5]})"]
                size = zf.getinfo(ZIP_MEMBER).file_size
                with zf.open(ZIP_MEMBER) as member:  # the member opens and its data inflates
                    member.read(1 << 16)
            if size != expected_size:
                return [
                    f"{p}: zip member {ZIP_MEMBER!r} has {size:,} bytes, expected {expected_size:,}"
                ]
            return []
        size = p.stat().st_size
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        return [f"{p}: corrupt or not a zip file ({' '.join(str(e).split())[:200]})"]
    except OSError as e:
        return [f"{p}: cannot read ({e})"]
    if size != expected_size:
        return [
            f"{p}: {size:,} bytes, expected exactly {expected_size:,} "
            "(enwik8 is the first 10^8 bytes of the Wikipedia dump)"
        ]
    return []


def enwik8_problems(path: str | None, vocab_size: int) -> list[str]:
    """Configuration problems of ``--data enwik8`` (pure python, fast); empty when it can run."""
    problems = []
    if vocab_size != VOCAB_SIZE:
        problems.append(
            f"--vocab-size {vocab_size} does not fit --data enwik8: it is byte-level and needs "
            f"--vocab-size {VOCAB_SIZE}"
        )
    if path is None:
        problems.append(
            "--data enwik8 needs --data-path FILE (the raw 100,000,000-byte enwik8 or "
            f"enwik8.zip; {DOWNLOAD_HINT})"
        )
    else:
        problems += [f"--data-path {m}" for m in enwik8_file_problems(path)]
    return problems


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lss_megatron`` (default ``~/.cache/lss_megatron``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lss_megatron"


def extraction_path(
    zip_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where `zip_path` is extracted: ``DIR/NAME.zip`` -> ``DIR/NAME`` (or into `cache_dir`, or
    the default cache dir when ``DIR`` is not writable)."""
    z = Path(zip_path)
    name = z.stem if z.suffix.lower() == ".zip" else z.name + ".raw"
    if cache_dir is not None:
        return Path(cache_dir) / name
    if os.access(z.parent, os.W_OK):
        return z.parent / name
    return default_cache_dir() / name


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_extracted(target: Path, zip_path: Path, expected_size: int) -> bool:
    return (
        target.is_file()
        and target.stat().st_size == expected_size
        and target.stat().st_mtime >= zip_path.stat().st_mtime
    )


def extract_zip(
    zip_path: str | os.PathLike,
    expected_size: int = ENWIK8_SIZE,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Extract member ``enwik8`` once, atomically (module docstring); return the raw file."""
    z = Path(zip_path)
    target = extraction_path(z, cache_dir)
    if _is_extracted(target, z, expected_size):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{z}: cannot create the extraction folder {target.parent} ({e})") from e
    with _file_lock(target.with_name(target.name + ".lock")):
        if _is_extracted(target, z, expected_size):  # another process finished meanwhile
            return target
        log.info("extracting %s to %s", z, target)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(z) as zf:
                with zf.open(ZIP_MEMBER) as src:  # checks the CRC when the member is read out
                    shutil.copyfileobj(src, out, 1 << 20)
            size = os.path.getsize(tmp)
            if size != expected_size:
                raise DataError(f"{z}: extracted {size:,} bytes, expected {expected_size:,}")
            os.replace(tmp, target)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
            raise DataError(f"{z}: cannot extract {ZIP_MEMBER!r}: corrupt zip ({e})") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def resolve_enwik8(
    path: str | os.PathLike,
    expected_size: int = ENWIK8_SIZE,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The raw file behind `path` (itself, or its extraction when it is a zip), checked."""
    problems = enwik8_file_problems(path, expected_size)
    if problems:
        raise DataError(problems[0])
    p = Path(path)
    return extract_zip(p, expected_size, cache_dir) if _is_zip(p) else p


class Enwik8:
    """enwik8 as a `Dataset` over a read-only memory map (module docstring).

    `split_sizes` (bytes of train, valid, test; the file must hold exactly their sum) exists for
    tests with small files; `build_dataset("enwik8", ...)` always uses the real 90M/5M/5M.
    """

    name = "enwik8"
    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        seq_length: int,
        seed: int,
        split_sizes: tuple[int, int, int] = ENWIK8_SPLITS,
        eval_batch_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        sizes = tuple(int(x) for x in split_sizes)
        if len(sizes) != len(SPLITS) or seq_length < 1 or seed < 0:
            raise DataError(
                f"need 3 split sizes, seq_length >= 1 and seed >= 0, got {sizes}, {seq_length}, "
                f"{seed}"
            )
        if min(sizes) < seq_length + 1:
            raise DataError(
                f"enwik8 splits of {sizes} bytes cannot hold a sequence of {seq_length + 1} bytes"
            )
        if eval_batch_size is not None and eval_batch_size < 1:
            raise DataError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.seq_length = seq_length
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.file = resolve_enwik8(path, sum(sizes), cache_dir)
        self._data = np.memmap(self.file, dtype=np.uint8, mode="r")  # [total bytes]
        ends = np.cumsum(sizes).tolist()
        self.split_bounds = {
            s: (end - size, end) for s, size, end in zip(SPLITS, sizes, ends, strict=True)
        }

    def num_windows(self, split: str) -> int:
        """W: contiguous evaluation windows of ``l + 1`` bytes in `split`."""
        lo, hi = self.split_bounds[split]
        return (hi - lo - 1) // self.seq_length

    def starts(self, split: str, step: int, indices: Iterable[int]) -> np.ndarray:
        """File offsets of position 0 of each sample: int64 [len(indices)] (module docstring)."""
        base, end = self.split_bounds[split]
        idx = [int(i) for i in indices]
        if split != "train" and self.eval_batch_size is not None:
            w = [((step - 1) * self.eval_batch_size + i) % self.num_windows(split) for i in idx]
            return base + np.asarray(w, dtype=np.int64) * self.seq_length
        n_starts = end - base - self.seq_length  # offsets 0..n_starts-1 keep l + 1 bytes inside
        offs = [
            np.random.default_rng([self.seed, SPLIT_CODES[split], step, i]).integers(n_starts)
            for i in idx
        ]
        return base + np.asarray(offs, dtype=np.int64)

    def read(self, split: str, step: int, indices: Iterable[int], lo: int, hi: int) -> np.ndarray:
        """int64 [len(indices), hi - lo + 1]: bytes at positions lo..hi of each sequence."""
        idx = check_read_args(self, split, step, indices, lo, hi)
        starts = self.starts(split, step, idx)  # [b]
        out = np.empty((idx.size, hi - lo + 1), dtype=np.int64)  # [b, w]
        for row, start in enumerate(starts.tolist()):
            out[row] = self._data[start + lo : start + hi + 1]  # only this segment's bytes
        return out


def download(folder: str | os.PathLike, url: str = ENWIK8_URL, timeout_s: float = 60.0) -> Path:
    """Download ``enwik8.zip`` into `folder` (to a ``.part`` file, renamed once complete and its
    member checks out; removed on any failure, data/fetch.py); return its path. Does nothing when
    a good ``enwik8.zip`` is already there. `timeout_s`: the longest wait for the server."""
    from .fetch import fetch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "enwik8.zip"
    if target.exists() and not enwik8_file_problems(target):
        log.info("%s already present", target)
        return target
    log.info("downloading %s to %s", url, target)
    return fetch(url, target, timeout_s, check=enwik8_file_problems)  # via enwik8.zip.part


def main(argv: list[str] | None = None) -> int:
    """``python -m lss_megatron.data.enwik8 --download DIR [--extract]``."""
    p = argparse.ArgumentParser(
        prog=prog("python -m lss_megatron.data.enwik8"),
        description=f"Download enwik8.zip ({ENWIK8_URL}) and check it.",
    )
    p.add_argument("--download", metavar="DIR", required=True, help="folder for enwik8.zip")
    p.add_argument("--url", default=ENWIK8_URL)
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="give up when the server sends nothing for S seconds (default 60)",
    )
    p.add_argument("--extract", action="store_true", help="also extract the raw file next to it")
    args = p.parse_args(argv)
    if not 0.1 <= args.timeout <= 86400:  # NaN fails too; inf would never give up
        p.error(f"--timeout must be in [0.1, 86400] seconds, got {args.timeout}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = download(args.download, args.url, args.timeout)
        if args.extract:
            path = extract_zip(path)
    except (DataError, OSError) as e:
        log.error("error: %s", e)
        return 1
    log.info("enwik8 ready: --data enwik8 --data-path %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
