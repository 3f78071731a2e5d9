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
# The suite tests the CPU model (gloo ranks, the CPU accommodations of compat/cpu.py): on a GPU
# host, hide CUDA from this process and from every rank it spawns (run_ranks, torchrun
# subprocesses inherit the environment), so the tests run exactly as on a CPU machine and never
# put several NCCL ranks on one GPU. Set LSS_TEST_CUDA=1 to keep CUDA visible (the GPU checks
# are `bash launch/gpu_check.sh`, not this suite).
if os.environ.get("LSS_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# a collective whose bytes comm.record() cannot read fails the test (launched trainers inherit it)
os.environ.setdefault("LSS_STRICT_COMM", "1")
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
