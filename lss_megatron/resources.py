"""Where the files beside the code are: a source checkout, or an installed wheel.

In a checkout (or an editable install) the package sits in the repository, next to ``launch/``
and ``analysis/``; a wheel has no repository, and ships the presets as package data
(``lss_megatron/presets/*.yaml`` and ``lss_megatron/presets/compare/*.yaml``, from
``launch/presets/``; see setup.py). Torch-free.
"""

from __future__ import annotations

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


def compare_presets_dir() -> Path:
    """The comparison grids of ``python -m analysis.compare --preset NAME``: ``compare/`` under
    `presets_dir` (one YAML file per preset; analysis/presets.py reads them)."""
    return presets_dir() / "compare"
