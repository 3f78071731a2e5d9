"""Every script in launch/ answers -h / --help with its usage, exit 0, and does nothing else
(issue #25 item 7): no interpreter, pip, download tool or launcher is run, no file is written."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import ROOT

SCRIPTS = sorted(
    p.name for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch") and p.is_file()
)
TOOLS = (
    "python",
    "python3",
    "python3.11",
    "pip",
    "curl",
    "wget",
    "srun",
    "jsrun",
    "torchrun",
    "deepspeed",
    "nvidia-smi",
    "git",
)


def test_every_launch_script_is_covered():
    assert {"gpu_check.sh", "fetch_wheels.sh", "setup_env.sh", "torchrun.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_does_nothing_else(script, flag, tmp_path):
    stubs, marker = tmp_path / "bin", tmp_path / "ran"
    stubs.mkdir()
    for tool in TOOLS:  # any of these being run is a failure: it leaves a marker
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho {tool} "$@" >> {marker}\nexit 1\n')
        stub.chmod(0o755)
    before = sorted(p.relative_to(ROOT) for p in (ROOT / "launch").rglob("*"))
    env = {**os.environ, "PATH": f"{stubs}:/usr/bin:/bin", "PYTHON": str(stubs / "python")}
    env.pop("VIRTUAL_ENV", None)
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / script), flag],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), marker.read_text()
    first = (ROOT / "launch" / script).read_text().splitlines()[1].lstrip("# ").strip()
    assert res.stdout.splitlines()[0].strip() == first, res.stdout[:300]
    assert sorted(p.relative_to(ROOT) for p in (ROOT / "launch").rglob("*")) == before
    assert list(tmp_path.iterdir()) == [stubs]
