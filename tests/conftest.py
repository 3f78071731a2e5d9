"""Tiers: every test lives in tests/unit, tests/ranks or tests/e2e and carries that folder's marker.

The package under test is the installed one (`bash launch/setup_env.sh` installs it editable);
nothing here edits sys.path. Markers are registered in pyproject.toml (`--strict-markers`);
`slow` is set by hand on each test that takes over ~20 s (docs/testing.md lists them).
"""

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

TIERS = ("unit", "ranks", "e2e")
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve()
        tier = path.parent.name if path.parent.parent == HERE else None
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid}: every test lives in tests/unit, tests/ranks or tests/e2e"
            )
        item.add_marker(getattr(pytest.mark, tier))
