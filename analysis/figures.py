"""Figures of a comparison, from summary.csv alone: ``python -m analysis.figures DIR``.

Each figure is a pure ``*_data(df) -> DataFrame`` (the plotted numbers, tested against
analysis/fixtures) plus a thin ``plot_*`` wrapper; `make_figures` writes PNG and PDF of each to
``DIR/figures``. They mirror the paper's evaluation:

============================  ================================================================
``strong_scaling``            step time and speedup T_1 / T_P vs ranks P, per mode and length
``weak_efficiency``           T_1 / T_P and FLOP-rate efficiency vs P where l / N is constant
``memory``                    bytes per rank (rank 0) vs sequence length, per mode and N
``longest_sequence``          longest trainable sequence vs P under a per-rank memory budget
``throughput``                tokens/s vs P, per mode and length
============================  ================================================================

Only runs with status ``ok`` are plotted; repeats enter as their median; every variant (``lss``,
``lss-zigzag``, ``ulysses``, ...; the ``variant`` column) is its own series, called its mode
below; where several layouts give the same (mode, l, P) the fastest is shown. A table is assumed to hold one model (one preset).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from lss_megatron.modes import REFERENCE
from lss_megatron.resources import prog

from . import plotting
from .fitsearch import longest_fitting
from .plotting import context
from .tables import config_from_row, load_costmodel, read_summary, setting_label

MAX_SEQ_LENGTH = 1 << 24
"""Upper end of the longest-sequence search (tokens)."""
NUMERIC = (
    "seq_length",
    "world_size",
    "seq_parallel",
    "data_parallel",
    "step_time_s",
    "tokens_per_s",
    "model_flops_per_step",
    "activation_bytes",
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "peak_mem_bytes",
)
"""The columns every figure reads (besides run_id, status and mode)."""


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """The ok runs, with ``mode`` = the variant label (``lss-zigzag``, ...) where the table has
    one, so that every variant is its own series; the trainer's mode stays in ``trainer_mode``;
    ``setting`` = attention kernel, recompute and dtype (`tables.setting_label`): series,
    references and ratios never mix settings."""
    ok = df[df["status"] == "ok"]
    if "variant" in ok:
        ok = ok.assign(trainer_mode=ok["mode"], mode=ok["variant"].fillna(ok["mode"]))
    return ok.assign(setting=setting_label(ok))


def _label(mode: str, setting: str) -> str:
    """A series' legend label: the mode (variant) and its kernel setting."""
    return f"{mode} [{setting}]" if setting else mode


def _best_layout(
    df: pd.DataFrame, value: str, keys: list[str], lower_is_better: bool
) -> pd.DataFrame:
    """Median over repeats per layout, then the best layout per `keys`."""
    layout = [*keys, "seq_parallel", "data_parallel"]
    med = df.groupby(layout)[value].median().reset_index()
    med = med.sort_values(value, ascending=lower_is_better, kind="stable")
    return med.groupby(keys).head(1).sort_values(keys).reset_index(drop=True)


# --- data functions ------------------------------------------------------------------------------
def strong_scaling_data(df: pd.DataFrame) -> pd.DataFrame:
    """mode, setting, seq_length, world_size, seq_parallel, data_parallel, step_time_s, speedup.

    speedup = T_1 / T_P, T_1 the serial run on one rank at the same length and setting (NaN
    without it).
    """
    ok = _ok(df)
    out = _best_layout(ok, "step_time_s", ["mode", "setting", "seq_length", "world_size"], True)
    t1 = ok[(ok["mode"] == REFERENCE) & (ok["world_size"] == 1)]
    t1 = t1.groupby(["setting", "seq_length"])["step_time_s"].median().rename("t1")
    out = out.join(t1, on=["setting", "seq_length"])
    out["speedup"] = out.pop("t1") / out["step_time_s"]
    return out


def weak_efficiency_data(df: pd.DataFrame) -> pd.DataFrame:
    """mode, base_length, world_size, seq_parallel, data_parallel, seq_length, step_time_s,
    time_efficiency (T_1 / T_P), flops_efficiency (FLOP/s per rank over the reference's).

    Rows where l / N equals a base length l0 that has a serial reference (N = 1, same D, at l0);
    the references those rows use are included (efficiency 1 at P = D).
    """
    ok = _ok(df).copy()
    ok["base_length"] = ok["seq_length"] // ok["seq_parallel"]
    keys = [
        "mode",
        "setting",
        "base_length",
        "world_size",
        "seq_parallel",
        "data_parallel",
        "seq_length",
    ]
    med = ok.groupby(keys)[["step_time_s", "model_flops_per_step"]].median().reset_index()
    med["achieved_flops_per_s"] = med["model_flops_per_step"] / med["step_time_s"]
    ref = med[(med["mode"] == REFERENCE) & (med["seq_parallel"] == 1)]
    ref = ref[
        ["setting", "data_parallel", "seq_length", "step_time_s", "achieved_flops_per_s"]
    ].rename(
        columns={"seq_length": "base_length", "step_time_s": "t1", "achieved_flops_per_s": "f1"}
    )
    on = ["setting", "data_parallel", "base_length"]
    out = med.merge(ref, on=on, how="inner")
    scaled = out[out["seq_parallel"] > 1][on].drop_duplicates()
    refs = out[(out["mode"] == REFERENCE) & (out["world_size"] == out["data_parallel"])]
    out = pd.concat([out[out["seq_parallel"] > 1], refs.merge(scaled, on=on)])
    out["time_efficiency"] = out["t1"] / out["step_time_s"]
    out["flops_efficiency"] = (out["achieved_flops_per_s"] / out["world_size"]) / (
        out["f1"] / out["data_parallel"]
    )
    cols = [*keys, "step_time_s", "time_efficiency", "flops_efficiency"]
    return out[cols].sort_values(["mode", "base_length", "world_size"]).reset_index(drop=True)


def memory_data(df: pd.DataFrame) -> pd.DataFrame:
    """mode, setting, seq_parallel, data_parallel, world_size, seq_length, activation_bytes,
    state_bytes (parameters + gradients + optimizer state), peak_mem_bytes: rank 0, per rank;
    and the cost model's predicted_activation_bytes where the table has it."""
    ok = _ok(df).copy()
    ok["state_bytes"] = ok["param_bytes"] + ok["grad_bytes"] + ok["optimizer_state_bytes"]
    keys = ["mode", "setting", "seq_parallel", "data_parallel", "world_size", "seq_length"]
    values = ["activation_bytes", "state_bytes", "peak_mem_bytes"]
    values += [c for c in ("predicted_activation_bytes",) if c in ok]
    return ok.groupby(keys)[values].median().reset_index().sort_values(keys, ignore_index=True)


def fit_memory(lengths, activation, state) -> tuple[Callable[[float], float], str]:
    """Per-rank bytes as a function of l, fitted to measurements at two or more lengths.

    activation(l) = a l + c l^2 (least squares through the origin: every saved tensor is per
    token or per token pair; c = 0 if the fit makes it negative), state(l) = s0 + s1 l (a learned
    position table grows with l). Returns (bytes(l), a description of the fit).
    """
    x = np.asarray(lengths, dtype=float)
    y = np.asarray(activation, dtype=float)
    a, c = np.linalg.lstsq(np.stack([x, x * x], axis=1), y, rcond=None)[0]
    if c < 0:
        a, c = float(np.dot(x, y) / np.dot(x, x)), 0.0
    s1, s0 = np.polyfit(x, np.asarray(state, dtype=float), 1)
    return (lambda length: a * length + c * length * length + s0 + s1 * length), "measured fit"


def longest_sequence_data(
    df: pd.DataFrame, budget_bytes: float | None = None, source: str = "auto"
) -> pd.DataFrame:
    """mode, seq_parallel, data_parallel, world_size, max_seq_length, source, budget_bytes.

    The longest l (a multiple of N) whose per-rank bytes (activations of one micro-batch +
    parameters + gradients + optimizer state) fit `budget_bytes` (default: the table's
    ``memory_budget_bytes``). ``source`` ``measured``: `fit_memory` over the measured lengths of
    each (mode, N, D) (needs two lengths); ``costmodel``: `analysis.costmodel.predict` at every
    candidate l; ``auto``: the cost model when it exists, else measured.
    """
    if budget_bytes is None:
        budget_bytes = float(df["memory_budget_bytes"].dropna().iloc[0])
    predict, _ = load_costmodel() if source in ("auto", "costmodel") else (None, "")
    if source == "costmodel" and predict is None:
        raise RuntimeError("source='costmodel' but analysis.costmodel is not available")
    mem, ok = memory_data(df), _ok(df)
    rows = []
    for (mode, setting, n, d, p), group in mem.groupby(
        ["mode", "setting", "seq_parallel", "data_parallel", "world_size"]
    ):
        if predict is not None:
            same = (
                (ok["mode"] == mode)
                & (ok["setting"] == setting)
                & (ok["seq_parallel"] == n)
                & (ok["data_parallel"] == d)
            )
            first = ok[same].iloc[0].copy()
            first["mode"] = first.get("trainer_mode", mode)  # the trainer's mode, not the label
            state = float(group["state_bytes"].iloc[0])

            def total(length: int, row=first, state=state) -> float:
                pred = predict(config_from_row(row, length))
                if "memory_bytes" in pred:
                    return float(pred["memory_bytes"])
                return float(pred["activation_bytes"]) + state

            how = "costmodel"
        elif group["seq_length"].nunique() >= 2:
            total, how = fit_memory(
                group["seq_length"], group["activation_bytes"], group["state_bytes"]
            )
        else:
            continue
        cap = budget_bytes * (1 + 1e-9)  # a fit reproduces exact byte counts only up to rounding
        longest = longest_fitting(int(n), total, cap, MAX_SEQ_LENGTH)
        rows.append(
            {
                "mode": mode,
                "setting": setting,
                "seq_parallel": n,
                "data_parallel": d,
                "world_size": p,
                "max_seq_length": longest,
                "source": how,
                "budget_bytes": budget_bytes,
            }
        )
    cols = [
        "mode",
        "setting",
        "seq_parallel",
        "data_parallel",
        "world_size",
        "max_seq_length",
        "source",
        "budget_bytes",
    ]
    return pd.DataFrame(rows, columns=cols)


def overview_data(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run configuration (variant, setting, N, D, l; repeats folded): group (the
    layout, and l when the table has several), label (the variant), mode (the trainer's: the
    colour), option (the variant's option beyond its mode, ``zigzag``, ``zero1``, ...), setting,
    style (option and setting: the hatch; empty for the plain configuration), step_time_s (median
    over repeats), step_time_s_min / step_time_s_max (the repeats' spread: summary.csv's columns
    where it has them), repeats, activation_bytes, sp_comm_bytes (rank 0's, per micro-batch /
    per step). Sorted by group (l, P, N), then mode, style and label."""
    ok = _ok(df)
    cols = [
        "group",
        "label",
        "mode",
        "option",
        "setting",
        "style",
        "seq_parallel",
        "data_parallel",
        "world_size",
        "seq_length",
        "step_time_s",
        "step_time_s_min",
        "step_time_s_max",
        "repeats",
        "activation_bytes",
        "sp_comm_bytes",
    ]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = ok.assign(
        label=ok["mode"],
        mode=ok.get("trainer_mode", ok["mode"]),
        lo=ok.get("step_time_s_min", ok["step_time_s"]),
        hi=ok.get("step_time_s_max", ok["step_time_s"]),
        n_rep=ok["repeats"] if "repeats" in ok else 1,
    )
    keys = ["label", "mode", "setting", "seq_parallel", "data_parallel", "world_size", "seq_length"]
    g = ok.groupby(keys, dropna=False)
    out = g[["step_time_s", "activation_bytes", "sp_comm_bytes"]].median()
    out["step_time_s_min"] = g["lo"].min()
    out["step_time_s_max"] = g["hi"].max()
    out["repeats"] = g["n_rep"].sum()
    out = out.reset_index()
    out["option"] = [
        label.removeprefix(f"{mode}-") if label != mode else ""
        for label, mode in zip(out["label"], out["mode"], strict=True)
    ]
    out["style"] = [
        ", ".join(x for x in (option, "" if setting == "flash" else setting) if x)
        for option, setting in zip(out["option"], out["setting"], strict=True)
    ]
    several = out["seq_length"].nunique() > 1
    out["group"] = [
        f"N{n} x D{d}" + (f"\nl={length}" if several else "")
        for n, d, length in zip(
            out["seq_parallel"], out["data_parallel"], out["seq_length"], strict=True
        )
    ]
    mode_rank = {m: i for i, m in enumerate(plotting.MODE_COLOURS)}
    out["_mode"] = out["mode"].map(lambda m: mode_rank.get(m, len(mode_rank)))
    out = out.sort_values(
        ["seq_length", "world_size", "seq_parallel", "_mode", "style", "label"], kind="stable"
    )
    return out[cols].reset_index(drop=True)


def throughput_data(df: pd.DataFrame) -> pd.DataFrame:
    """mode, setting, seq_length, world_size, seq_parallel, data_parallel, tokens_per_s,
    tokens_per_s_per_rank, achieved_flops_per_s (best layout per mode, setting, l, P)."""
    ok = _ok(df)
    out = _best_layout(ok, "tokens_per_s", ["mode", "setting", "seq_length", "world_size"], False)
    keys = ["mode", "setting", "seq_length", "seq_parallel", "data_parallel"]
    flops = ok.groupby(keys)["achieved_flops_per_s"].median()
    out = out.join(flops, on=keys)
    out["tokens_per_s_per_rank"] = out["tokens_per_s"] / out["world_size"]
    return out


# --- plotting ------------------------------------------------------------------------------------
# Conventions (every figure): one colour per mode (variant), one marker per sequence length (or
# per N where the length is the x axis); filled markers and solid lines are measured, hollow
# markers and dashed lines modelled (cost model, or a fit extrapolated from measurements); an
# axis is logarithmic only where its values span more than `LOG_SPAN`; times in ms, bytes in
# KiB/MiB/GiB; the title names the preset and the machine (`context`).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
"""Markers of the sequence lengths (or N), in increasing order."""


class Palette:
    """Colour per mode and marker per value (sequence length, or N), fixed for one figure."""

    def __init__(self, modes, values):
        self.colours = plotting.shades(modes)  # the mode's colour; its variants in its tones
        self.values = sorted(set(values))
        self.markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(self.values)}

    def style(self, mode, value, modelled: bool = False) -> dict:
        """Line keywords; the label ``mode|value|measured`` (or ``modelled``) names the series
        (the legend is `legend`'s, built from the palette)."""
        colour = self.colours[mode]
        kw = dict(
            color=colour,
            marker=self.markers[value],
            markersize=6,
            linestyle="--" if modelled else "-",
            label=f"{mode}|{value}|{'modelled' if modelled else 'measured'}",
        )
        if modelled:  # a larger ring under the measured point: agreement shows as a dot in it
            kw.update(markerfacecolor="white", markeredgecolor=colour, markersize=10, zorder=1.5)
        else:
            kw["zorder"] = 2.5
        return kw

    def legend(
        self, ax, value_name: str, modelled_note: str | None = None, measured: bool = True
    ) -> None:
        """Two legends in one box outside the axes: colours = modes, markers = values; then
        what a measured (filled, solid) and a modelled (hollow, dashed) point look like."""
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, linewidth=3, label=m) for m, c in self.colours.items()]
        handles += [
            Line2D(
                [],
                [],
                color="black",
                marker=self.markers[v],
                linestyle="none",
                label=f"{value_name}={v}",
            )
            for v in self.values
        ]
        if measured:
            handles.append(Line2D([], [], color="black", marker="o", label="measured"))
        if modelled_note:
            handles.append(
                Line2D(
                    [],
                    [],
                    color="black",
                    marker="o",
                    linestyle="--",
                    markerfacecolor="white",
                    label=modelled_note,
                )
            )
        ax.legend(
            handles=handles,
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
        )


def on_gpu(df: pd.DataFrame) -> bool:
    """Whether every ok run recorded a CUDA machine (``machine`` column from config.json)."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    machines = ok["machine"].dropna().astype(str) if "machine" in ok else pd.Series(dtype=str)
    return bool(len(machines)) and all("nccl" in m or "CUDA" in m for m in machines)


def _labelled(data: pd.DataFrame) -> pd.DataFrame:
    """`data` with ``mode`` = its series label (`_label`: the mode and its kernel setting) when
    it holds several settings, so that every setting is its own series (its own colour) and no
    line joins two settings; one setting keeps the plain mode names (and their colours)."""
    if data.empty or "setting" not in data or data["setting"].nunique() < 2:
        return data
    return data.assign(
        mode=[_label(m, s) for m, s in zip(data["mode"], data["setting"], strict=True)]
    )


def plot_strong_scaling(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    data = _labelled(data)
    plt = plotting.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if data.empty:
        plotting.empty(left, "no runs")
    else:
        pal = Palette(data["mode"], data["seq_length"])
        for (mode, length), g in data.groupby(["mode", "seq_length"]):
            left.plot(g["world_size"], g["step_time_s"] * 1e3, **pal.style(mode, length))
            right.plot(g["world_size"], g["speedup"], **pal.style(mode, length))
        ranks = sorted(data["world_size"].unique())
        right.plot(ranks, ranks, "k:", linewidth=1)
        right.annotate("ideal (P)", (ranks[-1], ranks[-1]), fontsize=7, ha="right", va="bottom")
        for ax, ylabel, values in (
            (left, "step time [ms] (median after warm-up)", data["step_time_s"] * 1e3),
            (right, "speedup T_1 / T_P", data["speedup"]),
        ):
            ax.set_xlabel("ranks P")
            ax.set_ylabel(ylabel)
            plotting.scale(ax, "x", data["world_size"], base=2)
            plotting.scale(ax, "y", values)
            ax.grid(alpha=0.3)
        pal.legend(right, "l")
    plotting.title(fig, "Strong scaling (T_1: serial on one rank at the same l)", ctx)
    return plotting.save(fig, stem)


def plot_weak_efficiency(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    data = _labelled(data)
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    if data.empty:
        plotting.empty(
            axes[0], "no weak-scaling pairs (l / N = a base length with a serial reference)"
        )
    else:
        pal = Palette(data["mode"], data["base_length"])
        for (mode, base), g in data.groupby(["mode", "base_length"]):
            kw = pal.style(mode, base)
            if mode.split(" [")[0] == REFERENCE:  # the label: mode [setting]
                kw["linestyle"] = "none"  # the reference point(s), efficiency 1
            axes[0].plot(g["world_size"], g["time_efficiency"], **kw)
            axes[1].plot(g["world_size"], g["flops_efficiency"], **kw)
        for ax, what in zip(
            axes, ("time: T_1 / T_P", "FLOP rate per rank / reference's"), strict=True
        ):
            ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
            plotting.scale(ax, "x", data["world_size"], base=2)
            ax.set_xlabel("ranks P")
            ax.set_title(what, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("parallel efficiency")
        pal.legend(axes[1], "l/N")
    plotting.title(fig, "Weak scaling (l proportional to N; reference: serial at l/N)", ctx)
    return plotting.save(fig, stem)


def _memory_panel(ax, data: pd.DataFrame, pal: Palette, column: str, div: float) -> None:
    for (mode, n), g in data.groupby(["mode", "seq_parallel"]):
        for _, gd in g.groupby("data_parallel"):
            gd = gd.sort_values("seq_length")
            ax.plot(gd["seq_length"], gd[column] / div, **pal.style(mode, n))
            pred = f"predicted_{column}"
            if pred in gd and gd[pred].notna().any():
                ax.plot(gd["seq_length"], gd[pred] / div, **pal.style(mode, n, modelled=True))


def plot_memory(data: pd.DataFrame, stem: Path, ctx: str = "", gpu: bool = False) -> list[Path]:
    """Activations and activations + state per rank; peak memory only on GPU (on CPU it is the
    process RSS, mostly the imported libraries, and says nothing about the method)."""
    data = _labelled(data)
    plt = plotting.pyplot()
    panels = 3 if gpu else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    if data.empty:
        plotting.empty(axes[0], "no runs")
        plotting.title(fig, "Memory per rank", ctx)
        return plotting.save(fig, stem)
    data = data.assign(total_bytes=data["activation_bytes"] + data["state_bytes"])
    pal = Palette(data["mode"], data["seq_parallel"])
    columns = [
        ("activation_bytes", "activation bytes saved for backward"),
        ("total_bytes", "activations + parameters, gradients, optimizer state"),
    ]
    if gpu:
        columns.append(("peak_mem_bytes", "peak allocated GPU memory"))
    for ax, (column, label) in zip(axes, columns, strict=True):
        div, unit = plotting.bytes_unit(data[column])
        _memory_panel(ax, data, pal, column, div)
        ax.set_xlabel("sequence length l")
        ax.set_ylabel(f"{label} [{unit}]", fontsize=8)
        plotting.scale(ax, "x", data["seq_length"], base=2)
        plotting.scale(ax, "y", data[column])
        ax.grid(alpha=0.3)
    modelled = data.get("predicted_activation_bytes")
    pal.legend(
        axes[-1], "N", "cost model" if modelled is not None and modelled.notna().any() else None
    )
    note = "" if gpu else "; CPU: peak RSS (mostly imports) not drawn"
    plotting.title(fig, f"Memory per rank (rank 0; activations of one micro-batch{note})", ctx)
    return plotting.save(fig, stem)


def plot_longest_sequence(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    """Every point here is modelled (cost model, or a fit to measured lengths): hollow, dashed."""
    data = _labelled(data)
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if data.empty:
        plotting.empty(ax, "needs two sequence lengths per layout (or analysis.costmodel)")
        plotting.title(fig, "Longest trainable sequence", ctx)
        return plotting.save(fig, stem)
    pal = Palette(data["mode"], data["seq_parallel"])
    for (mode, n), g in data.groupby(["mode", "seq_parallel"]):
        g = g.sort_values("world_size")
        ax.plot(g["world_size"], g["max_seq_length"], **pal.style(mode, n, modelled=True))
    plotting.scale(ax, "x", data["world_size"], base=2)
    plotting.scale(ax, "y", data["max_seq_length"], base=2)
    ax.set_xlabel("ranks P")
    ax.set_ylabel("longest trainable sequence l")
    ax.grid(alpha=0.3)
    source = ", ".join(sorted(set(data["source"])))
    pal.legend(ax, "N", f"modelled ({source})", measured=False)
    budget = data["budget_bytes"].iloc[0] / 2**30
    plotting.title(
        fig, f"Longest sequence under {budget:.3g} GiB per rank (modelled: {source})", ctx
    )
    return plotting.save(fig, stem)


def plot_throughput(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    data = _labelled(data)
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if data.empty:
        plotting.empty(ax, "no runs")
    else:
        pal = Palette(data["mode"], data["seq_length"])
        for (mode, length), g in data.groupby(["mode", "seq_length"]):
            ax.plot(g["world_size"], g["tokens_per_s"], **pal.style(mode, length))
        plotting.scale(ax, "x", data["world_size"], base=2)
        plotting.scale(ax, "y", data["tokens_per_s"])
        ax.set_xlabel("ranks P")
        ax.set_ylabel("tokens / s (global batch)")
        ax.grid(alpha=0.3)
        pal.legend(ax, "l")
    plotting.title(fig, "Throughput", ctx)
    return plotting.save(fig, stem)


def _bar_positions(groups: list[str], gap: float = 0.8) -> tuple[np.ndarray, dict]:
    """x of each bar (a gap between layout groups) and each group's (first, last) x."""
    xs, spans, x = [], {}, 0.0
    for i, group in enumerate(groups):
        if i and group != groups[i - 1]:
            x += gap
        xs.append(x)
        first, _ = spans.get(group, (x, x))
        spans[group] = (first, x)
        x += 1.0
    return np.asarray(xs), spans


def plot_overview(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    """Three panels, one bar per run configuration, grouped by layout: step time (the repeats'
    min-max as error bars), bytes saved for backward per rank, sequence-parallel bytes per step.
    Colour = mode (`plotting.MODE_COLOURS`), hatch = option / kernel / recompute / dtype."""
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    plt = plotting.pyplot()
    what = "Overview: every run configuration (colour = mode, hatch = option / kernel / recompute)"
    if data.empty:
        fig, ax = plt.subplots(figsize=(8, 3))
        plotting.empty(ax, "no runs")
        plotting.title(fig, what, ctx)
        return plotting.save(fig, stem)
    x, spans = _bar_positions(list(data["group"]))
    styles = list(dict.fromkeys(sorted(data["style"], key=lambda s: (s != "", s))))
    hatch = {s: plotting.HATCHES[i % len(plotting.HATCHES)] for i, s in enumerate(styles)}
    colours = [plotting.mode_colour(m) for m in data["mode"]]
    hatches = [hatch[s] for s in data["style"]]
    width = max(8.0, 0.42 * len(data) + 0.5 * len(spans) + 3.5)
    fig, axes = plt.subplots(3, 1, figsize=(width, 9.5), sharex=True)
    k = data["repeats"].astype(float)
    med = data["step_time_s"] * 1e3
    err = np.vstack(
        [
            (med - data["step_time_s_min"] * 1e3).clip(lower=0),
            (data["step_time_s_max"] * 1e3 - med).clip(lower=0),
        ]
    )
    err[:, (k < 2).to_numpy()] = 0.0
    kmin, kmax = int(k.min()), int(k.max())
    reps = f"{kmin}" if kmin == kmax else f"{kmin}-{kmax}"
    panels = [
        (med, None, f"step time [ms]\n(median; bars: min-max of {reps} repeats)"),
        (data["activation_bytes"], "bytes", "bytes saved for backward\nper rank (rank 0)"),
        (data["sp_comm_bytes"], "bytes", "sequence-parallel bytes\nper step (rank 0)"),
    ]
    for ax, (values, kind, label) in zip(axes, panels, strict=True):
        values = values.astype(float)
        div, unit = plotting.bytes_unit(values) if kind == "bytes" else (1.0, "")
        heights = values / div
        ax.bar(
            x,
            heights,
            width=0.8,
            color=colours,
            hatch=hatches,
            edgecolor="black",
            linewidth=0.5,
            yerr=err if kind is None and err.any() else None,
            capsize=3,
            error_kw={"elinewidth": 1.0, "ecolor": "black"},
        )
        for xi, h in zip(x, heights, strict=True):
            if h == 0:  # a zero bar is invisible: say it
                ax.text(xi, 0, "0", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(label + (f" [{unit}]" if unit else ""), fontsize=8)
        plotting.scale(ax, "y", heights)
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        for first, _ in list(spans.values())[1:]:
            ax.axvline(first - 0.9, color="gray", linewidth=0.8, linestyle=":")
    top = axes[0]
    trans = blended_transform_factory(top.transData, top.transAxes)
    for group, (first, last) in spans.items():
        top.text(
            (first + last) / 2, 1.02, group, transform=trans, ha="center", va="bottom", fontsize=8
        )
    bottom = axes[-1]
    bottom.set_xticks(x)
    bottom.set_xticklabels(
        [
            f"{label} [{setting}]" if setting != "flash" else label
            for label, setting in zip(data["label"], data["setting"], strict=True)
        ],
        rotation=60,
        ha="right",
        fontsize=8,
    )
    handles = [
        Patch(facecolor=plotting.mode_colour(m), edgecolor="black", label=m)
        for m in dict.fromkeys(data["mode"])
    ]
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch=hatch[s], label=s or "plain (flash)")
        for s in styles
    ]
    top.legend(
        handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0
    )
    plotting.title(fig, what, ctx)
    return plotting.save(fig, stem)


FIGURES: dict[str, tuple[Callable[..., pd.DataFrame], Callable[..., list[Path]]]] = {
    "strong_scaling": (strong_scaling_data, plot_strong_scaling),
    "weak_efficiency": (weak_efficiency_data, plot_weak_efficiency),
    "memory": (memory_data, plot_memory),
    "longest_sequence": (longest_sequence_data, plot_longest_sequence),
    "throughput": (throughput_data, plot_throughput),
    "overview": (overview_data, plot_overview),
}
PER_LENGTH = ("memory",)
"""Figures whose x axis is the sequence length: drawn only for tables with several lengths (the
overview shows one length's bytes)."""


def make_figures(
    df: pd.DataFrame, out: Path | str, budget_bytes: float | None = None, source: str = "auto"
) -> list[Path]:
    """Write every figure (PNG and PDF) into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    ctx = context(df)
    ok = df[df["status"] == "ok"] if "status" in df else df
    one_length = ok["seq_length"].nunique() == 1
    for name, (data_fn, plot_fn) in FIGURES.items():
        if name in PER_LENGTH and one_length:
            continue
        if name == "longest_sequence":
            data = data_fn(df, budget_bytes, source)
        else:
            data = data_fn(df)
        if data.empty:  # drawn only when its data exists (e.g. no weak pairs in a strong preset)
            continue
        extra = {"gpu": on_gpu(df)} if name == "memory" else {}
        paths += plot_fn(data, out / name, ctx, **extra)
    return paths


def main(argv: list[str] | None = None) -> int:
    from .outdir import cli

    return cli("analysis.figures", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("python -m analysis.figures"), description=__doc__.split("\n")[0]
    )
    p.add_argument("dir", help="a compare output folder (or its summary.csv)")
    p.add_argument("--out", default=None, help="figure folder (default DIR/figures)")
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="per-rank memory budget of the longest-sequence figure "
        "(default: the table's memory_budget_bytes)",
    )
    p.add_argument(
        "--source",
        choices=("auto", "measured", "costmodel"),
        default="auto",
        help="longest-sequence memory model (auto: cost model if present)",
    )
    args = p.parse_args(argv)
    if args.budget_gib is not None and not 0 < args.budget_gib < 2**20:  # NaN and inf fail too
        from .inputs import InputError

        raise InputError(f"--budget-gib must be a positive, finite number, got {args.budget_gib}")
    df = read_summary(args.dir, ("mode", *NUMERIC), NUMERIC)
    if not (df["status"] == "ok").any():
        from .inputs import InputError

        raise InputError(f"{args.dir}: no run with status ok in the table, nothing to plot")
    base = Path(args.dir)
    out = Path(args.out) if args.out else (base if base.is_dir() else base.parent) / "figures"
    budget = args.budget_gib * 2**30 if args.budget_gib is not None else None
    _, note = load_costmodel()
    if note:
        print(f"note: {note}; longest-sequence figure from measured fits", file=sys.stderr)
    paths = make_figures(df, out, budget, args.source)
    print(f"{len(paths)} files in {out}: " + ", ".join(sorted({x.stem for x in paths})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
