"""The wheel built from the repository (setup.py + pyproject.toml), and what runs from it.

* nothing installs under a generic top-level name: the wheel holds ``lss_megatron`` only, with
  the repository's ``analysis/`` and ``baselines/`` as ``lss_megatron.analysis`` and
  ``lss_megatron.baselines`` (every package folder of the checkout is there);
* the presets (``launch/presets/*.yaml``, the compare grids ``launch/presets/compare/*.yaml``)
  ship as package data;
* the metadata has compatible ranges, no ``==`` pin (``torch==`` would replace the torch of an
  existing environment); console scripts for the trainer, compare, figures and the cost model;
* installed into a bare folder and run from outside the checkout: the cost model finds the
  presets (``--preset summit-paper``), compare lists and plans every grid, figures draw from a summary.csv, the trainer's console
  script parses, all imported from the installation (not the checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.support import ROOT

SCRIPTS = {
    "lss-megatron-train": "lss_megatron.train:main",
    "lss-megatron-compare": "lss_megatron.analysis.compare:main",
    "lss-megatron-figures": "lss_megatron.analysis.figures:main",
    "lss-megatron-costmodel": "lss_megatron.analysis.costmodel.__main__:main",
    "lss-megatron-longest": "lss_megatron.analysis.longest:main",
    "lss-megatron-paper-figures": "lss_megatron.analysis.paper_figures:main",
    "lss-megatron-calibrate": "lss_megatron.analysis.calibrate.__main__:main",
}


def _package_folders() -> set[str]:
    """Every package of the checkout under its installed name."""
    names = set()
    for top, installed in (
        ("lss_megatron", "lss_megatron"),
        ("analysis", "lss_megatron.analysis"),
        ("baselines", "lss_megatron.baselines"),
    ):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            names.add(".".join((installed, *rel)))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "repo"  # build from a copy: no build/ in the checkout
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__"
        ),
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (path,) = out.glob("lss_megatron-*.whl")
    return path


def test_wheel_contents(wheel):
    z = zipfile.ZipFile(wheel)
    names = z.namelist()
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/")[0] for n in names} == {"lss_megatron", dist_info}
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("__init__.py")}
    assert _package_folders() <= packages, _package_folders() - packages
    presets = sorted(p.name for p in (ROOT / "launch" / "presets").glob("*.yaml"))
    assert presets and all(f"lss_megatron/presets/{p}" in names for p in presets)
    grids = sorted(p.name for p in (ROOT / "launch" / "presets" / "compare").glob("*.yaml"))
    assert grids and all(f"lss_megatron/presets/compare/{p}" in names for p in grids)
    meta = Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires), requires
    assert not [r for r in requires if "==" in r.split(";")[0]], requires  # ranges only
    entry = z.read(f"{dist_info}/entry_points.txt").decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry, entry


@pytest.mark.timeout(600)
@pytest.mark.slow  # ~22 s: a pip install into a fresh folder and a trainer run there
def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }

    def run(*args, script: str | None = None) -> subprocess.CompletedProcess:
        cmd = [str(site / "bin" / script), *args] if script else [sys.executable, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=300)

    where = run(
        "-c",
        "import lss_megatron, lss_megatron.analysis, lss_megatron.baselines; "
        "from lss_megatron.resources import presets_dir, source_root; "
        "print(lss_megatron.__file__, presets_dir(), source_root())",
    )
    assert where.returncode == 0, where.stderr[-3000:]
    pkg, presets, root = where.stdout.split()
    assert pkg.startswith(str(site)) and presets == str(site / "lss_megatron" / "presets")
    assert root == "None"
    cost = run("-m", "lss_megatron.analysis.costmodel", "--preset", "summit-paper")
    assert cost.returncode == 0, cost.stderr[-3000:]
    assert "144" in cost.stdout
    shutil.copy(ROOT / "analysis" / "fixtures" / "summary.csv", work / "summary.csv")
    figs = run(str(work), "--source", "measured", script="lss-megatron-figures")
    assert figs.returncode == 0, figs.stderr[-3000:]
    assert (work / "figures" / "memory.png").exists()
    train = run("--help", script="lss-megatron-train")
    assert train.returncode == 0 and "--tensorboard-dir" in train.stdout, train.stderr[-2000:]
    for script in ("lss-megatron-compare", "lss-megatron-costmodel"):
        assert run("--help", script=script).returncode == 0, script
    listed = run("--list", script="lss-megatron-compare")  # every preset loads from the wheel
    assert listed.returncode == 0, listed.stderr[-3000:]
    grids = sorted(p.stem for p in (ROOT / "launch" / "presets" / "compare").glob("*.yaml"))
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == grids
    dry = run("--preset", "smoke", "--dry-run", script="lss-megatron-compare")
    assert dry.returncode == 0 and "lss_N2_D1_l128_r0" in dry.stdout, dry.stderr[-3000:]
