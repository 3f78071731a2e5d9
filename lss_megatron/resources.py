"""Where the files beside the code are: a source checkout, or an installed wheel.

In a checkout (or an editable install) the package sits in the repository, next to ``launch/``
and ``analysis/``; a wheel has no repository, and ships the presets as package data
(``lss_megatron/presets/*.yaml`` and ``lss_megatron/presets/compare/*.yaml``, from
``launch/presets/``; see setup.py). Torch-free.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def source_root() -> Path | None:
    """The repository root when this package runs from a checkout, else None."""
    root = PACKAGE.parent
    if (root / "launch" / "presets").is_dir() and (root / "pyproject.toml").is_file():
        return root
    return None


def presets_dir() -> Path:
    """The YAML presets: ``launch/presets`` of a checkout, else the copy installed with the
    package."""
    root = source_root()
    return root / "launch" / "presets" if root is not None else PACKAGE / "presets"


def find_preset(name: str) -> Path | None:
    """The packaged trainer preset called `name` (``tiny-cpu`` or ``tiny-cpu.yaml``), when `name`
    is a bare name rather than a path; None otherwise."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return None
    stem = name[:-5] if name.endswith(".yaml") else name
    path = presets_dir() / f"{stem}.yaml"
    return path if path.is_file() else None


def preset_names() -> list[str]:
    """The packaged trainer presets, by name."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def prog(module_usage: str) -> str:
    """The program name for usage lines: the console script's own name when this process is one
    (``lss-megatron-train``), else `module_usage` (``python -m lss_megatron.train``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("lss-megatron") else module_usage


def user_data_dir() -> Path:
    """A user-writable folder for files the package writes by default (a calibration):
    ``$XDG_DATA_HOME/lss-megatron``, else ``~/.local/share/lss-megatron``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "lss-megatron"


def compare_presets_dir() -> Path:
    """The comparison grids of ``python -m analysis.compare --preset NAME``: ``compare/`` under
    `presets_dir` (one YAML file per preset; analysis/presets.py reads them)."""
    return presets_dir() / "compare"
