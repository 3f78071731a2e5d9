"""The output folder of an analysis driver (compare, longest, calibrate.validate) and its children.

* `take(out, prog, ...)`: the driver holds ``--out`` for as long as it runs (the trainer's lock,
  `lss_megatron.runlock`: a second driver into the same folder is refused naming the first) and
  refuses a folder holding another driver's outputs unless ``--overwrite`` (which deletes exactly
  what that driver's manifest lists) or ``--resume`` (which keeps them; runs already complete are
  not run again, `run_trainer(reuse=True)`).
* ``OUT/outputs.json``, the manifest: the driver and every file or run folder it wrote (`note`),
  so an ``--overwrite`` never deletes what another tool put there. A folder written before
  manifests existed is described by the driver's own file names (`take`'s `legacy`).
* `Interrupted` and `signals()`: SIGTERM and SIGHUP raise `Interrupted` in the driver (SIGINT
  raises KeyboardInterrupt), so the trainer it runs (its own process group) is stopped and waited
  for (`compare.run_trainer`) and the driver exits non-zero with one line (`inputs.cli`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .inputs import InputError

MANIFEST = "outputs.json"


class Interrupted(BaseException):
    """SIGTERM or SIGHUP to an analysis driver (a BaseException, as KeyboardInterrupt is)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals():
    """SIGTERM and SIGHUP raise `Interrupted` while the block runs (main thread only)."""
    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, _raise)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


_current: Path | None = None


def _read(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(out: Path, data: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)


def held_outputs(
    out: Path, legacy: Callable[[Path], Iterable[str]]
) -> tuple[str | None, list[str]]:
    """(the driver that wrote them, the outputs in `out` it wrote, relative paths that exist)."""
    m = _read(out)
    if m is not None:
        names = [x for x in m.get("outputs", []) if isinstance(x, str)]
        return m.get("program"), [x for x in names if _inside(out, x) and (out / x).exists()]
    return None, [x for x in legacy(out) if (out / x).exists()]


def _inside(out: Path, rel: str) -> bool:
    try:
        return (out / rel).resolve().is_relative_to(out.resolve()) and rel not in ("", ".")
    except OSError:
        return False


def take(
    out: Path,
    prog: str,
    *,
    what: str,
    overwrite: bool,
    resume: bool,
    legacy: Callable[[Path], Iterable[str]],
) -> None:
    """Hold `out` for this driver (see the module doc); raises `InputError` (one line) when it is
    another driver's or in use. Nothing is created or changed when it refuses."""
    from lss_megatron.runlock import FolderInUse, acquire, release

    global _current
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.exists():
        _, held = held_outputs(out, legacy)
        if held and not (overwrite or resume):
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise InputError(
                f"--out {out} already holds the outputs of another {what} ({shown}): pass "
                "--resume to continue it (runs already complete are kept), --overwrite to "
                "replace it, or choose another --out"
            )
    try:
        acquire(out, "--out", prog)
    except FolderInUse as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"--out {out}: cannot be created or locked ({e.strerror or e})") from None
    try:
        program, held = held_outputs(out, legacy)
        if overwrite:
            for rel in held:
                path = out / rel
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            held = []
        _write(
            out,
            {
                "program": prog,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "outputs": sorted(held) if resume else [],
            },
        )
    except BaseException:
        release(out)
        raise
    _current = out


def note(*paths: Path) -> None:
    """Record `paths` (files or run folders under the held ``--out``) in its manifest."""
    if _current is None:
        return
    m = _read(_current) or {"outputs": []}
    names = list(m.get("outputs", []))
    for p in paths:
        try:
            rel = str(Path(p).resolve().relative_to(_current.resolve()))
        except ValueError:
            continue
        if rel not in names:
            names.append(rel)
    m["outputs"] = sorted(names)
    _write(_current, m)


def release() -> None:
    global _current
    if _current is not None:
        from lss_megatron.runlock import release as unlock

        unlock(_current)
        _current = None


def check_output_file(path: Path, flag: str, *, overwrite: bool, what: str) -> None:
    """Up front, before anything is measured: `path` can be written, and holds no earlier
    result unless `overwrite`. Raises `InputError` (one line); creates nothing."""
    from lss_megatron.runs import folder_problem

    if path.exists() and not path.is_file():
        raise InputError(f"{flag} {path}: exists and is not a file")
    if path.exists() and not overwrite:
        raise InputError(
            f"{flag} {path} already holds {what}: pass --overwrite to replace it, or choose "
            f"another {flag}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: is not writable")
    why = folder_problem(flag, str(path.parent))
    if why:
        raise InputError(f"{flag} {path}: its folder cannot be written ({why})")


def write_file(path: Path, text: str) -> None:
    """Write `text` atomically (a temporary file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cli(prog: str, main: Callable[[], int]) -> int:
    """Run `main`: bad input is one line and exit 2; an output that cannot be written one line
    and exit 1; SIGINT, SIGTERM or SIGHUP stop the driver's running trainer (its process group,
    waited for: `compare.run_trainer`) and end it with one line and 128 + the signal number."""
    try:
        with signals():
            return main()
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written: one line too (a failure, exit 1)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", 2)
        print(
            f"{prog}: error: stopped by {signal_name(signum)}; its running trainer was stopped "
            "and waited for, nothing it started is left running",
            file=sys.stderr,
        )
        return 128 + signum
    finally:
        release()


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name
