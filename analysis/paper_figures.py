"""The paper's figures in kind: measured CPU runs (left) beside the modelled paper scale (right).

    python -m analysis.paper_figures --out runs/paper-figures \\
        --compare runs/compare-cpu-equal-ranks runs/compare-cpu-weak --longest runs/longest

Five figures, each two panels with the paper's number annotated on the modelled side:

* ``speedup_vs_ranks``: per-iteration speedup of LSS over NVIDIA SP at EQUAL RANKS. Measured:
  each mode's best layout over nvidia-sp's best on the same P (`tables.best_layouts`, from
  equal-ranks compare runs such as ``cpu-equal-ranks``). Modelled: LSS at N = P against the
  head-capped baseline t in {6, 12} (`analysis.costmodel.paper.paper_series`);
* ``memory_vs_length``: bytes per rank vs l. Measured: every run of ``analysis.longest``
  (``rank_bytes_max``: weights, optimizer state and step 1's heap growth) per mode; modelled:
  LSS N = 144 vs the baseline;
* ``longest_vs_ranks``: the longest l within a per-rank budget. Measured: ``longest.csv``;
  modelled: the cost model's longest-l search per P;
* ``weak_scaling``: parallel efficiency vs ranks. Measured: weak-scaling compare runs (e.g.
  ``cpu-weak``); modelled: LSS N x D = 24 at 348 tokens per GPU up to 3,456 GPUs;
* ``throughput``: model FLOP/s vs ranks, from the same runs.

Measured points are filled with solid lines, modelled points hollow with dashed lines; every
title names the machine (CPU and gloo, or the modelled V100 cluster), the preset and the
assumption set. A panel without its input says which command makes it. Nothing is measured here:
the tool only draws what the runs and the model give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lss_megatron.resources import prog

from . import tables
from .inputs import read_csv_table
from .outdir import cli
from .plotting import MODE_COLOURS, context, mode_colour, pyplot, save, shade, shades

ASSUMPTIONS = ("paper-2023", "modern")
MODELLED_STYLE = {"paper-2023": "--", "modern": ":"}
FIGURES = ("speedup_vs_ranks", "memory_vs_length", "longest_vs_ranks", "weak_scaling", "throughput")


def _series(assumptions: tuple[str, ...]) -> dict[str, dict[str, pd.DataFrame]]:
    from .costmodel.paper import paper_series

    return {a: paper_series(a) for a in assumptions}


def _claims() -> dict:
    from .costmodel.paper import PAPER_CLAIMS

    return PAPER_CLAIMS


def _hollow(colour: str, style: str) -> dict:
    return dict(color=colour, marker="o", markerfacecolor="white", linestyle=style)


def _claim(ax, x, y, text: str) -> None:
    ax.plot(
        [x],
        [y],
        marker="*",
        markersize=14,
        color="gold",
        markeredgecolor="black",
        linestyle="none",
        zorder=5,
    )
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(-8, 8), ha="right", fontsize=7)


def _missing(ax, what: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"no measured input:\n{what}",
        ha="center",
        va="center",
        fontsize=8,
        transform=ax.transAxes,
        wrap=True,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(ax, xlabel: str, ylabel: str, title: str, log_x: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


DEGREE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
"""Markers of the degrees (or P) in one panel, in increasing order: the colour names the mode,
the marker its degree, so two degrees of one mode never look alike."""


def degree_markers(values) -> dict:
    """A marker per distinct value (increasing order)."""
    return {v: DEGREE_MARKERS[i % len(DEGREE_MARKERS)] for i, v in enumerate(sorted(set(values)))}


def _modelled_by_mode(ax, series: dict, key: str, x: str, y: str, scale: float = 1.0) -> None:
    """One hollow dashed (paper-2023) or dotted (modern) line per mode (or per variant, where
    the frame names them: each a shade of its mode's colour) of frame `key`; where the frame has
    degrees (memory_vs_length), one marker per degree."""
    for a, frames in series.items():
        frame = frames[key]
        name = "variant" if "variant" in frame else "mode"
        keys = [name, "degree"] if "degree" in frame and key == "memory_vs_length" else [name]
        colours = shades(frame[name])
        markers = degree_markers(frame["degree"]) if len(keys) == 2 else {}
        for k, g in frame.groupby(keys):
            mode = k[0] if isinstance(k, tuple) else k
            label = f"{a}: {mode}" + (f" (degree {k[1]})" if len(keys) == 2 else "")
            style = _hollow(colours[mode], MODELLED_STYLE[a])
            if len(keys) == 2:
                style["marker"] = markers[k[1]]
            ax.plot(g[x], g[y] * scale, label=label, **style)


# --- the measured side ---------------------------------------------------------------------------
def read_inputs(compare: list[Path], longest: Path | None) -> dict[str, pd.DataFrame]:
    """The measured tables: summary.csv of each compare folder (concatenated), longest.csv and
    searches.csv of an analysis.longest folder. Missing files are one `InputError`."""
    out: dict[str, pd.DataFrame] = {}
    frames = [tables.read_summary(p, required=("mode", "status", "world_size")) for p in compare]
    if frames:
        out["summary"] = pd.concat(frames, ignore_index=True)
    if longest is not None:
        folder = Path(longest).resolve().name  # what the titles name it by
        out["longest"] = tables.with_preset(
            read_csv_table(
                Path(longest) / "longest.csv",
                required=("mode", "world_size", "longest_seq_length"),
            ),
            folder,
        )
        out["searches"] = tables.with_preset(
            read_csv_table(
                Path(longest) / "searches.csv", required=("mode", "seq_length", "rank_bytes_max")
            ),
            folder,
        )
    return out


def _equal_ranks(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """The runs of equal-ranks presets (every mode at each layout it may take on one P): the
    only ones where each mode's best layout meets nvidia-sp's head-capped best."""
    from .presets import all_presets

    if df is None or "preset" not in df:
        return None
    equal = {n for n, p in all_presets().items() if p.ranks is not None or p.grids}
    df = df[df["preset"].astype(str).str.split(" ").str[0].isin(equal)]  # a selection too
    return df if not df.empty else None


def _weak(df: pd.DataFrame | None) -> pd.DataFrame:
    if df is None:
        return pd.DataFrame()
    ok = df[(df["status"] == "ok") & (df["efficiency_kind"] == "weak") & (df["role"] == "grid")]
    return (
        ok.groupby(["mode", "world_size"])[["parallel_efficiency", "achieved_flops_per_s"]]
        .median()
        .reset_index()
    )


# --- the five figures ----------------------------------------------------------------------------
def _layout_labels(ax, best: pd.DataFrame) -> None:
    """Each point's best layout, in its mode's colour, as one column per P beside the points,
    top to bottom in the order of the points' speedups: a fixed 8-point line pitch, so labels of
    points close together (several modes at one P) never print over each other."""
    column = "speedup_vs_nvidia_sp_best"
    last = best["world_size"].max()
    for p, g in best.groupby("world_size"):
        g = g.sort_values(column, ascending=False)
        top = float(g[column].max())
        side = -1 if p == last else 1  # the last column left of its points, inside the axes
        for i, (_, r) in enumerate(g.iterrows()):
            ax.annotate(
                str(r["best_layout"]),
                (p, top),
                fontsize=6,
                color=mode_colour(r["mode"]),
                textcoords="offset points",
                xytext=(6 * side, 2 - 8 * i),
                va="top",
                ha="left" if side > 0 else "right",
            )


def _named(frame: pd.DataFrame | None) -> str:
    """ " (preset NAME)" of a measured table (`read_inputs` names it by its folder)."""
    if frame is None or "preset" not in frame or frame.empty:
        return ""
    return " (preset " + ", ".join(sorted({str(x) for x in frame["preset"].dropna()})) + ")"


def fig_speedup(measured: dict, series: dict, claims: dict, stem: Path) -> list[Path]:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    df = _equal_ranks(measured.get("summary"))
    best = tables.best_layouts(df) if df is not None else pd.DataFrame()
    best = best[best["speedup_vs_nvidia_sp_best"].notna()] if not best.empty else best
    if best.empty:
        _missing(left, "python -m analysis.compare --preset cpu-equal-ranks")
    else:
        for (mode, setting, length), g in best.groupby(["mode", "setting", "seq_length"]):
            g = g.sort_values("world_size")
            left.plot(
                g["world_size"],
                g["speedup_vs_nvidia_sp_best"],
                marker="o",
                color=mode_colour(mode),
                label=f"{mode} ({setting}), l={length}",
            )
        _layout_labels(left, best)
        left.axhline(1.0, color="gray", linewidth=0.8)
        left.set_xticks(sorted(best["world_size"].unique()))
    _finish(
        left,
        "ranks P",
        "nvidia-sp best step time / mode's best",
        f"measured, equal ranks: {context(df) if df is not None else ''}",
    )
    for a, frames in series.items():
        s = frames["speedup_vs_ranks"]
        s = s[s["lss_seq_parallel"] == s["ranks"]]  # LSS over every rank: N = P
        for t, g in s.groupby("sp_tensor_parallel"):
            right.plot(
                g["ranks"],
                g["speedup_per_iteration"],
                label=f"{a}: LSS N=P vs SP t={t}",
                **_hollow(shade(MODE_COLOURS["lss"], 0 if t == 6 else 2), MODELLED_STYLE[a]),
            )
    c = claims["speedup"]
    _claim(right, c["ranks"], c["value"], f"paper: {c['value']}x")
    right.set_ylim(0, c["value"] * 1.2)
    right.axhline(1.0, color="gray", linewidth=0.8)
    _finish(
        right,
        "GPUs",
        "speedup per iteration (modelled)",
        "modelled: Summit V100, one sequence per step",
        log_x=True,
    )
    fig.suptitle("Per-iteration speedup of LSS over head-capped NVIDIA SP", fontsize=10)
    return save(fig, stem)


def fig_memory(measured: dict, series: dict, claims: dict, stem: Path) -> list[Path]:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    s = measured.get("searches")
    if s is None or s.empty:
        _missing(left, "python -m analysis.longest --ranks 4 --num-heads 2 --budget-mib 48 ...")
    else:
        ok = s[s["rank_bytes_max"].notna()]
        markers = degree_markers(ok["world_size"])
        for (mode, rec, p), g in ok.groupby(["mode", "recompute", "world_size"]):
            g = g.sort_values("seq_length")
            left.plot(
                g["seq_length"],
                g["rank_bytes_max"] / 2**20,
                marker=markers[p],
                color=mode_colour(mode),
                label=f"{mode} P={p} ({rec})",
                linestyle="-" if rec == "none" else "-.",
            )
    _finish(
        left,
        "sequence length l",
        "MiB per rank (rank_bytes_max)",
        f"measured: analysis.longest runs{_named(s)}, CPU (gloo), flash kernel",
    )
    _modelled_by_mode(right, series, "memory_vs_length", "seq_length", "bytes_per_rank", 2**-30)
    right.axhline(16, color="gray", linewidth=0.8)
    right.annotate("16 GB V100", (right.get_xlim()[0], 16), fontsize=7)
    c = claims["memory"]
    _finish(
        right,
        "sequence length l",
        "GiB per GPU (modelled)",
        f"modelled: Summit V100 (paper: {c['value']}x less memory at 144 GPUs)",
    )
    fig.suptitle("Memory per rank vs sequence length", fontsize=10)
    return save(fig, stem)


def fig_longest(measured: dict, series: dict, claims: dict, stem: Path) -> list[Path]:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lg = measured.get("longest")
    if lg is None or lg.empty:
        _missing(left, "python -m analysis.longest --ranks 4 --num-heads 2 --budget-mib 48 ...")
    else:
        key = "variant" if "variant" in lg else "mode"  # searches before variants: modes only
        colours = shades(lg[key])
        for label, g in lg.groupby(key):
            g = g.sort_values("world_size")
            left.plot(
                g["world_size"],
                g["longest_seq_length"],
                marker="o",
                color=colours[label],
                label=label,
            )
        left.set_xticks(sorted(lg["world_size"].unique()))
        budget = lg["budget_bytes"].iloc[0] / 2**20 if "budget_bytes" in lg else float("nan")
        left.set_ylim(bottom=0)
    title = f"measured: longest l that ran within the budget{_named(lg)}, CPU (gloo)"
    _finish(
        left,
        "ranks P",
        "longest l (tokens)",
        title + (f", {budget:,.0f} MiB per rank" if lg is not None and not lg.empty else ""),
    )
    _modelled_by_mode(right, series, "longest_vs_ranks", "ranks", "longest_seq_length")
    c = claims["longest"]
    _claim(right, c["ranks"], c["value"], f"paper: l = {c['value']:,.0f}")
    _finish(right, "GPUs", "longest l (modelled, 16 GB)", "modelled: Summit V100", log_x=True)
    fig.suptitle("Longest sequence vs ranks", fontsize=10)
    return save(fig, stem)


def _vs_ranks(
    measured: dict,
    series: dict,
    claims: dict,
    stem: Path,
    *,
    key: str,
    column: str,
    model_column: str,
    scale: float,
    ylabel: str,
    title: str,
) -> list[Path]:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    df = measured.get("summary")
    weak = _weak(df)
    if df is not None:
        df = df[df["efficiency_kind"] == "weak"]
    if weak.empty:
        _missing(left, "python -m analysis.compare --preset cpu-weak")
    else:
        for mode, g in weak.groupby("mode"):
            left.plot(
                g["world_size"],
                g[column] * scale,
                marker="o",
                color=mode_colour(mode),
                label=mode,
            )
        left.set_xticks(sorted(weak["world_size"].unique()))
    _finish(
        left, "ranks P", ylabel, f"measured, weak scaling: {context(df) if df is not None else ''}"
    )
    for a, frames in series.items():
        m = frames[key]
        right.plot(
            m["ranks"],
            m[model_column] * scale,
            label=f"{a}: LSS",
            **_hollow(MODE_COLOURS["lss"], MODELLED_STYLE[a]),
        )
    c = claims[key if key != "weak_scaling" else "efficiency"]
    _claim(right, c["ranks"], c["value"], f"paper: {c['value']:g} {c['unit']}")
    _finish(
        right,
        "GPUs",
        ylabel + " (modelled)",
        "modelled: Summit V100, 348 tokens per GPU",
        log_x=True,
    )
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def fig_weak(measured: dict, series: dict, claims: dict, stem: Path) -> list[Path]:
    return _vs_ranks(
        measured,
        series,
        claims,
        stem,
        key="weak_scaling",
        column="parallel_efficiency",
        model_column="efficiency",
        scale=100.0,
        ylabel="weak-scaling efficiency (%)",
        title="Weak-scaling efficiency",
    )


def fig_throughput(measured: dict, series: dict, claims: dict, stem: Path) -> list[Path]:
    return _vs_ranks(
        measured,
        series,
        claims,
        stem,
        key="throughput",
        column="achieved_flops_per_s",
        model_column="flops_per_s",
        scale=1e-15,
        ylabel="model PFLOP/s",
        title="Throughput (causal FLOPs)",
    )


DRAW = {
    "speedup_vs_ranks": fig_speedup,
    "memory_vs_length": fig_memory,
    "longest_vs_ranks": fig_longest,
    "weak_scaling": fig_weak,
    "throughput": fig_throughput,
}


def make_paper_figures(measured: dict, out: Path, assumptions=ASSUMPTIONS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    series, claims = _series(tuple(assumptions)), _claims()
    paths: list[Path] = []
    for name in FIGURES:
        paths += DRAW[name](measured, series, claims, out / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    return cli("analysis.paper_figures", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("python -m analysis.paper_figures"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        type=Path,
        help="analysis.compare output folders (equal-ranks and weak-scaling runs)",
    )
    p.add_argument("--longest", type=Path, help="an analysis.longest output folder")
    p.add_argument("--assumptions", nargs="+", choices=ASSUMPTIONS, default=list(ASSUMPTIONS))
    args = p.parse_args(argv)
    measured = read_inputs(args.compare, args.longest)
    if not measured:
        print(
            "analysis.paper_figures: no measured input given: the left panels say which "
            "command makes each",
            file=sys.stderr,
        )
    paths = make_paper_figures(measured, Path(args.out), args.assumptions)
    print(f"wrote {len(paths)} files in {args.out}: {', '.join(FIGURES)} (.png, .pdf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
