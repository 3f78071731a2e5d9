"""The prepared GPU check, whole: ``bash launch/gpu_check.sh --dry-run`` runs every phase on the
CPU at toy sizes (the trainer twice, as subprocesses) and writes the record the cost model reads;
a second check into the same folder needs --overwrite. Each phase alone, in the fast tier:
tests/unit/test_gpu_check.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from analysis.costmodel.hw import get_device
from analysis.emulate import SHAPES, VARIANTS, plan
from analysis.gpu_check import BUDGET_S, CASES, PHASES
from tests.support import ROOT

CPU_FLASH = {"forward": ["cpu_flash"], "backward": ["cpu_flash"]}


def _check(out, *extra):
    return subprocess.run(
        ["bash", "launch/gpu_check.sh", "--dry-run", "--out-dir", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=560,
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_of_the_prepared_check(tmp_path):
    """The documented command with --dry-run: every phase runs and passes on the CPU, one JSON
    with the planned (GPU, within the budget) and measured seconds of every phase, a row per mode
    and rank with one kernel everywhere, and the cost model reads it (once it names a GPU)."""
    res = _check(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["ok"] and rec["failures"] == [] and rec["dry_run"]
    assert tuple(rec["phase_seconds"]) == tuple(rec["planned_seconds"]) == PHASES
    assert sum(rec["planned_seconds"].values()) <= BUDGET_S
    assert rec["nccl_smoke"]["ok"] and rec["nccl_smoke"]["backend"] == "gloo"
    assert len(rec["attention_checks"]) == 2 * len(CASES)
    assert all(r["ok"] and r["kernels"] == CPU_FLASH for r in rec["attention_checks"])
    mm = rec["matmul_peak"]
    assert len(mm["times_s"]) >= 5 and mm["warmup"] >= 3 and mm["flops_best"] >= mm["flops"]
    eff = rec["attention_efficiency"]
    assert {(r["rank"], r["local_len"]) for r in eff} == {
        (w, n) for w in ("last", "first") for n in (32, 64)
    }
    # causal pairs of the last of N=2 at l/N=32: 32 queries x 32 earlier keys + 32*33/2
    assert eff[0]["flops"] == 3 * 4 * 4 * 16 * (32 * 32 + 32 * 33 // 2)
    assert all(len(r["times_s"]) >= 5 and r["kernels"] == CPU_FLASH for r in eff)
    rows = rec["mode_emulation"]
    assert [(r["variant"], r["rank"]) for r in rows] == plan(SHAPES["dry"])
    assert (
        {r["mode"] for r in rows}
        == {v.mode for v in VARIANTS.values()}
        >= {
            "lss",
            "ulysses",
            "nvidia-sp",
        }
    )
    for r in rows:
        assert r["kernels"] == CPU_FLASH and len(r["times_s"]) >= 5
        assert r["sp_bytes"] == r["cost_model"]["sp_bytes"] > 0
    assert "variant" in rec["mode_emulation_table"][0] and "fwd+bwd ms" in res.stdout
    kernels = rec["sdpa_kernels"]  # one kernel in every dtype and direction, every row counted
    assert set(kernels) == {f"{t} {d}" for t in ("bf16", "fp32") for d in ("forward", "backward")}
    assert all(list(k) == ["cpu_flash"] for k in kernels.values())
    assert kernels["bf16 forward"]["cpu_flash"] == len(CASES) + len(eff) + len(rows)
    for mode in ("serial", "lss"):
        run = rec["trainer"][mode]
        assert run["exit_code"] == 0 and len(run["rows"]) == 2
        assert run["runtime"]["backend"] == "gloo"
        for key, want in run["predicted"].items():  # the CPU counts are exact
            assert all(row[key] == want for row in run["rows"]), (mode, key)
    assert rec["trainer"]["step1_loss_difference"] < 2e-2
    again = _check(tmp_path)  # a second check into the same folder: refused, one line
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr[-2000:]
    rec["device"] = "NVIDIA H200 (dry-run record)"
    (tmp_path / "h200.json").write_text(json.dumps(rec))
    dev = get_device("h200", tmp_path)
    assert dev.peak("bf16") == rec["matmul_peak_flops"]
    assert [n for n, _ in dev.attention_efficiency] == [32, 64]
