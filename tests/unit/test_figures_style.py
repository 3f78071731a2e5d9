"""How the figures read (analysis/figures.py), checked on the drawn matplotlib objects: one colour
per mode, one marker per sequence length, measured solid and filled, modelled dashed and hollow,
linear axes over narrow ranges, no CPU-RSS panel, the preset and the machine in every title; the
overview (one bar per configuration, colour = mode, hatch = option / setting, the repeats' spread
as error bars), and the one colour table every figure of the project takes its colours from."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest

from analysis import figures, plotting, repeats, tables
from tests.support import ROOT

FIXTURE = ROOT / "analysis" / "fixtures" / "summary.csv"
CPU = "CPU Test Processor, 2 cores (gloo)"
GPU = "NVIDIA H200 (CUDA, nccl)"


@pytest.fixture
def df() -> pd.DataFrame:
    return tables.read_summary(FIXTURE).assign(machine=CPU)


@pytest.fixture
def drawn(monkeypatch):
    """The figures `make_figures` draws, by name, instead of files."""
    figs = {}

    def keep(fig, stem):
        figs[Path(stem).name] = fig
        return []

    monkeypatch.setattr(plotting, "save", keep)
    yield figs
    import matplotlib.pyplot as plt

    plt.close("all")


def _lines(fig):
    """The data lines (with markers) of every axes: (axes index, Line2D)."""
    return [
        (i, ln)
        for i, ax in enumerate(fig.axes)
        for ln in ax.get_lines()
        if ln.get_marker() not in (None, "None", "") and len(ln.get_xdata())
    ]


def test_every_title_names_preset_and_machine(df, drawn, tmp_path):
    figures.make_figures(df, tmp_path, 1e6, "measured")
    assert set(drawn) == set(figures.FIGURES)
    for name, fig in drawn.items():
        title = fig._suptitle.get_text()
        assert f"preset fixture · {CPU}" in title, (name, title)
    assert "machine not recorded" in figures.context(df.drop(columns="machine"))


def test_one_colour_per_mode_one_marker_per_length(df, drawn, tmp_path):
    figures.make_figures(df, tmp_path, 1e6, "measured")
    data = figures.strong_scaling_data(df)
    palette = figures.Palette(data["mode"], data["seq_length"])
    assert len(set(palette.colours.values())) == data["mode"].nunique()  # distinct colours
    assert len(set(palette.markers.values())) == data["seq_length"].nunique()
    seen = set()
    for _, ln in _lines(drawn["strong_scaling"]):
        mode, length, kind = ln.get_label().split("|")
        assert kind == "measured"
        assert mcolors.to_hex(ln.get_color()) == mcolors.to_hex(palette.colours[mode])
        assert ln.get_marker() == palette.markers[int(length)]
        seen.add((mode, int(length)))
    assert seen == set(zip(data["mode"], data["seq_length"], strict=True))
    assert palette.colours["lss"] == "tab:blue" != palette.colours["lss-zigzag"]


def test_narrow_ranges_are_linear_wide_ones_log(df, drawn, tmp_path):
    figures.make_figures(df, tmp_path, 1e6, "measured")
    left = drawn["strong_scaling"].axes[0]
    assert left.get_yscale() == "linear" and "[ms]" in left.get_ylabel()  # 400..2500 ms
    assert left.get_xscale() == "linear"  # P = 1..4
    wide = df.copy()
    wide.loc[wide["mode"] == "serial", "step_time_s"] *= 1000
    drawn.clear()
    figures.make_figures(wide, tmp_path, 1e6, "measured")
    assert drawn["strong_scaling"].axes[0].get_yscale() == "log"
    memory = drawn["memory"].axes[0]
    assert "[KiB]" in memory.get_ylabel() and memory.get_yscale() == "linear"


def test_cpu_rss_panel_dropped_on_cpu_drawn_on_gpu(df, drawn, tmp_path):
    figures.make_figures(df, tmp_path, 1e6, "measured")
    cpu = drawn["memory"]
    assert len(cpu.axes) == 2 and "peak RSS (mostly imports) not drawn" in cpu._suptitle.get_text()
    assert not any("peak" in ax.get_ylabel() for ax in cpu.axes)
    drawn.clear()
    figures.make_figures(df.assign(machine=GPU), tmp_path, 1e6, "measured")
    gpu = drawn["memory"]
    assert len(gpu.axes) == 3 and "peak allocated GPU memory" in gpu.axes[2].get_ylabel()
    assert figures.on_gpu(df.assign(machine=GPU)) and not figures.on_gpu(df)


def test_modelled_points_are_hollow_and_dashed(df, drawn, tmp_path):
    """Cost-model activations beside the measured ones; the longest-sequence points (all
    modelled) likewise."""
    df = df.assign(predicted_activation_bytes=df["activation_bytes"] * 1.1)
    figures.make_figures(df, tmp_path, 1e6, "measured")
    lines = [ln for i, ln in _lines(drawn["memory"]) if i == 0]
    measured = [ln for ln in lines if ln.get_linestyle() == "-"]
    modelled = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert measured and len(modelled) == len(measured)
    assert all(mcolors.to_hex(ln.get_markerfacecolor()) == "#ffffff" for ln in modelled)
    assert all(mcolors.to_hex(ln.get_markerfacecolor()) != "#ffffff" for ln in measured)
    longest = [ln for _, ln in _lines(drawn["longest_sequence"])]
    assert longest and all(ln.get_linestyle() == "--" for ln in longest)
    assert all(mcolors.to_hex(ln.get_markerfacecolor()) == "#ffffff" for ln in longest)


def _fixture_with_repeats() -> pd.DataFrame:
    """summary.csv of the fixture's launches run 3 times each (step times +-5 %), one row per
    configuration; the lss and nvidia-sp runs at N = 2, l = 64 also with the dense kernel."""
    base = tables.read_summary(FIXTURE)
    base = base[base["repeat"] == 0]
    dense = base[(base["seq_parallel"] == 2) & (base["seq_length"] == 64)]
    dense = dense[dense["variant"].isin(["lss", "nvidia-sp"])].assign(attention_kernel="dense")
    rows = []
    for _, row in pd.concat([base, dense], ignore_index=True).iterrows():
        for r, f in enumerate((0.95, 1.0, 1.05)):
            setting = "_dense" if row["attention_kernel"] == "dense" else ""
            rows.append(
                {
                    **row.to_dict(),
                    "run_id": str(row["run_id"]).replace("_r0", f"{setting}_r{r}"),
                    "config_id": None,
                    "repeat": r,
                    "step_time_s": row["step_time_s"] * f,
                }
            )
    runs = tables.finish(rows, "strong")
    return repeats.aggregate(runs, "strong").assign(machine=CPU)


def test_overview_one_bar_per_configuration(drawn, tmp_path):
    df = _fixture_with_repeats()
    figures.make_figures(df, tmp_path, 1e6, "measured")
    fig = drawn["overview"]
    assert f"preset fixture · {CPU}" in fig._suptitle.get_text()
    data = figures.overview_data(df)
    ok = df[df["status"] == "ok"]
    assert len(data) == len(ok)  # one bar per run configuration (the failed one has none)
    step, saved, sp = fig.axes[:3]
    assert "step time [ms]" in step.get_ylabel() and "3 repeats" in step.get_ylabel()
    assert "saved for backward" in saved.get_ylabel() and "sequence-parallel" in sp.get_ylabel()
    for ax, column, scale in (
        (step, "step_time_s", 1e3),
        (saved, "activation_bytes", None),
        (sp, "sp_comm_bytes", None),
    ):
        bars = ax.patches
        assert len(bars) == len(data)
        heights = [b.get_height() for b in bars]
        div = plotting.bytes_unit(data[column])[0] if scale is None else 1 / scale
        assert heights == pytest.approx(list(data[column] / div), rel=1e-9)
        for bar, mode in zip(bars, data["mode"], strict=True):  # colour = the mode's
            assert mcolors.to_hex(bar.get_facecolor()) == mcolors.to_hex(
                plotting.MODE_COLOURS[mode]
            )
    hatch = {s: b.get_hatch() or "" for s, b in zip(data["style"], step.patches, strict=True)}
    assert hatch[""] == "" and len(set(hatch.values())) == len(hatch)  # one hatch per style
    assert {"zigzag", "zero1", "dense"} <= set(hatch)
    # error bars: the repeats' min and max around the median
    lines = [c for c in step.collections if len(c.get_segments()) == len(data)]
    assert lines, "no error bars"
    spans = sorted((s[:, 1].min(), s[:, 1].max()) for s in lines[0].get_segments())
    lo, hi = data["step_time_s_min"] * 1e3, data["step_time_s_max"] * 1e3
    expected = sorted(zip(lo, hi, strict=True))
    assert np.ravel(spans) == pytest.approx(np.ravel(expected), rel=1e-9)
    groups = {t.get_text() for t in step.texts}
    assert {"N2 x D1\nl=64", "N1 x D1\nl=128"} <= groups  # grouped by layout (and l)


def test_one_length_draws_the_overview_not_the_memory_curves(drawn, tmp_path):
    df = _fixture_with_repeats()
    paths = figures.make_figures(df[df["seq_length"] == 64], tmp_path, 1e6, "measured")
    assert "memory" not in drawn and "overview" in drawn and not paths  # save is stubbed


def test_every_mode_has_its_own_fixed_colour():
    colours = plotting.MODE_COLOURS
    assert set(colours) == {"serial", "lss", "nvidia-sp", "ulysses", "ring"}
    assert len({mcolors.to_hex(c) for c in colours.values()}) == len(colours)
    for label, mode in (
        ("lss-zigzag", "lss"),
        ("ulysses-zero1", "ulysses"),
        ("nvidia-sp [dense, selective]", "nvidia-sp"),
        ("serial [dense]", "serial"),
        ("ring", "ring"),
    ):
        assert plotting.mode_of(label) == mode
        assert plotting.mode_colour(label) == colours[mode]
    tones = plotting.shades(["lss", "lss-zigzag", "lss-kv4", "serial", "nvidia-sp"])
    assert tones["lss"] == colours["lss"] and tones["serial"] == colours["serial"]
    blue = mcolors.to_rgb(colours["lss"])
    for label in ("lss-zigzag", "lss-kv4"):  # the mode's hue, another tone
        rgb = mcolors.to_rgb(tones[label])
        assert rgb != blue and np.argmax(rgb) == np.argmax(blue)
    assert len({mcolors.to_hex(c) for c in tones.values()}) == len(tones)
