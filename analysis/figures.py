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

from analysis.tables import config_from_row, load_costmodel, read_summary, setting_label

MAX_SEQ_LENGTH = 1 << 24
"""Upper end of the longest-sequence search (tokens)."""


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
    """A series' legend label: the mode (variant) and, always, its kernel setting."""
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
    keys = ["mode", "setting", "base_length", "world_size", "seq_parallel", "data_parallel",
            "seq_length"]  # fmt: skip
    med = ok.groupby(keys)[["step_time_s", "model_flops_per_step"]].median().reset_index()
    med["achieved_flops_per_s"] = med["model_flops_per_step"] / med["step_time_s"]
    ref = med[(med["mode"] == "serial") & (med["seq_parallel"] == 1)]
    ref = ref[["setting", "data_parallel", "seq_length", "step_time_s",
               "achieved_flops_per_s"]].rename(
        columns={"seq_length": "base_length", "step_time_s": "t1", "achieved_flops_per_s": "f1"}
    )  # fmt: skip
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
    state_bytes (parameters + gradients + optimizer state), peak_mem_bytes: rank 0, per rank."""
    ok = _ok(df).copy()
    ok["state_bytes"] = ok["param_bytes"] + ok["grad_bytes"] + ok["optimizer_state_bytes"]
    keys = ["mode", "setting", "seq_parallel", "data_parallel", "world_size", "seq_length"]
    values = ["activation_bytes", "state_bytes", "peak_mem_bytes"]
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


def _largest_fitting(step: int, total: Callable[[int], float], budget: float) -> int:
    """Largest multiple of `step` whose `total` stays within `budget` (0 if none does)."""
    budget *= 1 + 1e-9  # a fit reproduces exact byte counts only up to rounding
    lo, hi = 0, MAX_SEQ_LENGTH // step
    if total(step) > budget:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid * step) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


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
    for (mode, setting, n, d, p), group in mem.groupby(["mode", "setting", "seq_parallel",
                                                         "data_parallel", "world_size"]):  # fmt: skip
        if predict is not None:
            same = ((ok["mode"] == mode) & (ok["setting"] == setting) & (ok["seq_parallel"] == n)
                    & (ok["data_parallel"] == d))  # fmt: skip
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
            total, how = fit_memory(group["seq_length"], group["activation_bytes"],
                                    group["state_bytes"])  # fmt: skip
        else:
            continue
        rows.append({"mode": mode, "setting": setting, "seq_parallel": n, "data_parallel": d,
                     "world_size": p,
                     "max_seq_length": _largest_fitting(int(n), total, budget_bytes),
                     "source": how, "budget_bytes": budget_bytes})  # fmt: skip
    cols = ["mode", "setting", "seq_parallel", "data_parallel", "world_size", "max_seq_length",
            "source", "budget_bytes"]  # fmt: skip
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
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {"serial": dict(color="tab:gray", marker="s"), "lss": dict(color="tab:blue", marker="o"),
         "nvidia-sp": dict(color="tab:red", marker="^"),
         "ulysses": dict(color="tab:purple", marker="D")}  # fmt: skip
MARKERS = ("v", "P", "X", "*", "h", "<", ">", "p")
"""Markers of the other variants (lss-zigzag, lss-kv4, ...), in label order; colours cycle."""


LINESTYLES = ("-", "--", "-.", ":")


def _series(data: pd.DataFrame, by: list[str]):
    """(key, rows, style) per series of `by` = [mode, ...] and the setting: colour and marker by
    mode (variant), line style by the setting and the second key; the key's mode is the legend
    label `_label` (mode and kernel setting)."""
    if data.empty:
        return
    data = data.assign(series_label=[_label(m, s) for m, s in zip(data["mode"], data["setting"],
                                                                     strict=True)])  # fmt: skip
    by = ["series_label", *by[1:]]
    lines = sorted({(r["setting"], *(r[k] for k in by[1:2])) for _, r in data.iterrows()})
    modes = dict(zip(data["series_label"], data["mode"], strict=True))
    others = sorted(set(modes.values()) - set(STYLE))
    for key, group in data.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        mode = modes[key[0]]
        style = dict(STYLE.get(mode, {}))
        if mode in others:
            style["marker"] = MARKERS[others.index(mode) % len(MARKERS)]
        line = (group["setting"].iloc[0], *key[1:2])
        if len(lines) > 1:
            style["linestyle"] = LINESTYLES[lines.index(line) % len(LINESTYLES)]
        yield key, group, style


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return paths


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def plot_strong_scaling(data: pd.DataFrame, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if data.empty:
        _empty(left, "no runs")
    for (mode, length), g, style in _series(data, ["mode", "seq_length"]):
        kw = dict(label=f"{mode}, l={length}", **style)
        left.plot(g["world_size"], g["step_time_s"], **kw)
        right.plot(g["world_size"], g["speedup"], **kw)
    if not data.empty:
        ranks = sorted(data["world_size"].unique())
        right.plot(ranks, ranks, "k:", label="ideal (P)")
    for ax, ylabel in ((left, "step time [s] (median after warm-up)"),
                       (right, "speedup T_1 / T_P")):  # fmt: skip
        ax.set_xlabel("ranks P")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    left.set_yscale("log")
    fig.suptitle("Strong scaling (T_1: serial on one rank at the same l)")
    return _save(fig, stem)


def plot_weak_efficiency(data: pd.DataFrame, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if data.empty:
        _empty(ax, "no weak-scaling pairs (l / N = a base length with a serial reference)")
    bases = sorted(data["base_length"].unique()) if not data.empty else []
    for (mode, base), g, style in _series(data, ["mode", "base_length"]):
        style.pop("linestyle", None)
        if bases.index(base) % 2:
            style["markerfacecolor"] = "white"
        if g["mode"].iloc[0] == "serial":
            ax.plot(g["world_size"], g["time_efficiency"], linestyle="none",
                    label=f"{mode} reference, l={base}", **style)  # fmt: skip
            continue
        ax.plot(g["world_size"], g["time_efficiency"], label=f"{mode}, l/N={base}: T_1/T_P",
                **style)  # fmt: skip
        ax.plot(g["world_size"], g["flops_efficiency"], linestyle="--", alpha=0.6,
                label=f"{mode}, l/N={base}: FLOP rate", **style)  # fmt: skip
    if not data.empty:
        ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks P")
        ax.set_ylabel("parallel efficiency")
        ax.legend(fontsize=7)
    ax.set_title("Weak scaling (l proportional to N)")
    return _save(fig, stem)


def plot_memory(data: pd.DataFrame, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if data.empty:
        _empty(axes[0], "no runs")
    for (mode, n), g, style in _series(data, ["mode", "seq_parallel"]):
        for d, gd in g.groupby("data_parallel"):
            kw = dict(label=f"{mode}, N={n}, D={d}", **style)
            axes[0].plot(gd["seq_length"], gd["activation_bytes"] / 2**20, **kw)
            axes[1].plot(gd["seq_length"], (gd["activation_bytes"] + gd["state_bytes"]) / 2**20,
                         **kw)  # fmt: skip
            axes[2].plot(gd["seq_length"], gd["peak_mem_bytes"] / 2**20, **kw)
    labels = ("activation bytes saved for backward [MiB]",
              "activations + parameters, gradients, optimizer state [MiB]",
              "peak memory [MiB] (CPU: process RSS, incl. imports)")  # fmt: skip
    for ax, ylabel in zip(axes, labels, strict=True):
        if data.empty:
            continue
        ax.set_xlabel("sequence length l")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("Memory per rank (rank 0; activations of one micro-batch)")
    return _save(fig, stem)


def plot_longest_sequence(data: pd.DataFrame, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if data.empty:
        _empty(ax, "needs two sequence lengths per layout (or analysis.costmodel)")
    for (mode,), g, style in _series(data, ["mode"]):
        g = g.sort_values("world_size")
        ax.plot(g["world_size"], g["max_seq_length"], label=mode, **style)
    if not data.empty:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("ranks P")
        ax.set_ylabel("longest trainable sequence")
        ax.legend(fontsize=7)
        budget = data["budget_bytes"].iloc[0] / 2**30
        ax.set_title(f"Under {budget:.3g} GiB per rank (from {data['source'].iloc[0]})")
    return _save(fig, stem)


def plot_throughput(data: pd.DataFrame, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if data.empty:
        _empty(ax, "no runs")
    for (mode, length), g, style in _series(data, ["mode", "seq_length"]):
        ax.plot(g["world_size"], g["tokens_per_s"], label=f"{mode}, l={length}", **style)
    if not data.empty:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks P")
        ax.set_ylabel("tokens / s (global batch)")
        ax.legend(fontsize=7)
    ax.set_title("Throughput")
    return _save(fig, stem)


FIGURES: dict[
    str, tuple[Callable[..., pd.DataFrame], Callable[[pd.DataFrame, Path], list[Path]]]
] = {
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
    for name, (data_fn, plot_fn) in FIGURES.items():
        if name == "longest_sequence":
            data = data_fn(df, budget_bytes, source)
        else:
            data = data_fn(df)
        paths += plot_fn(data, out / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m analysis.figures", description=__doc__.split("\n")[0]
    )
    p.add_argument("dir", help="a compare output folder (or its summary.csv)")
    p.add_argument("--out", default=None, help="figure folder (default DIR/figures)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="per-rank memory budget of the longest-sequence figure "
                   "(default: the table's memory_budget_bytes)")  # fmt: skip
    p.add_argument("--source", choices=("auto", "measured", "costmodel"), default="auto",
                   help="longest-sequence memory model (auto: cost model if present)")  # fmt: skip
    args = p.parse_args(argv)
    df = read_summary(args.dir)
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
