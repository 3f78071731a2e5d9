"""Repeats (analysis/repeats.py, `analysis.compare --repeats K`): the interleaved, seeded launch
order; one summary row per configuration with the step time's spread; bootstrap intervals on every
time ratio that hold the point estimate and exclude 1 only for a clear difference; the load
average and the order recorded through the driver (fake launches: no trainer is started)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import compare, figures, presets, repeats, tables
from tests.support import ROOT

FIXTURE = ROOT / "analysis" / "fixtures" / "summary.csv"
K = 5


def _with_repeats(k: int, spread: float = 0.03, equal_to_nsp: bool = True) -> pd.DataFrame:
    """The fixture's launches, each ok one repeated `k` times with step times spread by
    +-`spread` around its own (deterministic); lss-zero2 at N = 2, l = 64 runs exactly as long as
    nvidia-sp there (1.2 s), so its speedup's interval must contain 1."""
    base = tables.read_summary(FIXTURE)
    base = base[base["repeat"] == 0]
    rows = []
    factors = 1 + spread * np.linspace(-1, 1, k)
    for _, row in base.iterrows():
        for r in range(k):
            new = row.to_dict()
            new.update(run_id=f"{tables.config_ids(base).loc[_]}_r{r}", repeat=r, config_id=None)
            if row["status"] == "ok":
                new["step_time_s"] = row["step_time_s"] * factors[(r + len(rows)) % k]
            rows.append(new)
    runs = tables.finish(rows, "strong")
    if equal_to_nsp:
        assert runs.loc[runs["config_id"] == "lss-zero2_N2_D1_l64", "step_time_s"].median() == (
            pytest.approx(1.2)
        )
    return runs


@pytest.fixture(scope="module")
def folded() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = _with_repeats(K)
    return runs, repeats.aggregate(runs, "strong", seed=1)


def test_plan_interleaves_rounds_in_a_seeded_order():
    preset = presets.get_preset("cpu-options")
    plan = presets.make_plan(preset, repeats=3, seed=7)
    configs = len(plan.runs) // 3
    rounds = [plan.runs[i * configs : (i + 1) * configs] for i in range(3)]
    ids = [[r.config_id for r in rnd] for rnd in rounds]
    assert all(sorted(x) == sorted(ids[0]) and len(set(x)) == configs for x in ids)  # once each
    assert all(r.repeat == i for i, rnd in enumerate(rounds) for r in rnd)
    assert len({tuple(x) for x in ids}) == 3  # shuffled anew every round
    again = presets.make_plan(preset, repeats=3, seed=7)
    assert [r.run_id for r in again.runs] == [r.run_id for r in plan.runs]  # the seed fixes it
    other = presets.make_plan(preset, repeats=3, seed=8)
    assert [r.run_id for r in other.runs] != [r.run_id for r in plan.runs]
    assert (plan.seed, plan.repeats) == (7, 3) and preset.repeats >= 1


def test_summary_has_one_row_per_configuration_with_spread(folded):
    runs, df = folded
    assert list(df.columns[: len(repeats.SUMMARY_COLUMNS)]) == list(repeats.SUMMARY_COLUMNS)
    assert df["run_id"].is_unique and len(df) == runs["config_id"].nunique()
    ok = df[df["status"] == "ok"]
    assert (ok["repeats"] == K).all() and (ok["repeats_failed"] == 0).all()
    assert (ok["step_time_s_min"] <= ok["step_time_s"]).all()
    assert (ok["step_time_s"] <= ok["step_time_s_max"]).all()
    assert (ok["step_time_s_max"] > ok["step_time_s_min"]).all()
    lss = df.set_index("run_id").loc["lss_N2_D1_l64"]
    assert lss["step_time_s"] == pytest.approx(0.6) and lss["step_time_s_max"] == (
        pytest.approx(0.6 * 1.03)
    )
    assert not ok["bytes_vary"].any()  # bytes are the same in every repeat
    failed = df.set_index("run_id").loc["nvidia-sp_N4_D1_l128"]
    assert failed["status"] == "failed" and failed["repeats"] == 0 and failed["repeats_failed"] == K


def test_intervals_hold_the_point_and_separate_clear_differences(folded):
    _, df = folded
    assert (df["interval_level"] == repeats.LEVEL).all()
    for column in repeats.TIME_RATIOS:
        has = df[f"{column}_lo"].notna()
        # no packed runs here: step_time_vs_unpacked is tests/unit/test_packed.py's
        assert has.any() or column == "step_time_vs_unpacked", column
        point, lo, hi = (
            df.loc[has, column],
            df.loc[has, f"{column}_lo"],
            df.loc[has, f"{column}_hi"],
        )
        assert ((lo <= point) & (point <= hi)).all(), df.loc[has, ["run_id", column]]
        assert (df.loc[~has, column].isna() | df.loc[~has, f"{column}_lo"].isna()).all()
    by = df.set_index("run_id")
    # lss at 0.6 s against nvidia-sp at 1.2 s, each +-3 %: clearly faster, 2x within the spread
    lss = by.loc["lss_N2_D1_l64"]
    assert 1.9 < lss["speedup_vs_nvidia_sp_lo"] <= 2.0 <= lss["speedup_vs_nvidia_sp_hi"] < 2.1
    # lss-zero2 runs as long as nvidia-sp: its interval contains 1
    zero2 = by.loc["lss-zero2_N2_D1_l64"]
    assert zero2["speedup_vs_nvidia_sp_lo"] < 1 < zero2["speedup_vs_nvidia_sp_hi"]
    verdict = repeats.clear(df, "speedup_vs_nvidia_sp").set_axis(df["run_id"])
    assert verdict["lss_N2_D1_l64"] is True and verdict["lss-zero2_N2_D1_l64"] is False
    # nvidia-sp against itself and the serial reference's efficiency: the point, no verdict
    nsp = by.loc["nvidia-sp_N2_D1_l64"]
    assert nsp["speedup_vs_nvidia_sp_lo"] == nsp["speedup_vs_nvidia_sp_hi"] == 1.0
    assert pd.isna(verdict["nvidia-sp_N2_D1_l64"])
    text = tables.format_table(df)
    line = next(x for x in text.splitlines() if x.lstrip().startswith("lss-zero2"))
    assert "~" in line and "[" in line
    assert "no clear difference" in text and "need no repeats" in text and "95%" in text
    notes = repeats.format_intervals(df, folded[0])
    clear, unclear = notes.split("no clear difference")
    assert "lss N2 D1 l64: speedup_vs_nvidia_sp 2" in clear
    assert "lss-zero2 N2 D1 l64: speedup_vs_nvidia_sp" in unclear


def test_one_repeat_gives_no_interval():
    runs = _with_repeats(1, equal_to_nsp=False)
    df = repeats.aggregate(runs, "strong")
    grid = df[(df["mode"] != "nvidia-sp") & df["speedup_vs_nvidia_sp"].notna()]
    assert len(grid) and grid["speedup_vs_nvidia_sp_lo"].isna().all()
    assert "~" not in tables.format_table(df).split("\n\n")[0]
    assert "no intervals" in repeats.format_intervals(df, runs)


FAKE_TRAINER = """
import json, sys
from pathlib import Path
out, label, t = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
(out / "summary.json").write_text(json.dumps({"step_time_s": t, "tokens_per_s": 2048 / t,
    "achieved_flops_per_s": 1e9 / t, "peak_mem_bytes": 1, "final_loss": 5.0}))
step = {"sp_comm_bytes": 100 * len(label), "grad_comm_bytes": 10, "activation_bytes": 1000,
    "param_bytes": 4, "grad_bytes": 4, "optimizer_state_bytes": 8, "model_flops_per_step": 1e9}
(out / "metrics.jsonl").write_text(json.dumps({"step": 1, **step}) + "\\n")
(out / "config.json").write_text(json.dumps({"runtime": {"machine": "fake CPU (gloo)"}}))
"""


def test_compare_records_the_order_the_seed_and_the_load(tmp_path, monkeypatch, capsys):
    """The driver end to end with a fake trainer (step time by variant, +-2 % by repeat)."""
    times = {"serial": 1.0, "lss": 0.5, "nvidia-sp": 0.5, "ulysses": 0.4}

    def fake(run, out):
        t = times.get(run.label, 0.6) * (1 + 0.02 * (run.repeat - 1))
        return [sys.executable, "-c", FAKE_TRAINER, str(out), run.label, str(t)]

    monkeypatch.setattr(compare, "torchrun_command", fake)
    monkeypatch.setattr(figures, "make_figures", lambda df, out: [])  # drawn in other tests
    out = tmp_path / "cmp"
    argv = ["--preset", "cpu-options", "--repeats", "3", "--seed", "11", "--out", str(out)]
    assert compare.main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    expected = presets.make_plan(presets.get_preset("cpu-options"), 3, 11)
    assert plan["seed"] == 11 and plan["repeats"] == 3
    assert [r["run_id"] for r in plan["runs"]] == [r.run_id for r in expected.runs]
    runs = pd.read_csv(out / "runs.csv").sort_values("order")
    assert list(runs["run_id"]) == [r.run_id for r in expected.runs]  # launched in that order
    assert (runs["order_seed"] == 11).all() and runs["load_1m_before"].notna().all()
    assert runs["load_1m_after"].notna().all()
    df = pd.read_csv(out / "summary.csv")
    assert len(df) == len(expected.runs) // 3 and (df["repeats"] == 3).all()
    assert (df["order_seed"] == 11).all() and df["load_1m_max"].notna().all()
    by = df.set_index("variant")
    assert by.loc["lss", "speedup_vs_nvidia_sp_lo"] < 1 < by.loc["lss", "speedup_vs_nvidia_sp_hi"]
    assert by.loc["ulysses", "speedup_vs_nvidia_sp_lo"] > 1  # 0.4 s against 0.5 s, +-2 %
    assert "machine load (1-min load average" in printed and "order seed 11" in printed
    clear = printed.split("clear differences (95% interval excludes 1):")[1]
    assert "ulysses N4 D1 l1024: speedup_vs_nvidia_sp 1.25" in clear.split("no clear")[0]
    assert list(df["run_id"]) == list(expected.configs)  # grid order, references first
    # --collect rebuilds the same table from the run folders (order and load from launch.json)
    assert compare.main([*argv[:-4], "--out", str(out), "--collect", "--no-progress"]) == 0
    again = pd.read_csv(out / "runs.csv").sort_values("order")
    assert list(again["run_id"]) == list(runs["run_id"])
    assert list(again["load_1m_before"]) == list(runs["load_1m_before"])
