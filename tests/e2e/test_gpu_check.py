"""The prepared GPU check, whole: ``bash launch/gpu_check.sh --dry-run`` runs every phase on the
CPU at toy sizes (the trainer twice, as subprocesses) and writes the record the cost model reads.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from analysis.costmodel.hw import get_device
from analysis.gpu_check import CASES
from tests.support import ROOT


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dry_run_of_the_prepared_check(tmp_path):
    """The README's command with --dry-run: every phase runs and passes on the CPU, one JSON, and
    the cost model reads it (once it names a GPU it measured)."""
    res = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--dry-run", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["ok"] and rec["failures"] == [] and rec["dry_run"]
    assert set(rec["phase_seconds"]) == {
        "attention_checks",
        "matmul_peak",
        "attention_efficiency",
        "trainer",
    }
    assert len(rec["attention_checks"]) == 2 * len(CASES)
    assert all(r["ok"] and r["kernels"] == ["cpu_flash"] for r in rec["attention_checks"])
    eff = rec["attention_efficiency"]
    assert {(r["rank"], r["local_len"]) for r in eff} == {
        (w, n) for w in ("last", "first") for n in (32, 64)
    }
    # causal pairs of the last of N=2 at l/N=32: 32 queries x 32 earlier keys + 32*33/2
    assert eff[0]["flops"] == 3 * 4 * 4 * 16 * (32 * 32 + 32 * 33 // 2)
    for mode in ("serial", "lss"):
        run = rec["trainer"][mode]
        assert run["exit_code"] == 0 and len(run["rows"]) == 2
        assert run["runtime"]["backend"] == "gloo"
        for key, want in run["predicted"].items():  # the CPU counts are exact
            assert all(row[key] == want for row in run["rows"]), (mode, key)
    assert rec["trainer"]["step1_loss_difference"] < 2e-2
    rec["device"] = "NVIDIA H200 (dry-run record)"
    (tmp_path / "h200.json").write_text(json.dumps(rec))
    dev = get_device("h200", tmp_path)
    assert dev.peak("bf16") == rec["matmul_peak_flops"]
    assert [n for n, _ in dev.attention_efficiency] == [32, 64]
