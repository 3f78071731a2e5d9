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

from lss_megatron.resources import prog

from .fitsearch import longest_fitting
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
    t1 = ok[(ok["mode"] == "serial") & (ok["world_size"] == 1)]
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
    ref = med[(med["mode"] == "serial") & (med["seq_parallel"] == 1)]
    ref = ref[
        ["setting", "data_parallel", "seq_length", "step_time_s", "achieved_flops_per_s"]
    ].rename(
        columns={"seq_length": "base_length", "step_time_s": "t1", "achieved_flops_per_s": "f1"}
    )
    on = ["setting", "data_parallel", "base_length"]
    out = med.merge(ref, on=on, how="inner")
    scaled = out[out["seq_parallel"] > 1][on].drop_duplicates()
    refs = out[(out["mode"] == "serial") & (out["world_size"] == out["data_parallel"])]
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
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MODE_COLOURS = {
    "serial": "tab:gray",
    "lss": "tab:blue",
    "nvidia-sp": "tab:red",
    "ulysses": "tab:purple",
}
VARIANT_COLOURS = (
    "tab:green",
    "tab:orange",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "black",
    "gold",
)
"""Colours of the other variants (lss-zigzag, lss-kv4, ...), in label order."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
"""Markers of the sequence lengths (or N), in increasing order."""
LOG_SPAN = 30.0
"""An axis turns logarithmic when its largest value exceeds its smallest by more than this."""


class Palette:
    """Colour per mode and marker per value (sequence length, or N), fixed for one figure."""

    def __init__(self, modes, values):
        modes = sorted(set(modes))
        others = [m for m in modes if m not in MODE_COLOURS]
        self.colours = {
            m: MODE_COLOURS.get(m) or VARIANT_COLOURS[others.index(m) % len(VARIANT_COLOURS)]
            for m in modes
        }
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


def _scale(ax, axis: str, values, base: int = 10) -> None:
    """Logarithmic only when the positive values span more than `LOG_SPAN`; integer ticks on a
    rank axis."""
    from matplotlib.ticker import ScalarFormatter

    v = np.asarray([x for x in np.ravel(values) if np.isfinite(x) and x > 0], dtype=float)
    if v.size and v.max() / v.min() > LOG_SPAN:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)
    if axis == "x" and base == 2 and v.size:  # ranks: ticks at the measured P
        ax.set_xticks(sorted(set(v.astype(int))))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(_pyplot().NullLocator())


def _bytes_unit(values) -> tuple[float, str]:
    """(divisor, unit) so that the largest value reads between 1 and 1024."""
    top = np.nanmax(np.asarray(values, dtype=float)) if len(values) else 0.0
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if top >= div:
            return float(div), unit
    return 1.0, "B"


def context(df: pd.DataFrame) -> str:
    """ "preset X · machine Y" of the ok runs (from the ``preset`` and ``machine`` columns)."""
    ok = df[df["status"] == "ok"] if "status" in df else df

    def names(column: str) -> str:
        if column not in ok:
            return ""
        values = sorted({str(x) for x in ok[column].dropna() if str(x)})
        return ", ".join(values)

    preset = names("preset") or "preset not recorded"
    return f"preset {preset} · {names('machine') or 'machine not recorded'}"


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


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return paths


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def _title(fig, title: str, ctx: str) -> None:
    fig.suptitle(f"{title}\n{ctx}" if ctx else title, fontsize=10)


def plot_strong_scaling(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    data = _labelled(data)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if data.empty:
        _empty(left, "no runs")
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
            _scale(ax, "x", data["world_size"], base=2)
            _scale(ax, "y", values)
            ax.grid(alpha=0.3)
        pal.legend(right, "l")
    _title(fig, "Strong scaling (T_1: serial on one rank at the same l)", ctx)
    return _save(fig, stem)


def plot_weak_efficiency(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    data = _labelled(data)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    if data.empty:
        _empty(axes[0], "no weak-scaling pairs (l / N = a base length with a serial reference)")
    else:
        pal = Palette(data["mode"], data["base_length"])
        for (mode, base), g in data.groupby(["mode", "base_length"]):
            kw = pal.style(mode, base)
            if mode.split(" [")[0] == "serial":  # the label: mode [setting]
                kw["linestyle"] = "none"  # the reference point(s), efficiency 1
            axes[0].plot(g["world_size"], g["time_efficiency"], **kw)
            axes[1].plot(g["world_size"], g["flops_efficiency"], **kw)
        for ax, what in zip(
            axes, ("time: T_1 / T_P", "FLOP rate per rank / reference's"), strict=True
        ):
            ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
            _scale(ax, "x", data["world_size"], base=2)
            ax.set_xlabel("ranks P")
            ax.set_title(what, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("parallel efficiency")
        pal.legend(axes[1], "l/N")
    _title(fig, "Weak scaling (l proportional to N; reference: serial at l/N)", ctx)
    return _save(fig, stem)


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
    plt = _pyplot()
    panels = 3 if gpu else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    if data.empty:
        _empty(axes[0], "no runs")
        _title(fig, "Memory per rank", ctx)
        return _save(fig, stem)
    data = data.assign(total_bytes=data["activation_bytes"] + data["state_bytes"])
    pal = Palette(data["mode"], data["seq_parallel"])
    columns = [
        ("activation_bytes", "activation bytes saved for backward"),
        ("total_bytes", "activations + parameters, gradients, optimizer state"),
    ]
    if gpu:
        columns.append(("peak_mem_bytes", "peak allocated GPU memory"))
    for ax, (column, label) in zip(axes, columns, strict=True):
        div, unit = _bytes_unit(data[column])
        _memory_panel(ax, data, pal, column, div)
        ax.set_xlabel("sequence length l")
        ax.set_ylabel(f"{label} [{unit}]", fontsize=8)
        _scale(ax, "x", data["seq_length"], base=2)
        _scale(ax, "y", data[column])
        ax.grid(alpha=0.3)
    modelled = data.get("predicted_activation_bytes")
    pal.legend(
        axes[-1], "N", "cost model" if modelled is not None and modelled.notna().any() else None
    )
    note = "" if gpu else "; CPU: peak RSS (mostly imports) not drawn"
    _title(fig, f"Memory per rank (rank 0; activations of one micro-batch{note})", ctx)
    return _save(fig, stem)


def plot_longest_sequence(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    """Every point here is modelled (cost model, or a fit to measured lengths): hollow, dashed."""
    data = _labelled(data)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if data.empty:
        _empty(ax, "needs two sequence lengths per layout (or analysis.costmodel)")
        _title(fig, "Longest trainable sequence", ctx)
        return _save(fig, stem)
    pal = Palette(data["mode"], data["seq_parallel"])
    for (mode, n), g in data.groupby(["mode", "seq_parallel"]):
        g = g.sort_values("world_size")
        ax.plot(g["world_size"], g["max_seq_length"], **pal.style(mode, n, modelled=True))
    _scale(ax, "x", data["world_size"], base=2)
    _scale(ax, "y", data["max_seq_length"], base=2)
    ax.set_xlabel("ranks P")
    ax.set_ylabel("longest trainable sequence l")
    ax.grid(alpha=0.3)
    source = ", ".join(sorted(set(data["source"])))
    pal.legend(ax, "N", f"modelled ({source})", measured=False)
    budget = data["budget_bytes"].iloc[0] / 2**30
    _title(fig, f"Longest sequence under {budget:.3g} GiB per rank (modelled: {source})", ctx)
    return _save(fig, stem)


def plot_throughput(data: pd.DataFrame, stem: Path, ctx: str = "") -> list[Path]:
    data = _labelled(data)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if data.empty:
        _empty(ax, "no runs")
    else:
        pal = Palette(data["mode"], data["seq_length"])
        for (mode, length), g in data.groupby(["mode", "seq_length"]):
            ax.plot(g["world_size"], g["tokens_per_s"], **pal.style(mode, length))
        _scale(ax, "x", data["world_size"], base=2)
        _scale(ax, "y", data["tokens_per_s"])
        ax.set_xlabel("ranks P")
        ax.set_ylabel("tokens / s (global batch)")
        ax.grid(alpha=0.3)
        pal.legend(ax, "l")
    _title(fig, "Throughput", ctx)
    return _save(fig, stem)


FIGURES: dict[str, tuple[Callable[..., pd.DataFrame], Callable[..., list[Path]]]] = {
    "strong_scaling": (strong_scaling_data, plot_strong_scaling),
    "weak_efficiency": (weak_efficiency_data, plot_weak_efficiency),
    "memory": (memory_data, plot_memory),
    "longest_sequence": (longest_sequence_data, plot_longest_sequence),
    "throughput": (throughput_data, plot_throughput),
}


def make_figures(
    df: pd.DataFrame, out: Path | str, budget_bytes: float | None = None, source: str = "auto"
) -> list[Path]:
    """Write every figure (PNG and PDF) into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    ctx = context(df)
    for name, (data_fn, plot_fn) in FIGURES.items():
        if name == "longest_sequence":
            data = data_fn(df, budget_bytes, source)
        else:
            data = data_fn(df)
        extra = {"gpu": on_gpu(df)} if name == "memory" else {}
        paths += plot_fn(data, out / name, ctx, **extra)
    return paths


def main(argv: list[str] | None = None) -> int:
    from .inputs import cli

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
