"""How the paper figures read (analysis/paper_figures.py), on the drawn matplotlib objects, from
fixtures (no run): speedup_vs_ranks' layout labels never print over each other (their drawn
boxes are disjoint, even for modes whose speedups nearly coincide); memory_vs_length has one
colour per mode and the degree as the marker (nvidia-sp at t = 6 and 12 look different); the
titles name the preset, taken from the run folder's name when the table has none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import paper_figures, plotting, tables
from tests.support import ROOT

pytestmark = pytest.mark.unit

FIXTURE = ROOT / "analysis" / "fixtures" / "summary.csv"


@pytest.fixture
def drawn(monkeypatch):
    figs = {}

    def keep(fig, stem):
        figs[Path(stem).name] = fig
        return []

    monkeypatch.setattr(paper_figures, "save", keep)
    yield figs
    plotting.pyplot().close("all")


def _best() -> pd.DataFrame:
    """Four modes at P = 2, 4, 8 whose speedups nearly coincide at P = 4 (the overprint case)."""
    rows = []
    for mode, speedups in {
        "lss": (1.20, 1.50, 2.0),
        "ulysses": (1.10, 1.505, 1.6),
        "ring": (1.15, 1.51, 1.7),
        "nvidia-sp": (1.0, 1.0, 1.0),
    }.items():
        for p, s in zip((2, 4, 8), speedups, strict=True):
            rows.append(
                dict(
                    mode=mode,
                    setting="flash",
                    seq_length=1024,
                    world_size=p,
                    speedup_vs_nvidia_sp_best=s,
                    best_layout=f"N{p} x D1",
                )
            )
    return pd.DataFrame(rows)


def test_speedup_layout_labels_do_not_overprint(drawn, monkeypatch):
    summary = tables.read_summary(FIXTURE)
    monkeypatch.setattr(paper_figures, "_equal_ranks", lambda df: summary)
    monkeypatch.setattr(tables, "best_layouts", lambda df: _best())
    series = paper_figures._series(("paper-2023",))
    paper_figures.fig_speedup({"summary": summary}, series, paper_figures._claims(), Path("s"))
    fig = drawn["s"]
    left = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in left.texts if t.get_text().startswith("N")]
    assert len(labels) == 12  # every point labelled
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    colours = {t.get_color() for t in labels}
    assert len(colours) == 4  # each label in its mode's colour
    assert "preset fixture" in left.get_title()


def test_memory_degree_is_a_marker_one_colour_per_mode(drawn):
    series = paper_figures._series(("paper-2023",))
    paper_figures.fig_memory({}, series, paper_figures._claims(), Path("m"))
    right = drawn["m"].axes[1]
    lines = [ln for ln in right.get_lines() if ln.get_label().startswith("paper-2023:")]
    style = {}
    for ln in lines:
        mode = ln.get_label().split(": ")[1].split(" (")[0]
        style.setdefault(mode, set()).add((ln.get_color(), ln.get_marker()))
    assert len(style.get("nvidia-sp", ())) >= 2, style  # t = 6 and 12
    for mode, seen in style.items():
        assert len({c for c, _ in seen}) == 1, (mode, seen)  # one colour per mode
        assert len({m for _, m in seen}) == len(seen), (mode, seen)  # a marker per degree
    colours = {next(iter(seen))[0] for seen in style.values()}
    assert len(colours) == len(style)  # modes do not share a colour


def test_titles_name_the_run_folder_when_no_preset_was_recorded(tmp_path):
    folder = tmp_path / "compare-2026-12-06"
    folder.mkdir()
    shutil.copy(FIXTURE, folder / "summary.csv")
    df = pd.read_csv(folder / "summary.csv").drop(columns=["preset"])
    df.to_csv(folder / "summary.csv", index=False)
    read = tables.read_summary(folder)
    assert set(read["preset"]) == {"compare-2026-12-06"}
    assert "preset compare-2026-12-06 ·" in plotting.context(read)
    half = pd.read_csv(FIXTURE)
    half.loc[::2, "preset"] = ""
    half.to_csv(folder / "summary.csv", index=False)
    names = set(tables.read_summary(folder / "summary.csv")["preset"])
    assert names == {"fixture", "compare-2026-12-06"}
    assert "preset not recorded" not in plotting.context(pd.DataFrame({"status": ["ok"]}))
