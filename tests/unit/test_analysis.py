"""analysis/: the comparison table, every figure's data, the presets and the driver's plumbing.

Fast (no trainer launches): numbers are checked against analysis/fixtures/summary.csv, a hand-made
table whose expected values are worked out by hand below (see analysis/fixtures/make_fixture.py),
including the variants beyond the paper (lss-zigzag, lss-kv4, ulysses, lss-zero1/2 at N = 2,
l = 64) and their ratios against plain LSS.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "analysis" / "fixtures" / "summary.csv"

from analysis import compare, figures, presets, tables  # noqa: E402

REQUIRED = [
    "mode",
    "seq_parallel",
    "data_parallel",
    "seq_length",
    "hidden_size",
    "num_layers",
    "num_heads",
    "step_time_s",
    "tokens_per_s",
    "sp_comm_bytes",
    "grad_comm_bytes",
    "activation_bytes",
    "peak_mem_bytes",
    "speedup_vs_nvidia_sp",
    "memory_ratio_vs_nvidia_sp",
    "parallel_efficiency",
    "world_size",
    "status",
    "run_dir",
    "model_flops_per_step",
    "achieved_flops_per_s",
    "activation_ratio_vs_nvidia_sp",
    "efficiency_kind",
    "predicted_sp_comm_bytes",
    "predicted_grad_comm_bytes",
    "predicted_activation_bytes",
    "variant",
    "lss_layout",
    "kv_gather_chunks",
    "zero_stage",
    "attention_imbalance",
    "transient_peak_bytes",
    "optimizer_state_bytes",
    "grad_bytes",
    "activation_ratio_vs_lss",
    "transient_peak_ratio_vs_lss",
    "optimizer_state_ratio_vs_lss",
    "speedup_vs_lss",
    "predicted_optimizer_state_bytes",
    "predicted_grad_bytes",
    "predicted_attention_imbalance",
]
OPTIONS = ("lss-zigzag", "lss-kv4", "ulysses", "lss-zero1", "lss-zero2")
"""The fixture's variants beyond the paper, all at N = 2, D = 1, l = 64."""


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return tables.read_summary(FIXTURE)


def row(df: pd.DataFrame, label: str, n: int, length: int, d: int = 1, rep: int = 0) -> pd.Series:
    """The run of variant `label` (a plain mode is its own label) at (N, D, l, repeat)."""
    sel = df[
        (df["variant"] == label)
        & (df["seq_parallel"] == n)
        & (df["data_parallel"] == d)
        & (df["seq_length"] == length)
        & (df["repeat"] == rep)
    ]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def approx(x: float):
    return pytest.approx(x, rel=1e-9)


# --- the table -----------------------------------------------------------------------------------
def test_columns(df):
    assert list(df.columns[: len(tables.COLUMNS)]) == list(tables.COLUMNS)
    assert set(REQUIRED) <= set(df.columns)
    assert len(df) == 12 + len(OPTIONS) and set(df["efficiency_kind"]) == {"strong"}


def test_fixture_is_what_the_code_computes(df):
    """The stored derived columns are exactly what add_derived computes from the raw columns."""
    raw = df.drop(columns=list(tables.DERIVED))
    again = tables.add_derived(raw, "strong")
    for column in tables.DERIVED:
        pd.testing.assert_series_equal(again[column], df[column], check_names=False)


def test_fixture_file_is_what_make_fixture_writes(tmp_path, monkeypatch):
    """analysis/fixtures/summary.csv is, byte for byte, what `python -m
    analysis.fixtures.make_fixture` writes, so the numbers worked out by hand here are the
    generator's."""
    from analysis.fixtures import make_fixture

    monkeypatch.setattr(make_fixture, "HERE", tmp_path)
    make_fixture.main()
    assert (tmp_path / "summary.csv").read_bytes() == FIXTURE.read_bytes()


def test_ratios_vs_nvidia_sp(df):
    lss = row(df, "lss", 2, 64)
    assert lss["speedup_vs_nvidia_sp"] == approx(1.2 / 0.6)
    # on CPU the memory ratio is of counted bytes (activations + weights + gradients + optimizer
    # state), not of the process RSS the peak holds there (tables.memory_bytes)
    held = ("activation_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes")
    nsp = row(df, "nvidia-sp", 2, 64)
    want = sum(nsp[c] for c in held) / sum(lss[c] for c in held)
    assert lss["memory_ratio_vs_nvidia_sp"] == approx(want) and want != approx(5.0e8 / 4.0e8)
    assert lss["activation_ratio_vs_nvidia_sp"] == approx((10 * 64**2 + 500 * 64) / 64000)
    assert lss["sp_comm_ratio_vs_nvidia_sp"] == approx(8.0)
    assert row(df, "lss", 4, 64)["speedup_vs_nvidia_sp"] == approx(1.0 / 0.4)
    assert row(df, "lss", 2, 128)["speedup_vs_nvidia_sp"] == approx(2.5)
    for n, length in ((2, 64), (4, 64), (2, 128)):
        assert row(df, "nvidia-sp", n, length)["speedup_vs_nvidia_sp"] == 1.0
    # the nvidia-sp run it would compare with failed: no ratio
    assert math.isnan(row(df, "lss", 4, 128)["speedup_vs_nvidia_sp"])
    assert math.isnan(row(df, "nvidia-sp", 4, 128)["speedup_vs_nvidia_sp"])
    # serial as data parallelism on P = 2: the only nvidia-sp layout with P = 2 is N = 2, D = 1
    dp = row(df, "serial", 1, 64, d=2)
    assert dp["speedup_vs_nvidia_sp"] == approx(1.2 / 0.55)
    assert math.isnan(dp["sp_comm_ratio_vs_nvidia_sp"])  # serial sends no sp bytes
    assert math.isnan(row(df, "serial", 1, 64)["speedup_vs_nvidia_sp"])  # no nvidia-sp at P = 1


def test_ratios_vs_lss(df):
    """Every variant against plain LSS at its (N, D, l): plain's value over the variant's."""
    lss = row(df, "lss", 2, 64)
    for column in (
        "speedup_vs_lss",
        "activation_ratio_vs_lss",
        "transient_peak_ratio_vs_lss",
        "optimizer_state_ratio_vs_lss",
        "grad_ratio_vs_lss",
    ):
        assert lss[column] == 1.0, column
    zigzag = row(df, "lss-zigzag", 2, 64)
    assert (zigzag["mode"], zigzag["lss_layout"]) == ("lss", "zigzag")
    assert zigzag["attention_imbalance"] == 1.0 and lss["attention_imbalance"] == 1.5
    assert zigzag["speedup_vs_lss"] == approx(0.6 / 0.5)
    assert zigzag["activation_ratio_vs_lss"] == approx(64_000 / 66_000)
    kv4 = row(df, "lss-kv4", 2, 64)
    assert kv4["kv_gather_chunks"] == 4 and kv4["sp_comm_bytes"] == lss["sp_comm_bytes"]
    assert kv4["transient_peak_ratio_vs_lss"] == approx(200_000 / 160_000)
    zero1, zero2 = row(df, "lss-zero1", 2, 64), row(df, "lss-zero2", 2, 64)
    assert (zero1["zero_stage"], zero2["zero_stage"]) == (1, 2)
    assert zero1["optimizer_state_ratio_vs_lss"] == approx(50_000 / 25_004)
    assert zero1["grad_ratio_vs_lss"] == 1.0 and zero2["grad_ratio_vs_lss"] == approx(25 / 15)
    assert zero2["speedup_vs_lss"] == approx(0.6 / 1.2)
    uly = row(df, "ulysses", 2, 64)
    assert math.isnan(uly["attention_imbalance"]) and uly["speedup_vs_lss"] == approx(0.6 / 0.75)
    # the other modes against LSS too; nothing where LSS did not run or recorded nothing
    assert row(df, "nvidia-sp", 2, 64)["speedup_vs_lss"] == approx(0.6 / 1.2)
    assert math.isnan(row(df, "serial", 1, 64)["speedup_vs_lss"])  # no LSS at N = 1
    assert math.isnan(row(df, "lss", 4, 64)["transient_peak_ratio_vs_lss"])  # an older run
    assert math.isnan(row(df, "nvidia-sp", 2, 64)["transient_peak_ratio_vs_lss"])
    # the variants do not disturb the nvidia-sp ratios: plain nvidia-sp at N = 2, l = 64
    assert zigzag["speedup_vs_nvidia_sp"] == approx(1.2 / 0.5)
    assert zero1["sp_comm_ratio_vs_nvidia_sp"] == approx(8.0)


def test_plain_references_skip_variants(df):
    """Only plain runs are references: a ZeRO nvidia-sp or an LSS variant never is."""
    extra = row(df, "nvidia-sp", 2, 64).copy()
    extra["variant"], extra["zero_stage"], extra["step_time_s"] = "nvidia-sp-zero1", 1, 0.1
    fast = row(df, "lss-zigzag", 2, 64).copy()
    fast["step_time_s"] = 0.01
    again = tables.add_derived(
        pd.concat([df, extra.to_frame().T, fast.to_frame().T], ignore_index=True), "strong"
    )
    assert row(again, "lss", 2, 64)["speedup_vs_nvidia_sp"] == approx(1.2 / 0.6)
    assert row(again, "lss-kv4", 2, 64)["speedup_vs_lss"] == approx(0.6 / 0.64)


def test_tables_without_option_columns(df):
    """A table from before the variants (no option columns) still gets its LSS ratios."""
    old = df[df["variant"] == df["mode"]].drop(
        columns=[
            "variant",
            "lss_layout",
            "kv_gather_chunks",
            "zero_stage",
            "attention_imbalance",
            "transient_peak_bytes",
            *tables.DERIVED,
        ]
    )
    again = tables.add_derived(old, "strong")
    lss = again[(again["mode"] == "lss") & (again["seq_parallel"] == 2)]
    assert (lss["speedup_vs_lss"] == 1.0).all()
    text = tables.format_table(again)
    assert "imbal" not in text and "vs_lss" not in text and "speedup_vs_nsp" in text


def test_strong_efficiency(df):
    # T_1 = serial on one rank at the same l; two repeats at 128 (1.9, 2.1) enter as their median
    assert row(df, "lss", 2, 64)["parallel_efficiency"] == approx(1.0 / (2 * 0.6))
    assert row(df, "nvidia-sp", 4, 64)["parallel_efficiency"] == approx(1.0 / (4 * 1.0))
    assert row(df, "lss", 4, 128)["parallel_efficiency"] == approx(2.0 / (4 * 0.5))
    assert row(df, "lss", 4, 128)["reference_step_time_s"] == approx(2.0)
    assert row(df, "serial", 1, 128, rep=1)["parallel_efficiency"] == approx(2.0 / 2.1)
    # FLOP rate per rank over the 1-rank run's: the same model FLOPs, so the same number here
    lss = row(df, "lss", 2, 128)
    assert lss["flops_efficiency"] == approx((2.2e9 / 1.0 / 2) / (2.2e9 / 2.0))
    assert math.isnan(row(df, "nvidia-sp", 4, 128)["parallel_efficiency"])


def test_weak_efficiency_columns(df):
    weak = tables.add_derived(df, "weak")
    assert set(weak["efficiency_kind"]) == {"weak"}
    # lss N=2 at l=128: base length 64, reference serial (N=1, D=1) at 64: T_1 / T_P = 1.0 / 1.0
    lss = row(weak, "lss", 2, 128)
    assert lss["parallel_efficiency"] == approx(1.0)
    assert lss["flops_efficiency"] == approx((2.2e9 / 1.0 / 2) / (1.0e9 / 1.0))
    assert row(weak, "nvidia-sp", 2, 128)["parallel_efficiency"] == approx(1.0 / 2.5)
    assert math.isnan(row(weak, "lss", 2, 64)["parallel_efficiency"])  # no serial run at l = 32
    with pytest.raises(ValueError):
        tables.add_derived(df, "sideways")


def test_format_table(df):
    text = tables.format_table(df)
    assert "strong scaling, T_1 / (P T_P)" in text
    assert len(text.splitlines()) >= 13 + len(OPTIONS) and "failed" in text
    header = text.splitlines()[0].split()
    for column in (
        "imbal",
        "trans_MiB",
        "opt_MiB",
        "gradmem_MiB",
        "speedup_vs_lss",
        "act_vs_lss",
        "trans_vs_lss",
        "opt_vs_lss",
    ):
        assert column in header, column
    assert all(label in text for label in OPTIONS)  # the mode column shows variant labels
    plain = tables.format_table(df[df["variant"].isin(["serial", "lss", "nvidia-sp"])])
    assert "opt_vs_lss" not in plain and "speedup_vs_lss" not in plain and "imbal" in plain


def test_read_run(tmp_path):
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "step_time_s": 0.5,
                "tokens_per_s": 10.0,
                "achieved_flops_per_s": 3.0,
                "peak_mem_bytes": 7,
                "final_loss": 1.5,
            }
        )
    )
    steps = [
        {
            "step": s,
            "sp_comm_bytes": 100,
            "grad_comm_bytes": 20,
            "activation_bytes": a,
            "sp_comm_time_s": t,
            "param_bytes": 4,
            "grad_bytes": 4,
            "optimizer_state_bytes": 8,
            "model_flops_per_step": 99,
        }
        for s, a, t in ((1, 50, 9.0), (2, 60, 1.0), (3, 55, 3.0))
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "config.json").write_text(json.dumps({"runtime": {"core_attention": "X"}}))
    got = tables.read_run(tmp_path)
    assert got["step_time_s"] == 0.5 and got["peak_mem_bytes"] == 7
    assert got["sp_comm_bytes"] == 100 and got["activation_bytes"] == 60
    assert got["sp_comm_time_s"] == 2.0  # median after the first step
    assert got["core_attention"] == "X" and got["model_flops_per_step"] == 99
    assert math.isnan(got["transient_peak_bytes"]) and math.isnan(got["attention_imbalance"])
    steps[0].update(transient_peak_bytes=123, attention_imbalance=1.75)
    steps[-1]["attention_imbalance"] = 1.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    got = tables.read_run(tmp_path)  # the first step's transient peak; the last step's balance
    assert got["transient_peak_bytes"] == 123 and got["attention_imbalance"] == 1.5


def test_costmodel_absent_is_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "analysis.costmodel", None)
    predict, note = tables.load_costmodel()
    assert predict is None and "not available" in note
    out = tables.predicted_columns({}, None)
    assert set(out) == set(tables.PREDICTED) and all(math.isnan(v) for v in out.values())


def test_predicted_columns_from_a_cost_model(df):
    config = tables.config_from_row(row(df, "lss", 2, 64), seq_length=256)
    assert config["model"]["seq_length"] == 256 and config["parallel"]["seq_parallel"] == 2
    assert config["train"]["num_micro_batches"] == 2

    def fake(cfg: dict) -> dict:
        return {"sp_comm_bytes": cfg["model"]["seq_length"], "activation_bytes": 5}

    out = tables.predicted_columns(config, fake)
    assert out["predicted_sp_comm_bytes"] == 256 and out["predicted_activation_bytes"] == 5
    assert math.isnan(out["predicted_grad_comm_bytes"])


def test_variant_rows_to_costmodel(df):
    """A variant row's configuration keeps its options, and the cost model predicts them."""
    from analysis.costmodel import predict

    zigzag = tables.config_from_row(row(df, "lss-zigzag", 2, 64))
    assert zigzag["parallel"]["lss_layout"] == "zigzag"
    assert tables.config_from_row(row(df, "lss-kv4", 2, 64))["parallel"]["kv_gather_chunks"] == 4
    zero = tables.config_from_row(row(df, "lss-zero1", 2, 64))
    assert zero["train"]["zero_stage"] == 1
    plain = tables.config_from_row(row(df, "lss", 2, 64))
    assert plain["train"]["zero_stage"] == 0 and plain["parallel"]["lss_layout"] == "contiguous"
    got = {
        k: tables.predicted_columns(c, predict)
        for k, c in (("zigzag", zigzag), ("zero", zero), ("plain", plain))
    }
    assert got["zigzag"]["predicted_attention_imbalance"] == 1.0
    assert got["plain"]["predicted_attention_imbalance"] > 1.0  # causal, contiguous
    ratio = (
        got["plain"]["predicted_optimizer_state_bytes"]
        / got["zero"]["predicted_optimizer_state_bytes"]
    )
    assert 1.9 < ratio <= 2.0  # sharded over P = 2 (one 4-byte step each, padding)


# --- figure data ---------------------------------------------------------------------------------
def test_strong_scaling_data(df):
    data = figures.strong_scaling_data(df).set_index(["mode", "seq_length", "world_size"])
    assert data.loc[("lss", 64, 2), "speedup"] == approx(1.0 / 0.6)
    assert data.loc[("lss", 128, 4), "speedup"] == approx(2.0 / 0.5)
    assert data.loc[("nvidia-sp", 128, 2), "step_time_s"] == approx(2.5)
    assert data.loc[("serial", 128, 1), "step_time_s"] == approx(2.0)  # median of repeats
    assert data.loc[("serial", 64, 2), "speedup"] == approx(1.0 / 0.55)
    assert ("nvidia-sp", 128, 4) not in data.index  # failed runs are not plotted
    assert data.loc[("lss-zigzag", 64, 2), "speedup"] == approx(1.0 / 0.5)  # a series of its own
    assert len(data) == 10 + len(OPTIONS)


def test_weak_efficiency_data(df):
    data = figures.weak_efficiency_data(df)
    assert list(zip(data["mode"], data["world_size"], strict=True)) == [
        ("lss", 2),
        ("nvidia-sp", 2),
        ("serial", 1),
    ]
    assert list(data["time_efficiency"]) == [approx(1.0), approx(0.4), approx(1.0)]
    assert list(data["flops_efficiency"]) == [approx(1.1), approx(0.44), approx(1.0)]
    assert set(data["base_length"]) == {64}


def test_memory_data(df):
    data = figures.memory_data(df).set_index(
        ["mode", "seq_parallel", "data_parallel", "seq_length"]
    )
    assert data.loc[("lss", 2, 1, 128), "activation_bytes"] == 128000
    assert data.loc[("lss", 2, 1, 128), "state_bytes"] == 100000
    assert data.loc[("nvidia-sp", 2, 1, 64), "activation_bytes"] == 10 * 64**2 + 500 * 64
    assert data.loc[("serial", 1, 1, 128), "activation_bytes"] == 40 * 128**2
    assert data.loc[("serial", 1, 1, 128), "peak_mem_bytes"] == 6.5e8
    assert data.loc[("lss-zero2", 2, 1, 64), "state_bytes"] == 25_000 + 15_000 + 25_004
    assert len(data) == 10 + len(OPTIONS)


def test_longest_sequence_data_measured(df):
    data = figures.longest_sequence_data(df, source="measured")
    got = {
        (m, n): x
        for m, n, x in zip(data["mode"], data["seq_parallel"], data["max_seq_length"], strict=True)
    }
    # budget 1e6 bytes (the table's column): solve the fixture's laws by hand
    assert got == {
        ("lss", 2): 900,
        ("lss", 4): 1800,  # 1000 l + 1e5, 500 l + 1e5
        ("nvidia-sp", 2): 284,  # 10 l^2 + 500 l + 5e4 <= 1e6: l <= 284.2, even
        ("serial", 1): 141,
    }  # 40 l^2 + 2e5: l <= 141.4
    assert set(data["source"]) == {"measured fit"}
    assert (
        figures.longest_sequence_data(df, 2e6, "measured").set_index(["mode", "seq_parallel"])[
            "max_seq_length"
        ][("lss", 2)]
        == 1900
    )


def test_longest_sequence_data_costmodel(df, monkeypatch):
    def fake(cfg: dict) -> dict:
        length, n = cfg["model"]["seq_length"], cfg["parallel"]["seq_parallel"]
        return {"activation_bytes": 0, "memory_bytes": 1000 * length / n}

    monkeypatch.setattr(figures, "load_costmodel", lambda: (fake, ""))
    data = figures.longest_sequence_data(df, 1e6, "costmodel").set_index(["mode", "seq_parallel"])
    assert data.loc[("lss", 4), "max_seq_length"] == 4000
    assert data.loc[("nvidia-sp", 4), "max_seq_length"] == 4000  # one length is enough here
    assert set(data["source"]) == {"costmodel"}
    monkeypatch.setattr(figures, "load_costmodel", lambda: (None, "absent"))
    with pytest.raises(RuntimeError):
        figures.longest_sequence_data(df, 1e6, "costmodel")


def test_longest_fitting_is_the_brute_force_answer():
    """One search for figures and the cost model: the largest multiple of step that fits, never
    past the limit, 0 when nothing fits; checked against trying every multiple."""
    from analysis.fitsearch import longest_fitting

    for step, limit in ((1, 1), (3, 100), (7, 1000), (384, 1 << 14)):
        for budget in (0, 5, 99, 1000, 10**6):
            size = lambda length: 3 * length + length * length / 50  # noqa: E731
            want = max(
                (k * step for k in range(1, limit // step + 1) if size(k * step) <= budget),
                default=0,
            )
            assert longest_fitting(step, size, budget, limit) == want, (step, limit, budget)


def test_throughput_data(df):
    data = figures.throughput_data(df).set_index(["mode", "seq_length", "world_size"])
    assert data.loc[("lss", 128, 4), "tokens_per_s"] == approx(2 * 128 / 0.5)
    assert data.loc[("lss", 128, 4), "tokens_per_s_per_rank"] == approx(2 * 128 / 0.5 / 4)
    assert data.loc[("nvidia-sp", 64, 2), "achieved_flops_per_s"] == approx(1e9 / 1.2)
    assert data.loc[("ulysses", 64, 2), "tokens_per_s"] == approx(2 * 64 / 0.75)
    assert len(data) == 10 + len(OPTIONS)


def test_figures_regenerate_from_csv_alone(tmp_path, capsys):
    shutil.copy(FIXTURE, tmp_path / "summary.csv")
    assert figures.main([str(tmp_path), "--source", "measured"]) == 0
    for name in figures.FIGURES:
        for ext in ("png", "pdf"):
            path = tmp_path / "figures" / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    assert figures.FIGURES.keys() == {
        "strong_scaling",
        "weak_efficiency",
        "memory",
        "longest_sequence",
        "throughput",
        "overview",
    }


def test_figures_of_an_empty_table(tmp_path, df):
    """A figure is drawn only when its data exists: no empty axes."""
    paths = figures.make_figures(df[df["status"] == "nope"], tmp_path, 1e6, "measured")
    assert paths == [] and not list(tmp_path.glob("*.png"))


def test_weak_efficiency_is_not_drawn_for_a_strong_only_table(tmp_path, df):
    strong = df[(df["status"] == "ok") & (df["mode"] != "nonexistent")]
    data = figures.weak_efficiency_data(strong)
    paths = figures.make_figures(strong, tmp_path, 1e6, "measured")
    names = {p.stem for p in paths}
    assert ("weak_efficiency" in names) == (not data.empty)


def test_memory_ratio_is_not_a_ratio_of_rss_on_cpu():
    from analysis.tables import memory_bytes

    rows = pd.DataFrame(
        {
            "activation_bytes": [10, 20],
            "param_bytes": [1, 2],
            "grad_bytes": [1, 2],
            "optimizer_state_bytes": [2, 4],
            "peak_mem_bytes": [400e6, 400e6],
            "machine": ["cpu gloo", "NVIDIA H100 CUDA nccl"],
        }
    )
    assert list(memory_bytes(rows)) == [14.0, 400e6]


# --- presets and plans ---------------------------------------------------------------------------
def test_smoke_plan():
    plan = presets.make_plan(presets.get_preset("smoke"))
    assert len(plan.runs) == 10 and not plan.skipped
    assert max(r.world_size for r in plan.runs) <= 4
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    refs = [r for r in plan.runs if r.role == "reference"]
    got = {(r.mode, r.world_size, r.seq_length) for r in refs}
    assert got == {("serial", 1, 128), ("serial", 1, 256)}
    for n in (2, 4):
        for length in (128, 256):
            modes = [r.mode for r in plan.runs if (r.seq_parallel, r.seq_length) == (n, length)]
            assert sorted(modes) == ["lss", "nvidia-sp"]
    for r in plan.runs:
        args = r.trainer_args("/x")
        assert args[-4:] == ["--out", "/x", "--progress", "off"]
        assert presets.trainer_problem(r) is None


def test_every_round_runs_every_mode_of_a_point():
    """The order itself (interleaved rounds, shuffled by a seed): tests/unit/test_repeats.py."""
    plan = presets.make_plan(presets.get_preset("cpu-strong"))
    point = [r for r in plan.runs if (r.role, r.world_size, r.seq_length) == ("grid", 2, 512)]
    orders = [[r.mode for r in point if r.repeat == k] for k in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == 4
    assert {r.mode for r in point} == {"lss", "nvidia-sp", "ulysses", "serial"}  # serial: DP


def test_weak_plan_scales_length_with_n():
    plan = presets.make_plan(presets.get_preset("cpu-weak"), repeats=1)
    grid = {(r.mode, r.seq_parallel, r.seq_length) for r in plan.runs}
    assert ("lss", 4, 4 * 256) in grid and ("nvidia-sp", 2, 2 * 128) in grid
    assert ("serial", 1, 128) in grid and ("serial", 1, 256) in grid


def by_label(plan) -> dict:
    return {r.label: r for r in plan.runs}


def test_options_plan(monkeypatch):
    """cpu-options: plain LSS and every option at N = 4 (P = 4) plus the serial reference; a
    variant whose flag the trainer lacks is skipped with that reason."""
    plan = presets.make_plan(presets.get_preset("cpu-options"), repeats=1)
    labels = {r.label for r in plan.runs}
    zero = {"lss-zero1", "lss-zero2"}
    assert {"serial", "lss", "lss-zigzag", "lss-kv4", "ulysses", "nvidia-sp"} <= labels
    assert labels | {s.split("_")[0] for s, _ in plan.skipped} >= zero  # run, or skipped
    assert max(r.world_size for r in plan.runs) == 4 and len(plan.runs) + len(plan.skipped) == 12
    assert {"lss-local", "lss-overlap", "lss-local-overlap", "lss-megatron-cp"} <= labels
    args = " ".join(by_label(plan)["lss-megatron-cp"].trainer_args("o"))
    assert "--lss-save-kv local" in args and "--lss-kv-gather separate" in args
    assert "--lss-overlap" in " ".join(by_label(plan)["lss-overlap"].trainer_args("o"))
    by = {r.label: r for r in plan.runs}
    length = presets.get_preset("cpu-options").seq_lengths[0]
    assert by["lss-zigzag"].mode == "lss"
    assert by["lss-zigzag"].run_id == f"lss-zigzag_N4_D1_l{length}_r0"
    args = " ".join(by["lss-kv4"].trainer_args("o"))
    assert "--mode lss" in args and "--kv-gather-chunks 4" in args
    assert by["lss"].variant == "" and by["lss"].run_id == f"lss_N4_D1_l{length}_r0"
    monkeypatch.setattr(
        presets,
        "trainer_flags",
        lambda: frozenset(
            {
                "--mode",
                "--seq-parallel",
                "--data-parallel",
                "--seq-length",
                "--out",
                "--progress",
                *(f"--{k}" for k in by["lss-kv4"].flags),
            }
        ),
    )
    plan = presets.make_plan(presets.get_preset("cpu-options"))
    skipped = dict(plan.skipped)
    assert {r.label for r in plan.runs} & zero == set()
    assert "no --zero-stage" in skipped[f"lss-zero1_N4_D1_l{length}"]
    assert "no --lss-layout" in skipped[f"lss-zigzag_N4_D1_l{length}"]
    with pytest.raises(KeyError):
        presets.Preset(
            name="x",
            summary="",
            scaling="strong",
            degrees=(2,),
            seq_lengths=(64,),
            model={},
            train={},
            modes=("lss-nonsense",),
        )


def test_cluster_presets():
    p144 = presets.make_plan(presets.get_preset("paper-enwik8-144gpu"))
    assert max(r.world_size for r in p144.runs) == 144 and not p144.skipped
    assert {r.mode for r in p144.runs} == {"serial", "lss", "nvidia-sp"}
    big = presets.make_plan(presets.get_preset("paper-enwik8-3456gpu"))
    top = max(big.runs, key=lambda r: r.world_size)
    assert (top.mode, top.world_size, top.seq_length) == ("lss", 3456, 50112)
    assert ("serial", 24, 348) in {(r.mode, r.world_size, r.seq_length) for r in big.runs}
    assert {s.split("_")[0] for s, _ in big.skipped} == {"nvidia-sp"}  # N = 24, 72, 144
    assert all("--data enwik8" in " ".join(r.trainer_args("o")) for r in big.runs)
    cmd = compare.sbatch_command(top, Path("o"), 6)
    assert cmd.startswith("sbatch --nodes=576 --ntasks-per-node=6 --gpus-per-node=6 ")


def test_equal_ranks_preset():
    """Each mode at its own legal degrees on the same 144 GPUs (explicit rank grids)."""
    plan = presets.make_plan(presets.get_preset("paper-enwik8-144gpu-equal-ranks"))
    grid = [r for r in plan.runs if r.role == "grid"]
    assert {(r.mode, r.seq_parallel, r.data_parallel, r.setting) for r in grid} == {
        (m, n, 144 // n, s)
        for m, ns in (("lss", (6, 24, 144)), ("nvidia-sp", (6, 12)))
        for n in ns
        for s in ("", "_dense")
    }
    assert not plan.skipped and {r.world_size for r in grid} == {144}
    assert {(r.mode, r.world_size) for r in plan.runs if r.role == "reference"} == {("serial", 1)}
    assert {r.seq_length for r in plan.runs} == {6912}
    with pytest.raises(ValueError, match="explicit grids need strong scaling"):
        presets.Preset(
            name="x",
            summary="",
            scaling="weak",
            degrees=(),
            seq_lengths=(64,),
            model={},
            train={},
            grids=(("lss", 2, 1),),
        )


@pytest.mark.slow  # over ~10 s: the fast tier stays under 5 min
def test_every_preset_file_loads_and_plans():
    """The presets are the YAML files of launch/presets/compare/, one per preset, read strictly;
    each plans at least one run and every grid point has its serial reference."""
    files = sorted((ROOT / "launch" / "presets" / "compare").glob("*.yaml"))
    assert sorted(presets.all_presets()) == sorted(f.stem for f in files) and len(files) >= 10
    for f in files:
        preset = presets.load_preset(f)
        assert preset == presets.get_preset(f.stem)
        plan = presets.make_plan(preset, repeats=1)
        assert plan.runs and {r.role for r in plan.runs} == {"grid", "reference"}, f.stem


_GOOD = """
summary: a test grid
scaling: strong
degrees: [2]
seq-lengths: [64]
memory-budget: 64 MiB
model: {num-layers: 1, hidden-size: 32, num-heads: 4, ffn-hidden-size: 64, vocab-size: 64}
train: {steps: 1, lr: 1e-3, global-batch-size: 1, micro-batch-size: 1}
"""


def test_preset_file_is_read_strictly(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(_GOOD)
    p = presets.load_preset(good)
    assert (p.name, p.degrees, p.memory_budget_bytes) == ("good", (2,), 64 << 20)
    assert p.train["lr"] == 1e-3 and isinstance(p.train["lr"], float)  # YAML's "1e-3": a string
    assert p.modes == presets.PARALLEL_MODES and p.timeout_s == 120.0  # the defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        _GOOD.replace("degrees: [2]", "degrees: 2")
        .replace("64 MiB", "64 MB")
        .replace("steps: 1", "steps: 1.5, mode: lss, no-such-flag: 1")
        + "repeats: '2'\nserial-at-scale: 1\ncolour: red\n"
    )
    with pytest.raises(presets.PresetError) as e:
        presets.load_preset(bad)
    msg = str(e.value)
    assert msg.startswith(f"compare preset {bad}: ") and "\n" not in msg
    for part in (
        "degrees: 2 is not a list",
        "memory-budget: '64 MB' is not a size",
        "train.steps: 1.5 (float) is not an integer",
        "train.mode: set by the plan",
        "train.no-such-flag: not a trainer flag",
        "repeats: '2' (str) is not an integer",
        "serial-at-scale: 1 (int) is not true or false",
        "unknown key 'colour'",
    ):
        assert part in msg, (part, msg)
    (tmp_path / "odd.yaml").write_text(_GOOD.replace("scaling: strong", "scaling: sideways"))
    with pytest.raises(presets.PresetError, match="scaling must be strong or weak"):
        presets.load_preset(tmp_path / "odd.yaml")
    (tmp_path / "short.yaml").write_text("scaling: strong\n")
    with pytest.raises(presets.PresetError, match="missing key 'summary'.*needs degrees"):
        presets.load_preset(tmp_path / "short.yaml")


def test_a_broken_preset_file_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "broken.yaml").write_text(_GOOD.replace("[64]", "[sixty-four]"))
    monkeypatch.setattr(presets, "compare_presets_dir", lambda: tmp_path / "compare")
    presets.all_presets.cache_clear()
    try:
        assert compare.main(["--preset", "broken", "--dry-run"]) == 2
    finally:
        presets.all_presets.cache_clear()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "seq-lengths[0]: 'sixty-four' (str) is not an integer" in err


# --- the driver's plumbing (no trainer launches) -------------------------------------------------
def test_dry_run_prints_commands(tmp_path, capsys):
    assert compare.main(["--preset", "smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "lss_megatron.train" in x]
    assert len(lines) == 10 and all("--standalone" in x and "OMP_NUM_THREADS=1" in x for x in lines)
    assert not (tmp_path / "runs").exists()


def test_cluster_preset_is_not_launched(tmp_path, capsys):
    assert compare.main(["--preset", "paper-enwik8-144gpu", "--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def _fake_launch(monkeypatch, code: str) -> None:
    monkeypatch.setattr(compare, "torchrun_command", lambda run, out: [sys.executable, "-c", code])


def test_failed_run_is_recorded(tmp_path, monkeypatch):
    _fake_launch(monkeypatch, "import sys; sys.stderr.write('x' * 5000 + 'boom'); sys.exit(3)")
    run = presets.make_plan(presets.get_preset("smoke")).runs[0]
    got = compare.launch(run, tmp_path / "r", timeout_s=60)
    assert got["status"] == "failed" and got["error"].startswith("exit status 3: ")
    assert got["error"].endswith("boom") and len(got["error"]) < 2100


def test_hung_run_times_out(tmp_path, monkeypatch):
    _fake_launch(monkeypatch, "import time; time.sleep(60)")
    run = presets.make_plan(presets.get_preset("smoke")).runs[0]
    got = compare.launch(run, tmp_path / "r", timeout_s=1)
    assert got["status"] == "timeout" and got["wall_s"] < 30


def test_ok_exit_without_outputs_is_a_failure(tmp_path, monkeypatch):
    _fake_launch(monkeypatch, "pass")
    run = presets.make_plan(presets.get_preset("smoke")).runs[0]
    assert compare.launch(run, tmp_path / "r", timeout_s=60)["status"] == "failed"
    row = compare.collect(run, tmp_path / "missing", None)
    assert row["status"] == "missing"
