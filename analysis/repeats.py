"""Repeats: one summary row per configuration, the spread of its step time, and bootstrap
intervals on every time ratio (docs/measurement.md, "Repeats and intervals").

`analysis.compare --repeats K` runs every configuration K times, interleaved (each round runs
every configuration once, in an order shuffled by a recorded seed; `analysis.presets.make_plan`).
The per-launch table (``runs.csv``, `tables.finish`) has one row per launch; `aggregate` folds the
repeats of each configuration into one row of ``summary.csv``:

* ``step_time_s`` is the median over the ok repeats of each launch's step time (itself the median
  over the measured steps of the slowest rank's time per step), with ``step_time_s_min`` /
  ``step_time_s_max`` its spread and ``repeats`` the number of ok repeats (``repeats_failed``
  the others);
* every other measured number is its median over the ok repeats. Bytes and call counts are exact
  and identical in every repeat (``bytes_vary`` flags a configuration where they are not);
* ratios and efficiencies are recomputed from those medians (`tables.add_derived`);
* every time ratio (`TIME_RATIOS`) gets ``_lo`` / ``_hi``: a percentile bootstrap over the repeats
  at level ``interval_level`` (`LEVEL`), see `add_intervals`;
* ``load_1m_min`` / ``load_1m_max``: the machine's 1-minute load average, lowest and highest of
  the values read before and after each of its launches.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import tables

LEVEL = 0.95
"""Level of the ratio intervals."""
RESAMPLES = 2000
"""Bootstrap resamples per configuration."""
TIME_RATIOS = {
    "speedup_vs_nvidia_sp": "nvidia-sp",
    "speedup_vs_lss": "lss",
    "parallel_efficiency": "serial",
    "flops_efficiency": "serial",
    "step_time_vs_unpacked": "unpacked",
}
"""The derived columns that are ratios of step times, and whose median is the reference."""
INVERSE = frozenset({"step_time_vs_unpacked"})
"""Time ratios of this configuration's step time over its reference's (the others are the
reference's over this one's)."""
BYTE_COLUMNS = (
    "sp_comm_bytes",
    "grad_comm_bytes",
    "other_comm_bytes",
    "sp_comm_calls",
    "grad_comm_calls",
    "activation_bytes",
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
)
"""Counted exactly: the same in every repeat of a configuration (no interval, no repeats needed)."""
RUN_ONLY = ("repeat", "order", "load_1m_before", "load_1m_after")
"""Columns of runs.csv that a configuration's summary row folds away."""


SPEEDUPS = ("speedup_vs_nvidia_sp", "speedup_vs_lss")
"""The time ratios between two modes, listed as clear / no clear difference after the table."""


def _interval_columns() -> tuple[str, ...]:
    out: list[str] = []
    for column in tables.DERIVED:
        out.append(column)
        if column in TIME_RATIOS:
            out += [f"{column}_lo", f"{column}_hi"]
    return (*out, "interval_level")


SUMMARY_COLUMNS = (
    *(c for c in tables.IDENTITY if c != "repeat"),
    "repeats",
    "repeats_failed",
    *(
        x
        for c in tables.MEASURED
        for x in ((c, "step_time_s_min", "step_time_s_max") if c == "step_time_s" else (c,))
    ),
    *_interval_columns(),
    *tables.PREDICTED,
    "bytes_vary",
    "load_1m_min",
    "load_1m_max",
    "order_seed",
    *tables.TAIL,
)
"""Every column of summary.csv (one row per configuration), in order."""


def _fold(group: pd.DataFrame) -> dict:
    """One configuration's summary row from its launches (`group`, rows of runs.csv)."""
    ok = group[group["status"] == "ok"]
    first = (ok if len(ok) else group).iloc[0]
    row = first.to_dict()
    for column in RUN_ONLY:
        row.pop(column, None)
    row["run_id"] = first["config_id"]
    row["repeats"] = len(ok)
    row["repeats_failed"] = len(group) - len(ok)
    if len(ok) < len(group):
        errors = [str(e) for e in group.loc[group["status"] != "ok", "error"] if str(e) != "nan"]
        row["error"] = " | ".join(dict.fromkeys(e for e in errors if e))
    if len(ok):
        for column in (*tables.MEASURED, *tables.PREDICTED):
            if column in ok and pd.api.types.is_numeric_dtype(ok[column]):
                row[column] = ok[column].median()
        times = ok["step_time_s"].astype(float)
        row["step_time_s_min"], row["step_time_s_max"] = times.min(), times.max()
        present = [c for c in BYTE_COLUMNS if c in ok]
        row["bytes_vary"] = bool((ok[present].nunique(dropna=True) > 1).any())
    loads = [
        x
        for c in ("load_1m_before", "load_1m_after")
        if c in group
        for x in group[c].astype(float)
        if math.isfinite(x)
    ]
    row["load_1m_min"] = min(loads) if loads else math.nan
    row["load_1m_max"] = max(loads) if loads else math.nan
    return row


def aggregate(
    runs: pd.DataFrame,
    scaling: str,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
    order: tuple[str, ...] = (),
) -> pd.DataFrame:
    """summary.csv from the per-launch table `runs` (`tables.finish`'s output): one row per
    configuration, listed in `order` (configuration ids; others after them, in the order of first
    appearance), derived columns from the medians, and the bootstrap intervals of
    `add_intervals`."""
    runs = runs.assign(config_id=tables.config_ids(runs))
    rank = {c: i for i, c in enumerate(order)}
    groups = sorted(
        (g for _, g in runs.groupby("config_id", sort=False)),
        key=lambda g: rank.get(g["config_id"].iloc[0], len(rank)),
    )
    rows = [_fold(g) for g in groups]
    df = pd.DataFrame(rows)
    for column in SUMMARY_COLUMNS:
        if column not in df:
            df[column] = math.nan
    df = tables.add_derived(df, scaling)
    df = add_intervals(df, runs, scaling, level, resamples, seed)
    extra = [c for c in df.columns if c not in SUMMARY_COLUMNS and c != "config_id"]
    return df[list(SUMMARY_COLUMNS) + extra].reset_index(drop=True)


def reference_rows(df: pd.DataFrame, scaling: str) -> dict[str, pd.Series]:
    """For each of `TIME_RATIOS`, the position in `df` (one row per configuration) of the row
    whose step time is that ratio's reference; NaN where there is none."""
    pos = df.assign(_row=np.arange(len(df), dtype=float))
    nvidia = tables._nvidia_reference(pos, ["_row"])["_row"]
    lss = tables._lss_reference(pos, ["_row"])["_row"]
    serial = tables._efficiency_reference(pos, scaling, ["_row"])["_row"]
    unpacked = tables._unpacked_reference(pos, ["_row"])["_row"]
    by = {"nvidia-sp": nvidia, "lss": lss, "serial": serial, "unpacked": unpacked}
    return {column: by[ref] for column, ref in TIME_RATIOS.items()}


def resample_factors(
    times: list[np.ndarray], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """[configurations, resamples]: each configuration's bootstrap median over its repeats
    (drawn with replacement) divided by its median; NaN for fewer than two repeats."""
    out = np.full((len(times), resamples), np.nan)
    for i, t in enumerate(times):
        if len(t) < 2:
            continue
        draws = t[rng.integers(0, len(t), size=(resamples, len(t)))]  # [resamples, k]
        out[i] = np.median(draws, axis=1) / np.median(t)
    return out


def add_intervals(
    df: pd.DataFrame,
    runs: pd.DataFrame,
    scaling: str,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """`df` (one row per configuration) with ``<ratio>_lo`` / ``<ratio>_hi`` for each of
    `TIME_RATIOS` and ``interval_level``.

    A time ratio is (reference's median step time) / (this configuration's), times a constant
    (ranks, FLOPs); for `INVERSE` columns the other way round. Percentile bootstrap: each configuration's repeats are drawn with replacement
    `resamples` times, independently of the others, and the ratio recomputed from the drawn
    medians; the interval is the central `level` of those ratios, widened where needed to hold
    the point estimate (a median of few repeats is discrete). A configuration that is its own
    reference (the serial run of an efficiency, plain LSS against itself) gets the point as
    both ends; fewer than two ok repeats on either side give no interval (NaN).
    """
    df = df.copy()
    ids = tables.config_ids(df)
    ok = runs[runs["status"] == "ok"]
    by_id = {k: g["step_time_s"].astype(float).to_numpy() for k, g in ok.groupby("config_id")}
    times = [by_id.get(k, np.array([])) for k in ids]
    factors = resample_factors(times, resamples, np.random.default_rng(seed))
    q = ((1 - level) / 2, (1 + level) / 2)
    refs = reference_rows(df, scaling)
    for column in TIME_RATIOS:
        lo = np.full(len(df), np.nan)
        hi = np.full(len(df), np.nan)
        for i, (point, j) in enumerate(zip(df[column], refs[column], strict=True)):
            if not (np.isfinite(point) and np.isfinite(j)):
                continue
            j = int(j)
            if j == i:
                lo[i] = hi[i] = point
                continue
            if np.isnan(factors[i, 0]) or np.isnan(factors[j, 0]):
                continue
            draws = (
                point * factors[i] / factors[j]
                if column in INVERSE
                else point * factors[j] / factors[i]
            )
            a, b = np.quantile(draws, q)
            lo[i], hi[i] = min(a, point), max(b, point)
        df[f"{column}_lo"], df[f"{column}_hi"] = lo, hi
    df["interval_level"] = level
    return df


def is_reference(df: pd.DataFrame, column: str) -> pd.Series:
    """Rows that are their own reference for `column` (their interval is the point: no test)."""
    refs = reference_rows(df, str(df["efficiency_kind"].dropna().iloc[0]))[column]
    return pd.Series(refs.to_numpy() == np.arange(len(df)), index=df.index)


def clear(df: pd.DataFrame, column: str) -> pd.Series:
    """Per row: True where the interval of `column` excludes 1 (a clear difference), False where
    it contains 1 (no clear difference), NaN where there is no interval or the row is its own
    reference."""
    lo, hi = df[f"{column}_lo"].astype(float), df[f"{column}_hi"].astype(float)
    out = pd.Series((lo > 1) | (hi < 1), index=df.index, dtype=object)
    out[lo.isna() | hi.isna() | is_reference(df, column)] = math.nan
    return out


def _name(row: pd.Series) -> str:
    label = (
        row["variant"] if isinstance(row.get("variant"), str) and row["variant"] else row["mode"]
    )
    setting = ", ".join(
        str(row[c])
        for c, default in (("attention_kernel", "flash"), ("recompute", "none"), ("dtype", "fp32"))
        if c in row and str(row[c]) not in (default, "nan", "")
    )
    name = f"{label} N{int(row['seq_parallel'])} D{int(row['data_parallel'])} l{int(row['seq_length'])}"
    return f"{name} [{setting}]" if setting else name


def format_intervals(df: pd.DataFrame, runs: pd.DataFrame) -> str:
    """The time ratios whose interval excludes 1 (a clear difference) and those whose interval
    contains it (no clear difference), the machine's load during the runs, and any
    configuration whose byte counts differed between repeats."""
    lines: list[str] = []
    level = df["interval_level"].dropna()
    level_text = f"{100 * float(level.iloc[0]):g}%" if len(level) else "bootstrap"
    found = {True: [], False: []}
    for column in SPEEDUPS:
        if f"{column}_lo" not in df or df[column].isna().all():
            continue
        verdict = clear(df, column)
        for i, row in df.iterrows():
            if isinstance(verdict[i], bool):
                found[verdict[i]].append(
                    f"  {_name(row)}: {column} {row[column]:.3g} "
                    f"[{row[f'{column}_lo']:.3g}, {row[f'{column}_hi']:.3g}]"
                )
    if not found[True] and not found[False]:
        lines.append(
            "time ratios: no intervals (they need two or more ok repeats of both runs: --repeats K)"
        )
    else:
        lines.append(f"clear differences ({level_text} interval excludes 1):")
        lines += found[True] or ["  (none)"]
        lines.append(f"no clear difference ({level_text} interval contains 1):")
        lines += found[False] or ["  (none)"]
    loads = [
        x
        for c in ("load_1m_before", "load_1m_after")
        if c in runs
        for x in runs[c].astype(float)
        if math.isfinite(x)
    ]
    if loads:
        lines.append(
            f"machine load (1-min load average, before and after each of {len(runs)} launches): "
            f"min {min(loads):.2f}, median {float(np.median(loads)):.2f}, max {max(loads):.2f}"
        )
    if "bytes_vary" in df and df["bytes_vary"].fillna(False).astype(bool).any():
        vary = ", ".join(df.loc[df["bytes_vary"].fillna(False).astype(bool), "run_id"])
        lines.append(f"warning: byte counts differ between repeats of {vary} (they should not)")
    return "\n".join(lines)
