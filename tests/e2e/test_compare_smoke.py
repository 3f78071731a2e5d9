"""`python -m analysis.compare --preset smoke` end to end: real trainer launches (serial, lss and
nvidia-sp at N = 2 and 4, two lengths), under the 5-minute budget on 2 CPU cores.

Checks: one row per planned run, every column, every run ok; every run used the flash kernel, no
recompute and fp32 (the defaults) and says so in its attention_kernel / recompute / dtype
columns; LSS's counted sp bytes equal an independent computation of its fused K/V traffic; LSS
sends fewer sp bytes than nvidia-sp at the same layout; every run's activation bytes equal the
cost model's prediction exactly; the figures exist.

(This test used to assert that LSS also saves fewer activation bytes than nvidia-sp. That held
only because nvidia-sp ran Megatron's dense attention and LSS a flash kernel: with the same kernel
LSS saves more at N = 4 here, because every rank keeps the gathered K/V of every layer.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 300.0
FP32 = 4


def lss_sp_bytes(n: int, length: int, model: dict, train: dict) -> int:
    """Per step on one rank: per layer and micro-batch, forward all-gather of [K | V]
    (N-1) * 2 * (l/N) * b * h_kv * d * 4 bytes (fp32, ring convention) and a backward
    reduce-scatter of the same size; times layers and micro-batches (G / (D b), D = 1 here)."""
    b = train["micro-batch-size"]
    h_kv = model["num-kv-heads"]
    d = model["hidden-size"] // model["num-heads"]
    one_way = (n - 1) * 2 * (length // n) * b * h_kv * d * FP32
    micro_batches = train["global-batch-size"] // b
    return 2 * one_way * model["num-layers"] * micro_batches


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_compare_smoke(tmp_path):
    from analysis import figures, repeats, tables
    from analysis.presets import get_preset, make_plan

    out = tmp_path / "smoke"
    dist_vars = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis.compare",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=330,
        cwd=ROOT,
        env=env,
    )
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert elapsed < BUDGET_S, f"smoke compare took {elapsed:.0f} s (budget {BUDGET_S:.0f} s)"
    assert "speedup_vs_nsp" in res.stdout and "10/10 runs ok" in res.stdout

    df = pd.read_csv(out / "summary.csv")
    preset = get_preset("smoke")
    plan = make_plan(preset)
    assert set(repeats.SUMMARY_COLUMNS) <= set(df.columns)  # one row per configuration
    assert list(df["run_id"]) == list(plan.configs) and (df["repeats"] == 1).all()
    runs = pd.read_csv(out / "runs.csv")  # one row per launch, in the recorded order
    assert set(tables.COLUMNS) <= set(runs.columns)
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in plan.runs)
    assert runs["load_1m_before"].notna().all() and runs["order"].is_unique
    assert (df["status"] == "ok").all(), df[["run_id", "status", "error"]]
    assert (df["efficiency_kind"] == "strong").all()
    assert (df["attention_kernel"] == "flash").all() and (df["recompute"] == "none").all()
    assert (df["dtype"] == "fp32").all()
    assert (df["predicted_activation_bytes"] == df["activation_bytes"]).all(), df[
        ["run_id", "activation_bytes", "predicted_activation_bytes"]
    ]

    model, train = dict(preset.model), dict(preset.train)
    lss = df[df["mode"] == "lss"].set_index(["seq_parallel", "data_parallel", "seq_length"])
    nsp = df[df["mode"] == "nvidia-sp"].set_index(["seq_parallel", "data_parallel", "seq_length"])
    assert len(lss) == len(nsp) == 4
    for (n, d, length), row in lss.iterrows():
        assert row["sp_comm_bytes"] == lss_sp_bytes(n, length, model, train), (n, length)
        other = nsp.loc[(n, d, length)]
        assert row["sp_comm_bytes"] < other["sp_comm_bytes"], (n, length)
        assert row["speedup_vs_nvidia_sp"] > 0
    serial = df[df["mode"] == "serial"]
    assert (serial["world_size"] == 1).all() and (serial["parallel_efficiency"] == 1).all()
    assert (df["sp_comm_bytes"][df["mode"] == "serial"] == 0).all()

    for name in figures.FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
