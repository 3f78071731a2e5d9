"""How the figures read (analysis/figures.py), checked on the drawn matplotlib objects: one colour
per mode, one marker per sequence length, measured solid and filled, modelled dashed and hollow,
linear axes over narrow ranges, no CPU-RSS panel, the preset and the machine in every title."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors as mcolors
import pandas as pd
import pytest

from analysis import figures, tables
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

    monkeypatch.setattr(figures, "_save", keep)
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
