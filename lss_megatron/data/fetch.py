"""Download one URL to a file: a timeout on every read, nothing partial left behind.

`fetch(url, dest, timeout_s, check)` streams into ``dest.part`` and renames it to `dest` only when
the body is complete (as long as the server's Content-Length says) and `check` (if given) finds
no problem in it. A failed check, a server that stops sending for
`timeout_s` seconds, a short body, a refused connection or an interrupt (Ctrl-C) removes the
``.part`` file and raises `DataError` (or re-raises the interrupt), one line naming the URL.
"""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from .base import DataError

CHUNK = 1 << 20


def fetch(url: str, dest: str | os.PathLike, timeout_s: float = 60.0, check=None) -> Path:
    """Download `url` to `dest` (see the module docstring); returns `dest`. `check(path)` returns
    a list of problems with the downloaded file (empty: keep it)."""
    if not timeout_s > 0:
        raise DataError(f"download timeout must be > 0 seconds, got {timeout_s}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        got, expected = _stream(url, part, timeout_s)
        if expected is not None and got != expected:
            raise DataError(
                f"download from {url} ended after {got:,} of {expected:,} bytes; nothing kept"
            )
        problems = check(part) if check is not None else []
        if problems:
            raise DataError(
                f"download from {url} is not what was expected, nothing kept: {problems[0]}"
            )
        os.replace(part, dest)
    except BaseException as e:
        part.unlink(missing_ok=True)
        if isinstance(e, DataError):
            raise
        if isinstance(e, (socket.timeout, TimeoutError)) or (
            isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.timeout)
        ):
            raise DataError(
                f"download from {url}: no data for {timeout_s:g} s (timeout); nothing kept"
            ) from None
        if isinstance(e, http.client.IncompleteRead):
            raise DataError(
                f"download from {url} ended early ({len(e.partial):,} bytes of the "
                "last read); nothing kept"
            ) from None
        if isinstance(e, (urllib.error.URLError, http.client.HTTPException, ValueError)):
            raise DataError(f"download from {url} failed: {_reason(e)}; nothing kept") from None
        raise
    return dest


def _stream(url: str, part: Path, timeout_s: float) -> tuple[int, int | None]:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as f:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        got = 0
        while chunk := resp.read(CHUNK):
            f.write(chunk)
            got += len(chunk)
    return got, expected


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"
