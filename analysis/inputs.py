"""Bad input to the analysis commands: one line, exit 2, never a traceback.

* `InputError`: a missing, empty or malformed file or folder; the message names it.
* `outdir.cli(prog, main)` runs a command's ``main`` so that an `InputError` becomes one line
  and exit 2 (it lives beside the drivers' signal handling, above this module).
* `read_csv_table(path, required, numeric)`: a CSV as a DataFrame, or an `InputError` saying what
  is wrong with it.
* `read_json_file(path, what)`: a JSON object, or an `InputError`; `check_run_folder(run, flag)`:
  a finished trainer run folder, or an `InputError`.
* `error_line(stderr)`: the line of a failed trainer run that says why it failed, out of a
  launcher's stderr (torchrun's own report around it is boilerplate).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path


class InputError(ValueError):
    """Input an analysis command cannot use; the message names the path and the problem."""


def read_csv_table(path: Path, required: Iterable[str] = (), numeric: Iterable[str] = ()):
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, no table") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        why = " ".join(str(e).split())[:160]
        raise InputError(f"{path}: not a readable CSV table ({why})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: malformed table, missing columns {missing}")
    if df.empty:
        raise InputError(f"{path}: the table has no rows")
    for col in numeric:
        if col in df.columns and not pd.api.types.is_numeric_dtype(df[col]):
            bad = df[col][pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()]
            if not bad.empty:
                raise InputError(f"{path}: column {col!r} holds {bad.iloc[0]!r}, not a number")
    return df


def check_run_folder(run: Path, flag: str) -> None:
    """A finished trainer run folder: config.json (a JSON object) and metrics.jsonl with steps."""
    if not run.is_dir():
        raise InputError(f"{flag} {run}: no such folder")
    if not (run / "config.json").exists():
        raise InputError(f"{flag} {run}: no config.json, not a trainer run folder")
    read_json_file(run / "config.json", "the trainer's effective configuration")
    try:
        rows = [
            json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()
        ]
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {run}: unreadable metrics.jsonl ({e})") from None
    if not rows:
        raise InputError(f"{flag} {run}: metrics.jsonl has no steps (the run did not train)")


def read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no such file ({what})")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object ({what})")
    return data


_OWN = re.compile(r"lss_megatron\.train: error:|\[rank \d+\] ERROR |^\s*\w+(Error|Exception): ")


def error_line(stderr: str, limit: int = 500) -> str:
    """The failed run's own reason: the trainer's ``error:`` message (with its listed problems),
    else its first ``[rank N] ERROR`` line, else a Python exception line, else the last line."""
    lines = [x.rstrip() for x in stderr.splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if "lss_megatron.train: error:" in line:
            items = [line[line.index("lss_megatron.train: error:") :]]
            items += [x.strip() for x in lines[i + 1 :] if x.startswith("  - ")][:8]
            return " ".join(items)[:limit]
    for line in lines:
        if re.search(r"\[rank \d+\] ERROR ", line):
            return line[line.index("[rank") :][:limit]
    for line in reversed(lines):
        if _OWN.search(line) and "torch.distributed.elastic" not in line:
            return line.strip()[:limit]
    return lines[-1].strip()[-limit:] if lines else "(no output on stderr)"
