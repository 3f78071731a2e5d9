"""The comparison table: one row per run, measured values plus ratios and efficiencies.

Built by `analysis.compare` and written to ``DIR/summary.csv``; `analysis.figures` reads nothing
else. Definitions (docs/measurement.md has the full text):

Every ratio and efficiency compares runs with the same attention kernel, recompute and dtype
(`SETTING_KEY`, part of `MODEL_KEY`), l and P; never across them.

* ``speedup_vs_nvidia_sp`` = nvidia-sp's step time / this run's step time, and
  ``memory_ratio_vs_nvidia_sp`` / ``activation_ratio_vs_nvidia_sp`` /
  ``sp_comm_ratio_vs_nvidia_sp`` = nvidia-sp's peak memory / activation bytes / sp bytes over
  this run's, at the same (N, D, l, model, batch). A serial row (N = 1, D = P) is compared with the
  nvidia-sp run at the same P when exactly one nvidia-sp layout has that P. Repeats enter as
  their median.
* ``speedup_vs_lss`` = plain LSS's step time / this run's, and ``activation_ratio_vs_lss`` /
  ``transient_peak_ratio_vs_lss`` / ``optimizer_state_ratio_vs_lss`` / ``grad_ratio_vs_lss`` =
  plain LSS's activation bytes / transient peak / optimizer state / gradient bytes over this
  run's, at the same (N, D, l, model, batch). Plain LSS = mode ``lss``, contiguous layout, one K/V
  gather, no ZeRO (the ``lss`` variant). Above 1: this run is faster / smaller. Serial rows have
  no LSS counterpart.
* ``parallel_efficiency``, of the kind ``efficiency_kind`` names: strong T_1 / (P T_P), T_1 the
  serial run on one rank at the same l; weak T_1 / T_P, T_1 the serial run with N = 1 and the
  same D (one rank when D = 1) at the base length l / N.
* ``flops_efficiency``: achieved model FLOP/s per rank over the reference's (same references).
* Packed documents (`presets.Preset.documents`): ``attention_flops_max`` / ``_mean`` are the
  step's attention FLOPs (forward + backward) of the most loaded rank and the mean over the
  sequence group (``attention_imbalance`` is their ratio); ``attention_flops_vs_unpacked`` and
  ``step_time_vs_unpacked`` = this packed run's mean attention FLOPs / step time over the
  unpacked run of the same variant, layout, model, setting and document mix (below 1: packing
  saves); ``kv_needed_fraction`` (LSS) the fraction of the other ranks' keys the K/V all-gather
  brings that some local query sees, and ``kv_unneeded_bytes`` = (1 - that) x ``sp_comm_bytes``:
  the bytes per rank and step of the gather (forward) and reduce-scatter (backward) that carry
  keys no query on the receiving rank sees (what a needed-only exchange would not move).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pandas as pd

from lss_megatron.modes import BASELINE, METHOD, REFERENCE

SETTING_KEY = ("attention_kernel", "recompute", "dtype", "documents", "packed")
"""The kernel, recompute and precision a run used, and its document mix and whether Megatron-LM's
document flags were on (`presets.Preset.documents`; empty / False otherwise): ratios and
efficiencies are only ever formed between runs that agree on all of them (like for like), never
across; packed against unpacked is its own pair of columns (``*_vs_unpacked``)."""
MODEL_KEY = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "position_embedding",
    "causal",
    "global_batch_size",
    "micro_batch_size",
    "optimizer",
    *SETTING_KEY,
)
"""Columns that must agree for two runs to be compared (same model, same work per step, same
attention kernel, recompute and dtype)."""
LAYOUT_KEY = ("seq_parallel", "data_parallel", "seq_length", *MODEL_KEY)

IDENTITY = (
    "run_id",
    "preset",
    "mode",
    "variant",
    "status",
    "role",
    "repeat",
    "seq_parallel",
    "data_parallel",
    "world_size",
    "lss_layout",
    "kv_gather_chunks",
    "lss_save_kv",
    "lss_kv_gather",
    "lss_overlap",
    "zero_stage",
    "seq_length",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "position_embedding",
    "causal",
    "global_batch_size",
    "micro_batch_size",
    "num_micro_batches",
    "steps",
    "optimizer",
    "dtype",
    "attention_kernel",
    "recompute",
    "documents",
    "packed",
)
MEASURED = (
    "step_time_s",
    "tokens_per_s",
    "model_flops_per_step",
    "achieved_flops_per_s",
    "sp_comm_bytes",
    "grad_comm_bytes",
    "other_comm_bytes",
    "sp_comm_calls",
    "grad_comm_calls",
    "sp_comm_time_s",
    "grad_comm_time_s",
    "sp_exposed_s",
    "activation_bytes",
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "peak_mem_bytes",
    "final_loss",
    "attention_imbalance",
    "attention_flops_max",
    "attention_flops_mean",
    "kv_needed_fraction",
    "kv_unneeded_bytes",
    "transient_peak_bytes",
    "core_attention",
    "wall_s",
)
DERIVED = (
    "speedup_vs_nvidia_sp",
    "memory_ratio_vs_nvidia_sp",
    "activation_ratio_vs_nvidia_sp",
    "sp_comm_ratio_vs_nvidia_sp",
    "speedup_vs_lss",
    "activation_ratio_vs_lss",
    "transient_peak_ratio_vs_lss",
    "optimizer_state_ratio_vs_lss",
    "grad_ratio_vs_lss",
    "parallel_efficiency",
    "flops_efficiency",
    "efficiency_kind",
    "reference_step_time_s",
    "attention_flops_vs_unpacked",
    "step_time_vs_unpacked",
)
PREDICTED = (
    "predicted_sp_comm_bytes",
    "predicted_grad_comm_bytes",
    "predicted_activation_bytes",
    "predicted_grad_bytes",
    "predicted_optimizer_state_bytes",
    "predicted_attention_imbalance",
    "predicted_kv_transient_bytes",
)
LAUNCH = ("config_id", "order", "order_seed", "load_1m_before", "load_1m_after")
"""How a launch ran: its configuration (every repeat shares it), its place in the launch order,
the seed of that order, and the machine's 1-minute load average before and after it."""
TAIL = ("memory_budget_bytes", "error", "run_dir")
COLUMNS = IDENTITY + MEASURED + DERIVED + PREDICTED + LAUNCH + TAIL
"""Every column of the per-launch table (runs.csv), in order; summary.csv folds the repeats of
each configuration into one row (`analysis.repeats`)."""

_RATIOS = {
    "speedup_vs_nvidia_sp": "step_time_s",
    "memory_ratio_vs_nvidia_sp": "memory_bytes",
    "activation_ratio_vs_nvidia_sp": "activation_bytes",
    "sp_comm_ratio_vs_nvidia_sp": "sp_comm_bytes",
}
_LSS_RATIOS = {
    "speedup_vs_lss": "step_time_s",
    "activation_ratio_vs_lss": "activation_bytes",
    "transient_peak_ratio_vs_lss": "transient_peak_bytes",
    "optimizer_state_ratio_vs_lss": "optimizer_state_bytes",
    "grad_ratio_vs_lss": "grad_bytes",
}


# --- one run -------------------------------------------------------------------------------------
def identity_row(
    config: Mapping,
    run_id: str,
    role: str,
    repeat: int,
    preset: str,
    variant: str | None = None,
    documents: str = "",
) -> dict:
    """The identity columns of a run from its effective configuration (`RunConfig.to_dict()`);
    `variant` is the preset's label (analysis.presets.VARIANTS), by default the mode;
    `documents` the document mix it reads (`presets.RunSpec.documents`)."""
    m, p, t = config["model"], config["parallel"], config["train"]
    flags = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
    return {
        "run_id": run_id,
        "preset": preset,
        "mode": p["mode"],
        "variant": variant or p["mode"],
        "role": role,
        "repeat": repeat,
        "seq_parallel": p["seq_parallel"],
        "data_parallel": p["data_parallel"],
        "world_size": p["world_size"],
        "lss_layout": p.get("lss_layout", "contiguous"),
        "kv_gather_chunks": p.get("kv_gather_chunks", 1),
        "lss_save_kv": p.get("lss_save_kv", "gathered"),
        "lss_kv_gather": p.get("lss_kv_gather", "fused"),
        "lss_overlap": bool(p.get("lss_overlap", False)),
        "zero_stage": t.get("zero_stage", 0),
        "seq_length": m["seq_length"],
        "hidden_size": m["hidden_size"],
        "num_layers": m["num_layers"],
        "num_heads": m["num_heads"],
        "num_kv_heads": m["num_kv_heads"],
        "ffn_hidden_size": m["ffn_hidden_size"],
        "vocab_size": m["vocab_size"],
        "make_vocab_size_divisible_by": m["make_vocab_size_divisible_by"],
        "position_embedding": m["position_embedding"],
        "causal": bool(m["causal"]),
        "global_batch_size": t["global_batch_size"],
        "micro_batch_size": t["micro_batch_size"],
        "num_micro_batches": t["num_micro_batches"],
        "steps": t["steps"],
        "optimizer": t["optimizer"],
        "dtype": t["dtype"],
        "attention_kernel": t.get("attention_kernel", "flash"),
        "recompute": t.get("recompute", "none"),
        "documents": documents,
        "packed": any(bool(t.get(f)) for f in flags),
    }


def read_run(run_dir: Path | str) -> dict:
    """Measured columns from a finished run folder (summary.json, metrics.jsonl, config.json).

    Step time, tokens/s, achieved FLOP/s and peak memory come from summary.json (median step time
    after warm-up); bytes and call counts from the last step of metrics.jsonl (they are the same
    every step); activation bytes are the maximum over steps; comm times the median over steps
    after the first; ``transient_peak_bytes`` from the first step (the only one that records it;
    NaN for runs of a trainer that does not). Raises FileNotFoundError when the run left no
    summary.json.
    """
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    if not steps:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no steps")
    last, steady = steps[-1], (steps[1:] or steps)
    row = {
        k: summary.get(k, math.nan)
        for k in (
            "step_time_s",
            "tokens_per_s",
            "achieved_flops_per_s",
            "peak_mem_bytes",
            "final_loss",
        )
    }
    for k in (
        "model_flops_per_step",
        "sp_comm_bytes",
        "grad_comm_bytes",
        "other_comm_bytes",
        "sp_comm_calls",
        "grad_comm_calls",
        "param_bytes",
        "grad_bytes",
        "optimizer_state_bytes",
        "attention_imbalance",
    ):
        row[k] = last.get(k, math.nan)
    per_rank = last.get("attention_flops_per_rank") or []
    row["attention_flops_max"] = max(per_rank) if per_rank else math.nan
    row["attention_flops_mean"] = sum(per_rank) / len(per_rank) if per_rank else math.nan
    row["kv_needed_fraction"] = last.get("kv_needed_fraction", math.nan)
    row["kv_unneeded_bytes"] = (1 - row["kv_needed_fraction"]) * row["sp_comm_bytes"]
    row["activation_bytes"] = max(s.get("activation_bytes", 0) for s in steps)
    transient = [
        s["transient_peak_bytes"] for s in steps if s.get("transient_peak_bytes") is not None
    ]
    row["transient_peak_bytes"] = transient[0] if transient else math.nan
    for k in ("sp_comm_time_s", "grad_comm_time_s", "sp_exposed_s"):
        row[k] = statistics.median(s.get(k, math.nan) for s in steady)
    config = run_dir / "config.json"
    if config.exists():
        runtime = json.loads(config.read_text()).get("runtime", {})
        row["core_attention"] = runtime.get("core_attention", "")
        row["machine"] = runtime.get("machine", "")  # an extra column, after `COLUMNS`
    return row


# --- derived columns -----------------------------------------------------------------------------
def _median_by(ok: pd.DataFrame, keys: Iterable[str], values: Iterable[str]) -> pd.DataFrame:
    return ok.groupby(list(keys), dropna=False)[list(values)].median().reset_index()


def _plain(df: pd.DataFrame, mode: str) -> pd.Series:
    """Rows of `mode` without the options beyond the paper (contiguous segments, one K/V gather,
    no ZeRO); a missing option column (an older table) counts as the default."""

    def default(column: str, value: str | int) -> pd.Series:
        if column not in df:
            return pd.Series(True, index=df.index)
        col = df[column]
        if isinstance(value, str):
            return col.isna() | col.astype(str).isin(["", value])
        return col.isna() | (pd.to_numeric(col, errors="coerce") == value)

    return (
        (df["mode"] == mode)
        & default("lss_layout", "contiguous")
        & default("kv_gather_chunks", 1)
        & default("lss_save_kv", "gathered")
        & default("lss_kv_gather", "fused")
        & default("lss_overlap", "False")
        & default("zero_stage", 0)
    )


def _lss_reference(df: pd.DataFrame, values: list[str] | None = None) -> pd.DataFrame:
    """Plain-LSS medians of `values` (default: those `_LSS_RATIOS` read) aligned with every row
    of `df` (NaN where there is none)."""
    values = values or list(dict.fromkeys(_LSS_RATIOS.values()))
    ok = df[(df["status"] == "ok") & _plain(df, METHOD)]
    ref = df[list(LAYOUT_KEY)].merge(
        _median_by(ok, LAYOUT_KEY, values), on=list(LAYOUT_KEY), how="left"
    )
    ref.index = df.index
    return ref


def _nvidia_reference(df: pd.DataFrame, values: list[str] | None = None) -> pd.DataFrame:
    """nvidia-sp medians of `values` (default: those `_RATIOS` read) aligned with every row of
    `df` (NaN where there is none)."""
    values = values or list(dict.fromkeys(_RATIOS.values()))
    ok = df[(df["status"] == "ok") & _plain(df, BASELINE)]
    exact = _median_by(ok, LAYOUT_KEY, values)
    ref = df[list(LAYOUT_KEY)].merge(exact, on=list(LAYOUT_KEY), how="left")
    ref.index = df.index
    # serial rows (N = 1, D = P): the nvidia-sp run at the same P, when its layout is unique
    by_p = ok.groupby(["world_size", "seq_length", *MODEL_KEY], dropna=False)
    unique = by_p.filter(
        lambda g: g[["seq_parallel", "data_parallel"]].drop_duplicates().shape[0] == 1
    )
    same_p = _median_by(unique, ["world_size", "seq_length", *MODEL_KEY], values)
    serial = df["mode"] == REFERENCE
    if serial.any() and not same_p.empty:
        keys = ["world_size", "seq_length", *MODEL_KEY]
        alt = df.loc[serial, keys].merge(same_p, on=keys, how="left")
        alt.index = df.index[serial]
        ref.loc[serial, values] = alt[values]
    return ref


def _efficiency_reference(df: pd.DataFrame, scaling: str, values: list[str]) -> pd.DataFrame:
    """The serial reference's medians of `values` aligned with every row of `df`, plus its
    ``ref_ranks``: strong, serial on one rank at the same l; weak, serial with N = 1 and the same
    D at the base length l / N."""
    ok = df[(df["status"] == "ok") & (df["mode"] == REFERENCE) & (df["seq_parallel"] == 1)]
    rows = df.copy()
    if scaling == "strong":
        keys = ["seq_length", *MODEL_KEY]
        ref = _median_by(ok[ok["world_size"] == 1], keys, values)
        ref["ref_ranks"] = 1
    else:
        ref = _median_by(ok, ["data_parallel", "seq_length", *MODEL_KEY], values)
        ref = ref.rename(columns={"seq_length": "base_length"})
        ref["ref_ranks"] = ref["data_parallel"]
        rows["base_length"] = rows["seq_length"] // rows["seq_parallel"]
        keys = ["data_parallel", "base_length", *MODEL_KEY]
    merged = rows[keys].merge(ref, on=keys, how="left")
    merged.index = df.index
    return merged


def _efficiency(df: pd.DataFrame, scaling: str) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(reference step time, time-based efficiency, FLOP-rate efficiency) for every row."""
    merged = _efficiency_reference(df, scaling, ["step_time_s", "model_flops_per_step"])
    ref_time = merged["step_time_s"]
    ref_flops = merged["model_flops_per_step"] / ref_time
    t = df["step_time_s"].where(df["status"] == "ok")
    p = df["world_size"]
    time_eff = ref_time / (p * t) if scaling == "strong" else ref_time / t
    flops_eff = (df["achieved_flops_per_s"].where(df["status"] == "ok") / p) / (
        ref_flops / merged["ref_ranks"]
    )
    return ref_time, time_eff, flops_eff


def _fill_settings(df: pd.DataFrame) -> None:
    """Setting columns of a table from before they existed: the kernel from ``core_attention``
    (Megatron's DotProductAttention was dense, the others flash), no recompute, fp32."""
    if "attention_kernel" not in df:
        core = df["core_attention"] if "core_attention" in df else pd.Series("", index=df.index)
        df["attention_kernel"] = core.map(
            lambda c: "dense" if c == "DotProductAttention" else ("flash" if c else math.nan)
        )
    if "recompute" not in df:
        df["recompute"] = "none"
    if "dtype" not in df:
        df["dtype"] = "fp32"
    # the document mix and flags (empty / False before they existed; CSV reads "" as NaN)
    docs = df["documents"] if "documents" in df else pd.Series("", index=df.index)
    df["documents"] = docs.fillna("").astype(str).replace("nan", "")
    packed = df["packed"] if "packed" in df else pd.Series(False, index=df.index)
    df["packed"] = packed.map(lambda x: str(x).strip().lower() in ("true", "1", "1.0"))


def is_packed(df: pd.DataFrame) -> pd.Series:
    """Rows run with Megatron-LM's document flags (after `_fill_settings`)."""
    return df["packed"].astype(bool) if "packed" in df else pd.Series(False, index=df.index)


def _unpacked_reference(df: pd.DataFrame, values: list[str]) -> pd.DataFrame:
    """For every packed row, the medians of `values` over the ok unpacked runs of the same
    variant, layout, model, setting and document mix; NaN elsewhere."""
    label = (
        df["variant"].where(df["variant"].notna(), df["mode"]) if "variant" in df else df["mode"]
    )
    frame = df.assign(_label=label)
    keys = ["_label", *(k for k in LAYOUT_KEY if k != "packed")]
    ok = frame[(frame["status"] == "ok") & ~is_packed(frame)]
    ref = frame[keys].merge(_median_by(ok, keys, values), on=keys, how="left")
    ref.index = df.index
    ref.loc[~is_packed(df), values] = math.nan
    return ref


def setting_label(df: pd.DataFrame) -> pd.Series:
    """Per row: the kernel, then the recompute and the dtype where not the default
    (``flash``, ``dense, selective``, ``flash, bf16``); empty where the table does not say."""

    def label(row) -> str:
        parts = [str(row.get("attention_kernel") or "")]
        if str(row.get("recompute") or "none") not in ("none", "nan"):
            parts.append(str(row["recompute"]))
        if str(row.get("dtype") or "fp32") not in ("fp32", "nan"):
            parts.append(str(row["dtype"]))
        docs = row.get("documents")
        if isinstance(docs, str) and docs and docs != "nan":
            packed = str(row.get("packed")).lower() in ("true", "1", "1.0")
            parts.append(f"{docs} {'packed' if packed else 'unpacked'}")
        return ", ".join(p for p in parts if p and p != "nan")

    return pd.Series([label(r) for _, r in df.iterrows()], index=df.index, dtype=object)


def memory_bytes(df: pd.DataFrame) -> pd.Series:
    """What a rank holds, per run: on CUDA the measured peak (``peak_mem_bytes``: max allocated);
    on CPU, where the peak is the process's RSS (mostly imports, the same for every mode), the
    counted bytes instead: activations saved for backward plus parameters, gradients and
    optimizer state."""
    counted = sum(
        pd.to_numeric(df[c], errors="coerce").fillna(0) if c in df else 0
        for c in ("activation_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes")
    )
    machine = df["machine"].astype(str) if "machine" in df else pd.Series("", index=df.index)
    cuda = machine.str.contains("nccl|CUDA", regex=True)
    peak = (
        pd.to_numeric(df["peak_mem_bytes"], errors="coerce") if "peak_mem_bytes" in df else counted
    )
    return peak.where(cuda, counted).astype(float)


def add_derived(df: pd.DataFrame, scaling: str) -> pd.DataFrame:
    """`df` with the ratio and efficiency columns filled in (see the module docstring)."""
    if scaling not in ("strong", "weak"):
        raise ValueError(f"scaling must be strong or weak, got {scaling!r}")
    df = df.copy()
    for value in (*_RATIOS.values(), *_LSS_RATIOS.values()):
        if value not in df:  # a table from before that column existed
            df[value] = math.nan
    _fill_settings(df)
    df["memory_bytes"] = memory_bytes(df)
    ok = df["status"] == "ok"
    for reference, ratios in ((_nvidia_reference, _RATIOS), (_lss_reference, _LSS_RATIOS)):
        ref = reference(df)
        for column, value in ratios.items():
            own = df[value].where(ok & (df[value] > 0))  # nothing to compare with zero bytes
            df[column] = (ref[value] / own).astype(float)
    df = df.drop(columns="memory_bytes")  # a helper of the memory ratio, not a column
    df["reference_step_time_s"], df["parallel_efficiency"], df["flops_efficiency"] = _efficiency(
        df, scaling
    )
    for value in ("attention_flops_mean", "step_time_s"):
        if value not in df:
            df[value] = math.nan
    unpacked = _unpacked_reference(df, ["attention_flops_mean", "step_time_s"])
    for column, value in (
        ("attention_flops_vs_unpacked", "attention_flops_mean"),
        ("step_time_vs_unpacked", "step_time_s"),
    ):
        base = unpacked[value].where(unpacked[value] > 0)
        df[column] = (pd.to_numeric(df[value], errors="coerce").where(ok) / base).astype(float)
    df["efficiency_kind"] = scaling
    return df


def finish(rows: list[dict], scaling: str, budget_bytes: int | None = None) -> pd.DataFrame:
    """The summary table from per-run dicts: every column of `COLUMNS`, derived ones computed."""
    df = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in df:
            df[column] = math.nan
    df["status"] = df["status"].fillna("missing")
    df["config_id"] = config_ids(df)
    if budget_bytes is not None:
        df["memory_budget_bytes"] = budget_bytes
    df = add_derived(df, scaling)
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


def config_ids(df: pd.DataFrame) -> pd.Series:
    """Each row's configuration: the ``config_id`` column, else the run id without ``_rK``."""
    strip = df["run_id"].astype(str).map(lambda r: re.sub(r"_r\d+$", "", r))
    if "config_id" not in df:
        return strip
    own = df["config_id"]
    return own.where(own.notna() & (own.astype(str) != "") & (own.astype(str) != "nan"), strip)


def write_summary(df: pd.DataFrame, path: Path | str) -> Path:
    path = Path(path)
    df.to_csv(path, index=False)
    return path


def read_summary(path: Path | str, required=(), numeric=()) -> pd.DataFrame:
    """summary.csv (or a folder holding it) as a DataFrame; `analysis.inputs.InputError` when it
    is missing, empty or malformed (lacks a `required` column, text in a `numeric` one)."""
    from .inputs import InputError, read_csv_table

    path = Path(path)
    if path.is_dir():
        if not (path / "summary.csv").exists():
            raise InputError(f"{path}: no summary.csv here (python -m analysis.compare writes it)")
        path = path / "summary.csv"
    elif not path.exists():
        raise InputError(f"{path}: no such file or folder")
    df = read_csv_table(path, ("run_id", "status", *required), numeric)
    if "error" in df:
        df["error"] = df["error"].fillna("").astype(str)
    return df


# --- the cost model (analysis.costmodel, optional) ------------------------------------------------
def load_costmodel() -> tuple[Callable[[dict], dict] | None, str]:
    """(`analysis.costmodel.predict`, "") when that module exists, else (None, why not)."""
    try:
        costmodel = importlib.import_module(".costmodel", __package__)
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.costmodel", __package__):
            return None, f"analysis.costmodel could not be imported: {e}"
        return None, "analysis.costmodel is not available yet: predicted_* columns are empty"
    except Exception as e:  # noqa: BLE001 - a broken optional module must not stop the analysis
        return None, f"analysis.costmodel could not be imported: {type(e).__name__}: {e}"
    predict = getattr(costmodel, "predict", None)
    if not callable(predict):
        return None, "analysis.costmodel has no predict(config): predicted_* columns are empty"
    return predict, ""


def predicted_columns(config: Mapping, predict: Callable[[dict], dict] | None) -> dict:
    """The predicted_* columns of one run (NaN where the cost model is absent or silent)."""
    out = dict.fromkeys(PREDICTED, math.nan)
    if predict is None:
        return out
    result = predict(dict(config))
    for column in PREDICTED:
        value = result.get(column.removeprefix("predicted_"))
        out[column] = math.nan if value is None else float(value)
    return out


# --- printing ------------------------------------------------------------------------------------
_SHOWN = {
    "mode": "mode",
    "attention_kernel": "kernel",
    "recompute": "recomp",
    "dtype": "dtype",
    "seq_parallel": "N",
    "data_parallel": "D",
    "world_size": "P",
    "seq_length": "l",
    "repeat": "rep",
    "status": "status",
    "step_time_s": "step_s",
    "tokens_per_s": "tok/s",
    "sp_comm_bytes": "sp_MiB",
    "grad_comm_bytes": "grad_MiB",
    "activation_bytes": "act_MiB",
    "peak_mem_bytes": "peak_MiB",
    "speedup_vs_nvidia_sp": "speedup_vs_nsp",
    "activation_ratio_vs_nvidia_sp": "act_ratio",
    "memory_ratio_vs_nvidia_sp": "mem_ratio",
    "parallel_efficiency": "eff",
    "flops_efficiency": "flops_eff",
}
_OPTIONS = {
    "documents": "docs",
    "packed": "packed",
    "attention_flops_max": "attnGF_max",
    "attention_flops_mean": "attnGF_mean",
    "attention_flops_vs_unpacked": "attnF_vs_unp",
    "step_time_vs_unpacked": "time_vs_unp",
    "kv_unneeded_bytes": "kv_unneeded_MiB",
    "attention_imbalance": "imbal",
    "transient_peak_bytes": "trans_MiB",
    "optimizer_state_bytes": "opt_MiB",
    "grad_bytes": "gradmem_MiB",
    "speedup_vs_lss": "speedup_vs_lss",
    "activation_ratio_vs_lss": "act_vs_lss",
    "transient_peak_ratio_vs_lss": "trans_vs_lss",
    "optimizer_state_ratio_vs_lss": "opt_vs_lss",
}
"""Columns of the options beyond the paper, printed only when the table has them (see
`_option_columns`)."""
_MIB = (
    "sp_comm_bytes",
    "grad_comm_bytes",
    "activation_bytes",
    "peak_mem_bytes",
    "transient_peak_bytes",
    "optimizer_state_bytes",
    "grad_bytes",
    "kv_unneeded_bytes",
)
_GIGA = ("attention_flops_max", "attention_flops_mean")
_PAPER_MODES = {"serial", "lss", "nvidia-sp"}


def _has(df: pd.DataFrame, column: str) -> bool:
    return column in df and pd.to_numeric(df[column], errors="coerce").notna().any()


def _option_columns(df: pd.DataFrame) -> list[str]:
    """The `_OPTIONS` columns worth printing: the imbalance where LSS reported it; the transient
    peak where the trainer recorded it; optimizer-state and gradient bytes where a ZeRO run is;
    the ratios against plain LSS where a variant other than the paper's modes ran."""
    variants = set(df["variant"].dropna().astype(str)) if "variant" in df else set()
    zero = _has(df, "zero_stage") and (pd.to_numeric(df["zero_stage"], errors="coerce") > 0).any()
    docs = "documents" in df and df["documents"].fillna("").astype(str).replace("nan", "").any()
    show = {
        "documents": docs,
        "packed": docs,
        "attention_flops_max": docs,
        "attention_flops_mean": docs,
        "attention_flops_vs_unpacked": docs,
        "step_time_vs_unpacked": docs,
        "kv_unneeded_bytes": docs and _has(df, "kv_unneeded_bytes"),
        "attention_imbalance": _has(df, "attention_imbalance"),
        "transient_peak_bytes": _has(df, "transient_peak_bytes"),
        "optimizer_state_bytes": zero,
        "grad_bytes": zero,
        "speedup_vs_lss": bool(variants - _PAPER_MODES),
        "activation_ratio_vs_lss": bool(variants - _PAPER_MODES),
        "transient_peak_ratio_vs_lss": _has(df, "transient_peak_ratio_vs_lss"),
        "optimizer_state_ratio_vs_lss": zero,
    }
    return [c for c in _OPTIONS if show[c]]


def _with_interval(point, lo, hi) -> str:
    """``1.23 [1.10, 1.35]``, with `` ~`` when the interval contains 1 (no clear difference);
    the point alone where there is no interval (one repeat) or the row is its own reference."""
    if not math.isfinite(point):
        return "-"
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
        return f"{point:.3g}"
    mark = " ~" if lo <= 1 <= hi else ""
    return f"{point:.3g} [{lo:.3g}, {hi:.3g}]{mark}"


def format_table(df: pd.DataFrame) -> str:
    """The summary table as text (bytes in MiB), with the efficiency kind in a footer. The
    ``mode`` column shows the variant label (``lss-zigzag``, ...) where there is one; the
    columns of the options beyond the paper appear only when the table has them. A table of
    configurations (summary.csv with ``repeats``) shows the repeats, the step time's spread
    (min-max) and each time ratio with its interval, marked ``~`` where it contains 1."""
    if df.empty:
        return "(no runs)"
    extra = _option_columns(df)
    columns = list(_SHOWN) + extra
    folded = "repeats" in df
    if folded:
        columns[columns.index("repeat")] = "repeats"
    shown = df[columns].copy()
    if "variant" in df:
        shown["mode"] = df["variant"].where(df["variant"].notna(), df["mode"])
    for column in _MIB:
        if column in shown:
            shown[column] = shown[column] / 2**20
    for column in _GIGA:
        if column in shown:
            shown[column] = shown[column] / 1e9
    intervals = [c for c in columns if f"{c}_lo" in df and f"{c}_hi" in df]
    for column in intervals:
        shown[column] = [
            _with_interval(float(p), float(lo), float(hi))
            for p, lo, hi in zip(df[column], df[f"{column}_lo"], df[f"{column}_hi"], strict=True)
        ]
    if folded and "step_time_s_min" in df:
        spread = [
            f"{a:.3g}-{b:.3g}" if math.isfinite(a) else "-"
            for a, b in zip(df["step_time_s_min"], df["step_time_s_max"], strict=True)
        ]
        shown.insert(shown.columns.get_loc("step_time_s") + 1, "step_min-max", spread)
    shown = shown.rename(columns={**_SHOWN, **_OPTIONS, "repeats": "rep"})
    text = shown.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-")
    kinds = sorted(set(df["efficiency_kind"].dropna().astype(str)))
    kind = kinds[0] if len(kinds) == 1 else "/".join(kinds)
    what = {
        "strong": "strong scaling, T_1 / (P T_P), T_1 = serial on 1 rank at the same l",
        "weak": "weak scaling, T_1 / T_P, T_1 = serial (N = 1, same D) at l / N",
    }
    footer = (
        f"eff = parallel efficiency ({what.get(kind, kind)}); flops_eff = achieved "
        "FLOP/s per rank over the same reference's; speedup_vs_nsp, act_ratio, mem_ratio = "
        "nvidia-sp's step time, activation bytes, memory over this run's (memory: the "
        "GPU peak; on CPU activations + parameters + gradients + optimizer state, not RSS) "
        "(same N, D, l); every ratio and efficiency is between runs of the same kernel, "
        "recomp and dtype, never across; bytes are rank 0's; step_s is the slowest "
        "rank's."
    )
    if folded:
        levels = sorted(set(df["interval_level"].dropna())) if "interval_level" in df else []
        level = f"{100 * levels[0]:g}%" if levels else "bootstrap"
        footer += (
            f" rep = ok repeats; step_s = median over the repeats, step_min-max their spread; "
            f"time ratios (speedup_*, eff, flops_eff) show [{level} bootstrap interval over "
            "the repeats], '~' = the interval contains 1: no clear difference (no interval "
            "with one repeat); bytes and calls are counted exactly, the same in every repeat: "
            "they need no repeats and have no interval."
        )
    if extra:
        footer += (
            " imbal = max/mean per-rank attention FLOPs (LSS); trans = peak heap growth "
            "of step 1's forward + backward; opt, gradmem = optimizer-state and gradient "
            "bytes; *_vs_lss = plain LSS's value over this run's (same N, D, l): above 1 "
            "is faster or smaller."
        )
    if "documents" in extra:
        footer += (
            " docs = the document mix, packed = Megatron-LM's --reset-position-ids "
            "--reset-attention-mask --eod-mask-loss on (else the same tokens, plain causal); "
            "attnGF_max / _mean = attention GFLOPs per step (forward + backward) of the most "
            "loaded rank / the mean rank of the sequence group; attnF_vs_unp, time_vs_unp = "
            "this packed run's mean attention FLOPs / step time over the unpacked run of the "
            "same mode and mix (below 1: packing saves); kv_unneeded = LSS's K/V gather and "
            "reduce-scatter bytes per rank that carry keys no query of the receiving rank sees."
        )
    return f"{text}\n\n{footer}"


BEST_COLUMNS = (
    "mode",
    "setting",
    "seq_length",
    "world_size",
    "best_layout",
    "layouts_tried",
    "step_time_s",
    "tokens_per_s",
    "activation_bytes",
    "transient_peak_bytes",
    "speedup_vs_nvidia_sp_best",
    "activation_ratio_vs_nvidia_sp_best",
    "smallest_layout",
    "smallest_activation_bytes",
)


def best_layouts(df: pd.DataFrame) -> pd.DataFrame:
    """Equal ranks: per mode (variant label), setting, l, P and model, the layout with the
    shortest median step time, with its tokens/s and bytes saved for backward per rank (rank 0's),
    and the layout saving the fewest bytes for backward (``smallest_layout``, which may differ),
    and nvidia-sp's best over it (``speedup_vs_nvidia_sp_best`` = nvidia-sp's best step time /
    this mode's best; ``activation_ratio_vs_nvidia_sp_best`` likewise for saved bytes: above 1,
    this mode is faster / smaller). Only runs of the same kernel, recompute and dtype meet."""
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=list(BEST_COLUMNS))
    _fill_settings(ok)
    ok["label"] = (
        ok["variant"].where(ok["variant"].notna() & (ok["variant"] != ""), ok["mode"])
        if "variant" in ok
        else ok["mode"]
    )
    ok["setting"] = setting_label(ok)
    ok["layout"] = (
        "N"
        + ok["seq_parallel"].astype(int).astype(str)
        + " x D"
        + ok["data_parallel"].astype(int).astype(str)
    )
    group = ["label", "seq_length", "world_size", *MODEL_KEY]
    values = ["step_time_s", "tokens_per_s", "activation_bytes", "transient_peak_bytes"]
    med = ok.groupby([*group, "setting", "layout"], dropna=False)[values].median().reset_index()
    rows = []
    for _, g in med.groupby(group, dropna=False):
        best = g.loc[g["step_time_s"].idxmin()]
        small = (
            g.loc[g["activation_bytes"].idxmin()] if g["activation_bytes"].notna().any() else best
        )
        rows.append(
            {
                **best.to_dict(),
                "mode": best["label"],
                "best_layout": best["layout"],
                "layouts_tried": ", ".join(sorted(g["layout"])),
                "smallest_layout": small["layout"],
                "smallest_activation_bytes": small["activation_bytes"],
            }
        )
    out = pd.DataFrame(rows)
    nsp = out[out["mode"] == BASELINE]
    keys = ["seq_length", "world_size", *MODEL_KEY]
    ref = out[keys].merge(
        nsp[[*keys, "step_time_s", "activation_bytes"]], on=keys, how="left", suffixes=("", "_nsp")
    )
    out["speedup_vs_nvidia_sp_best"] = (ref["step_time_s"].values / out["step_time_s"]).astype(
        float
    )
    out["activation_ratio_vs_nvidia_sp_best"] = (
        ref["activation_bytes"].values / out["activation_bytes"]
    ).astype(float)
    return out[list(BEST_COLUMNS)].sort_values(["seq_length", "mode"]).reset_index(drop=True)


def format_best_layouts(best: pd.DataFrame) -> str:
    """The best-layout table as text (bytes in MiB)."""
    shown = best.copy()
    for column in ("activation_bytes", "transient_peak_bytes", "smallest_activation_bytes"):
        shown[column] = shown[column] / 2**20
    shown = shown.rename(
        columns={
            "activation_bytes": "saved_MiB",
            "transient_peak_bytes": "trans_MiB",
            "speedup_vs_nvidia_sp_best": "speedup_vs_nsp_best",
            "activation_ratio_vs_nvidia_sp_best": "saved_ratio_vs_nsp",
            "smallest_activation_bytes": "smallest_saved_MiB",
        }
    )
    text = shown.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-")
    return (
        f"best layout per mode at equal ranks (fastest median step):\n{text}\n\n"
        "speedup_vs_nsp_best = nvidia-sp's best step time / this mode's best (same P, l, "
        "model, kernel, recompute, dtype); saved_ratio_vs_nsp = nvidia-sp's bytes saved for "
        "backward per rank (at its best layout) / this mode's; above 1: this mode is "
        "faster / smaller; smallest_layout = the mode's layout saving the fewest bytes "
        "(smallest_saved_MiB). Bytes are rank 0's."
    )


def config_from_row(row: Mapping, seq_length: int | None = None) -> dict:
    """The effective configuration (`RunConfig.to_dict()`) of a table row, optionally at another
    sequence length: what `analysis.costmodel.predict` takes."""
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

    def i(k: str) -> int:
        return int(row[k])

    def option(k: str, default):  # the options beyond the paper; absent in older tables
        value = row.get(k)
        if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
            return default
        if isinstance(default, bool):  # "False" read back from a CSV is not truthy
            return str(value).strip().lower() in ("true", "1", "1.0")
        return type(default)(value)

    cfg = RunConfig(
        model=ModelConfig(
            num_layers=i("num_layers"),
            hidden_size=i("hidden_size"),
            num_heads=i("num_heads"),
            num_kv_heads=i("num_kv_heads"),
            ffn_hidden_size=i("ffn_hidden_size"),
            seq_length=int(seq_length or row["seq_length"]),
            vocab_size=i("vocab_size"),
            make_vocab_size_divisible_by=i("make_vocab_size_divisible_by"),
            position_embedding=str(row["position_embedding"]),
            causal=str(row["causal"]).lower() in ("true", "1", "1.0"),
        ),
        parallel=ParallelConfig(
            mode=str(row["mode"]),
            world_size=i("world_size"),
            seq_parallel=i("seq_parallel"),
            data_parallel=i("data_parallel"),
            lss_layout=option("lss_layout", "contiguous"),
            kv_gather_chunks=option("kv_gather_chunks", 1),
            lss_save_kv=option("lss_save_kv", "gathered"),
            lss_kv_gather=option("lss_kv_gather", "fused"),
            lss_overlap=option("lss_overlap", False),
        ),
        train=TrainConfig(
            global_batch_size=i("global_batch_size"),
            micro_batch_size=i("micro_batch_size"),
            optimizer=str(row["optimizer"]),
            dtype=str(row["dtype"]),
            zero_stage=option("zero_stage", 0),
            attention_kernel=option("attention_kernel", "flash"),
            recompute=option("recompute", "none"),
        ),
    )
    return cfg.to_dict()
