"""The comparison table never forms a ratio or an efficiency across attention kernels, recompute
settings or dtypes (only between runs of the same setting, l and P), and the presets plan every
setting for every mode and reference.

A hand-made table (no trainer launches): runs at N = 2, l = 64 under several settings, with step
times chosen so that any cross-setting ratio would show up as a number where NaN is expected.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import presets, tables
from analysis.fixtures.make_fixture import MODEL

BASE = {
    **MODEL,
    "status": "ok",
    "role": "grid",
    "repeat": 0,
    "seq_length": 64,
    "activation_bytes": 1000,
    "sp_comm_bytes": 100,
    "peak_mem_bytes": 1e8,
    "model_flops_per_step": 1e9,
    "lss_layout": "contiguous",
    "kv_gather_chunks": 1,
    "zero_stage": 0,
}
# (run id, variant, mode, N, kernel, recompute, dtype, step time)
RUNS = [
    ("serial-flash", "serial", "serial", 1, "flash", "none", "fp32", 1.0),
    ("serial-dense", "serial", "serial", 1, "dense", "none", "fp32", 3.0),
    ("lss-flash", "lss", "lss", 2, "flash", "none", "fp32", 0.5),
    ("nsp-dense", "nvidia-sp", "nvidia-sp", 2, "dense", "none", "fp32", 2.0),
    ("lss-dense", "lss", "lss", 2, "dense", "none", "fp32", 1.0),
    ("lss-flash-sel", "lss", "lss", 2, "flash", "selective", "fp32", 0.7),
    ("nsp-flash-bf16", "nvidia-sp", "nvidia-sp", 2, "flash", "none", "bf16", 0.25),
    ("zigzag-dense", "lss-zigzag", "lss", 2, "dense", "none", "fp32", 0.8),
]


@pytest.fixture(scope="module")
def table():
    rows = []
    for run_id, variant, mode, n, kernel, recompute, dtype, step in RUNS:
        rows.append(
            {
                **BASE,
                "run_id": run_id,
                "variant": variant,
                "mode": mode,
                "seq_parallel": n,
                "data_parallel": 1,
                "world_size": n,
                "attention_kernel": kernel,
                "recompute": recompute,
                "dtype": dtype,
                "step_time_s": step,
                "achieved_flops_per_s": 1e9 / step,
                "lss_layout": "zigzag" if variant == "lss-zigzag" else "contiguous",
                "role": "reference" if mode == "serial" else "grid",
            }
        )
    return tables.finish(rows, "strong").set_index("run_id")


def nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def test_ratios_only_within_one_setting(table):
    # same kernel, recompute, dtype, l, P: the one pair with a ratio
    assert table.loc["lss-dense", "speedup_vs_nvidia_sp"] == pytest.approx(2.0 / 1.0)
    # lss flash vs nvidia-sp dense (kernel differs), vs nvidia-sp bf16 (dtype differs): none
    assert nan(table.loc["lss-flash", "speedup_vs_nvidia_sp"])
    assert nan(table.loc["lss-flash", "activation_ratio_vs_nvidia_sp"])
    assert nan(table.loc["lss-flash-sel", "speedup_vs_nvidia_sp"])  # recompute differs
    assert nan(table.loc["nsp-flash-bf16", "speedup_vs_lss"])  # no bf16 lss
    # against plain LSS: the zigzag variant only against LSS with its own (dense) kernel
    assert table.loc["zigzag-dense", "speedup_vs_lss"] == pytest.approx(1.0 / 0.8)
    assert table.loc["nsp-dense", "speedup_vs_lss"] == pytest.approx(1.0 / 2.0)


def test_efficiencies_use_the_reference_of_the_same_setting(table):
    assert table.loc["lss-flash", "reference_step_time_s"] == 1.0  # serial flash
    assert table.loc["lss-dense", "reference_step_time_s"] == 3.0  # serial dense
    assert table.loc["lss-dense", "parallel_efficiency"] == pytest.approx(3.0 / (2 * 1.0))
    assert nan(table.loc["lss-flash-sel", "parallel_efficiency"])  # no serial with selective
    assert nan(table.loc["nsp-flash-bf16", "flops_efficiency"])  # no serial bf16


def test_printed_table_shows_the_setting(table):
    text = tables.format_table(table.reset_index())
    head = text.splitlines()[0].split()
    assert {"kernel", "recomp", "dtype"} <= set(head)
    assert "never across" in text
    assert list(
        tables.setting_label(table.loc[["lss-dense", "lss-flash-sel", "nsp-flash-bf16"]])
    ) == ["dense", "flash, selective", "flash, bf16"]


def test_tables_of_older_trainers_get_their_kernel_from_core_attention():
    rows = [
        {
            **BASE,
            "run_id": r,
            "variant": m,
            "mode": m,
            "seq_parallel": 2,
            "data_parallel": 1,
            "world_size": 2,
            "step_time_s": 1.0,
            "achieved_flops_per_s": 1e9,
            "core_attention": core,
        }
        for r, m, core in (
            ("a", "lss", "LSSCoreAttention"),
            ("b", "nvidia-sp", "DotProductAttention"),
        )
    ]
    old = pd.DataFrame(rows).drop(columns=["dtype", "attention_kernel", "recompute"])
    df = tables.add_derived(old, "strong")
    assert list(df["attention_kernel"]) == ["flash", "dense"]
    assert math.isnan(df["speedup_vs_nvidia_sp"].iloc[0])  # lss vs dense nvidia-sp: no ratio


def test_cpu_kernels_preset_runs_every_mode_under_every_setting():
    for name, n in (("cpu-kernels", 4), ("cpu-kernels-gqa", 2)):
        plan = presets.make_plan(presets.get_preset(name), repeats=1)
        assert not plan.skipped, plan.skipped
        seen = {
            (r.label, r.flags.get("attention-kernel", "flash"), r.flags.get("recompute", "none"))
            for r in plan.runs
        }
        want = {
            (m, k, rc)
            for m in ("serial", "lss", "nvidia-sp", "ulysses", "ring")
            for k in ("flash", "dense")
            for rc in ("none", "selective")
        }
        assert seen == want and len(plan.runs) == 20, name
        assert {r.seq_parallel for r in plan.runs if r.mode != "serial"} == {n}
        assert len({r.run_id for r in plan.runs}) == 20
    smoke = presets.make_plan(presets.get_preset("smoke"))
    assert all(
        "attention-kernel" not in r.flags and "recompute" not in r.flags for r in smoke.runs
    )  # flash, no recompute: the trainer's defaults


def test_modes_kernels_recomputes_select_runs_of_the_same_preset(capsys):
    """`--modes/--kernels/--recomputes` pick which schemes and settings run; the model and recipe
    stay the preset's (so the ratios stay like for like) and the summary names the selection."""
    from analysis import compare

    args = compare.parse_args(
        ["--preset", "cpu-kernels", "--modes", "lss,lss-local,ring", "--kernels", "flash"]
    )
    base = presets.get_preset("cpu-kernels")
    chosen = compare.select(base, args)
    assert chosen.modes == ("lss", "lss-local", "ring")
    assert chosen.kernels == ("flash",) and chosen.recomputes == base.recomputes
    assert chosen.model == base.model and chosen.train == base.train
    assert "[selected: modes lss,lss-local,ring; kernels flash]" in chosen.summary
    assert presets.recorded_name(chosen) == "cpu-kernels [modes lss,lss-local,ring; kernels flash]"
    assert presets.recorded_name(base) == "cpu-kernels"  # rows and titles name the selection
    plan = presets.make_plan(chosen, repeats=1)
    labels = {r.label for r in plan.runs}
    assert labels == {"serial", "lss", "lss-local", "ring"}  # serial: the efficiency reference
    assert {r.flags.get("attention-kernel", "flash") for r in plan.runs} == {"flash"}
    for bad, word in (["--modes", "lss,rings"], "rings"), (["--kernels", ","], "(empty)"):
        with pytest.raises(compare.InputError, match=word.replace("(", r"\(").replace(")", r"\)")):
            compare.select(base, compare.parse_args(["--preset", "cpu-kernels", *bad]))


def test_dry_run_estimates_the_time_from_this_machines_calibration(capsys, monkeypatch):
    """`--dry-run` prints how long the plan should take (start-up per launch + the calibrated
    step times x steps), and nothing when there is no calibration of this machine."""
    from analysis import compare
    from analysis.costmodel import calibrated

    plan = presets.make_plan(presets.get_preset("cpu-packed"), repeats=1)
    minutes, how = compare.estimate_minutes(plan)
    launches = len(plan.runs)
    assert launches * compare.LAUNCH_S / 60 < minutes < launches * compare.LAUNCH_S / 60 + 10
    assert f"{launches} launches" in how
    assert compare.main(["--preset", "cpu-packed", "--dry-run", "--repeats", "1"]) == 0
    assert f"# estimate: about {minutes:.0f} min on this machine" in capsys.readouterr().out
    assert (
        compare.estimate_minutes(presets.make_plan(presets.get_preset("paper-enwik8-144gpu")))
        is None
    )
    monkeypatch.setattr(calibrated, "find_device_file", lambda *a: None)
    monkeypatch.setattr("analysis.costmodel.find_device_file", lambda *a: None)
    assert compare.estimate_minutes(plan) is None
