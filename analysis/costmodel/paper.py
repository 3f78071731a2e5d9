"""The ``summit-paper`` preset: the paper's headline claims beside this cost model's numbers, under
named assumption sets (`scenarios`: ``paper-2023``, ``modern``), and the modelled series the
paper figures draw (`paper_series`).

The mechanism modelled: NVIDIA SP's degree is capped by the head count (t = 6 inside a Summit
node, 12 across two), while LSS spreads one sequence over all 144 GPUs (N = 144). Per iteration
(one sequence per model replica) LSS's step is shorter because each GPU holds 1/144 of the
sequence; at equal tokens per step the baseline's 144 / t replicas process more sequences at
once. Every number is a model, not a measurement; nothing is tuned to a claim. Where the claim
is ambiguous, several readings are printed, each with its ratio model / claim.

    python -m analysis.costmodel --preset summit-paper [--assumptions paper-2023] [--json]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from ..fitsearch import longest_fitting
from . import predict
from .configs import config_from_preset
from .counts import layout_from_config, model_flops_per_step, shape_from_config
from .hw import get_device
from .scenarios import (
    ASSUMPTION_SETS,
    D_3456,
    DEVICE,
    EQUAL_RANKS_LSS,
    LSS_DEGREE,
    N_3456,
    PRESET_144,
    PRESET_3456,
    RANKS,
    SEQ_144,
    SEQ_3456,
    SOURCES,
    SP_DEGREES,
    AssumptionSet,
    at_length,
    get_set,
    head_capped_degree,
    lcm,
    setup_144,
    setup_3456,
)
from .steptime import Assumptions

PAPER_CLAIMS = {
    "speedup": {
        "value": 5.6,
        "unit": "x",
        "ranks": 144,
        "label": "speed vs NVIDIA SP, 144 V100",
        "refers_to": "LSS faster than NVIDIA sequence parallelism, enwik8, 144 V100 "
        "(step time; batch and layouts unknown)",
    },
    "memory": {
        "value": 10.2,
        "unit": "x",
        "ranks": 144,
        "label": "memory vs NVIDIA SP, 144 V100",
        "refers_to": "LSS more memory-efficient than NVIDIA SP, 144 V100 (per-GPU bytes "
        "or longest sequence: unknown)",
    },
    "efficiency": {
        "value": 161.0,
        "unit": "%",
        "ranks": 3456,
        "label": "parallel efficiency, l 50,112, 3,456 V100",
        "refers_to": "super-linear parallel efficiency at l 50,112 on 3,456 V100 "
        "(definition and reference run unknown)",
    },
    "throughput": {
        "value": 32.0,
        "unit": "PFLOP/s",
        "ranks": 3456,
        "label": "throughput, l 50,112, 3,456 V100",
        "refers_to": "32 petaflops at l 50,112 on 3,456 V100 (FLOP convention unknown)",
    },
    "longest": {
        "value": 50112.0,
        "unit": "tokens",
        "ranks": 3456,
        "label": "sequence length on 3,456 V100",
        "refers_to": "l = 50,112 reached on 3,456 V100 (N x D grid unknown)",
    },
}
"""The paper's headline numbers (abstract, arXiv 2311.02382) and what each refers to."""

SETS = tuple(ASSUMPTION_SETS)


@dataclass(frozen=True)
class Options:
    """Switches beside the assumption sets (both off by default, see `scenarios.SOURCES`)."""

    overlap_kv_gather: bool = False
    baseline_recompute: str = "none"

    def timing(self) -> Assumptions:
        return Assumptions(overlap_kv_gather=self.overlap_kv_gather)


def _predict(config: dict, opts: Options) -> dict:
    return predict(config, device=DEVICE, assumptions=opts.timing())


def longest(config: dict, step: int, opts: Options) -> int:
    """Longest l (a multiple of `step`) whose ``peak_bytes`` (saved + transient) fit the GPU."""
    budget = get_device(DEVICE).memory_bytes
    return longest_fitting(
        step, lambda ll: predict(at_length(config, ll))["peak_bytes"], budget, 1 << 22
    )


def max_seq_length(make, step: int, memory: float, limit: int = 1 << 22) -> int:
    """Largest l (a multiple of `step`) whose per-GPU ``peak_bytes`` fit `memory`;
    `make(l)` -> config."""
    return longest_fitting(step, lambda length: predict(make(length))["peak_bytes"], memory, limit)


def summit_layout(base: str = "144", **overrides) -> dict:
    """Predict a hypothetical layout on Summit V100s: the 144- or 3456-GPU preset with `overrides`
    in `make_config`'s names, e.g. ``summit_layout("144", mode="nvidia-sp", seq_parallel=2,
    data_parallel=72, global_batch_size=72)``. The 144 base pads the vocabulary to 768."""
    if base not in ("144", "3456"):
        raise ValueError(f"base must be '144' or '3456', got {base!r}")
    overrides.setdefault("dtype", "fp32")
    if base == "144":
        overrides.setdefault("mode", "lss")
    path = PRESET_144 if base == "144" else PRESET_3456
    return predict(config_from_preset(path, **overrides), device=DEVICE)


# --- the 144-GPU comparison --------------------------------------------------------------------
def _pair_144(
    aset: AssumptionSet,
    n: int,
    t: int,
    opts: Options,
    ranks: int = RANKS,
    seq_length: int = SEQ_144,
) -> dict:
    """LSS at N = n against NVIDIA SP at t on `ranks` GPUs: per iteration (one sequence per
    replica each) and at equal tokens per step (lcm of the replica counts)."""
    sp = _predict(
        setup_144(aset, "nvidia-sp", t, ranks, seq_length, recompute=opts.baseline_recompute), opts
    )
    lss = _predict(setup_144(aset, "lss", n, ranks, seq_length), opts)
    g = lcm(ranks // n, ranks // t)
    lss_g = _predict(setup_144(aset, "lss", n, ranks, seq_length, global_batch=g), opts)
    sp_g = _predict(
        setup_144(
            aset,
            "nvidia-sp",
            t,
            ranks,
            seq_length,
            global_batch=g,
            recompute=opts.baseline_recompute,
        ),
        opts,
    )
    return {
        "sp": sp,
        "lss": lss,
        "equal_tokens_batch": g,
        "per_iteration": sp["step_time_s"] / lss["step_time_s"],
        "equal_tokens": sp_g["step_time_s"] / lss_g["step_time_s"],
    }


def _comparison_144(aset: AssumptionSet, opts: Options) -> dict:
    out = {}
    lss_cfg = setup_144(aset, "lss", LSS_DEGREE)
    lss_longest = longest(lss_cfg, LSS_DEGREE, opts)
    for t in SP_DEGREES:
        pair = _pair_144(aset, LSS_DEGREE, t, opts)
        sp_cfg = setup_144(aset, "nvidia-sp", t, recompute=opts.baseline_recompute)
        sp_longest = longest(sp_cfg, LSS_DEGREE, opts)  # the same step: comparable lengths
        pair.update(
            {
                "bytes_ratio": pair["sp"]["peak_bytes"] / pair["lss"]["peak_bytes"],
                "longest": {"lss": lss_longest, "nvidia-sp": sp_longest},
                "longest_ratio": lss_longest / max(1, sp_longest),
            }
        )
        out[t] = pair
    return out


# --- the 3,456-GPU run --------------------------------------------------------------------------
def full_square_flops(config: dict) -> int:
    """Model FLOPs per step counting the full l x l square (what a dense kernel executes)."""
    s = shape_from_config(config["model"])
    return model_flops_per_step(replace(s, causal=False), config["train"]["global_batch_size"])


def _weak_point(aset: AssumptionSet, n: int, opts: Options, ref: dict | None = None) -> dict:
    """LSS at N = n, D = 24 (l = 348 n) against one GPU at l = 348: FLOP-rate efficiency under
    both FLOP conventions, token-rate efficiency, throughput."""
    l0 = SEQ_3456 // N_3456
    if ref is None:
        ref_cfg = setup_3456(aset, 1, 1, l0)
        ref = {"pred": _predict(ref_cfg, opts), "full": full_square_flops(ref_cfg)}
    cfg = setup_3456(aset, n, D_3456, l0 * n)
    run = _predict(cfg, opts)
    p, t1, tp = run["world_size"], ref["pred"]["step_time_s"], run["step_time_s"]
    causal = run["model_flops_per_step"] / tp
    full = full_square_flops(cfg) / tp
    return {
        "run": run,
        "reference": ref,
        "ranks": p,
        "seq_length": l0 * n,
        "flops_per_s": causal,
        "flops_per_s_full_square": full,
        "efficiency": causal / p / (ref["pred"]["model_flops_per_step"] / t1),
        "efficiency_full_square": full / p / (ref["full"] / t1),
        "token_rate_efficiency": (D_3456 * l0 * n / tp / p) / (l0 / t1),
    }


def _scale_3456(aset: AssumptionSet, opts: Options) -> dict:
    out = _weak_point(aset, N_3456, opts)
    cfg = setup_3456(aset)
    out["longest"] = longest(cfg, N_3456, opts)
    out["peak_bytes_at_claim"] = out["run"]["peak_bytes"]
    return out


# --- claims -------------------------------------------------------------------------------------
_PARTS = {
    "model state": ("param_bytes", "master_param_bytes", "grad_bytes", "optimizer_state_bytes"),
    "saved activations": ("activation_bytes",),
    "attention transient": ("transient_bytes",),
}


def _parts(pred: dict) -> dict:
    return {k: sum(pred.get(f, 0) for f in fields) for k, fields in _PARTS.items()}


def _largest_gap(a: dict, b: dict) -> tuple[str, float, float]:
    key = max(a, key=lambda k: abs(a[k] - b.get(k, 0.0)))
    return key, a[key], b.get(key, 0.0)


def _drivers(a: AssumptionSet, c144: dict, s3456: dict) -> dict:
    """Per claim, the modelled term that drives it under this set (computed, not assumed)."""
    t6 = c144[SP_DEGREES[0]]
    k, sp, ls = _largest_gap(t6["sp"]["time_breakdown_s"], t6["lss"]["time_breakdown_s"])
    speed = f"{k} {sp:.3g} s (SP t6) vs {ls:.3g} s (LSS)"
    k, sp, ls = _largest_gap(_parts(t6["sp"]), _parts(t6["lss"]))
    memory = f"{k} {sp / 1e9:.2f} GB (SP t6) vs {ls / 1e9:.2f} GB (LSS)"
    run = s3456["run"]
    bd = run["time_breakdown_s"]
    top = max(bd, key=bd.get)
    comm = (bd["sp_comm_exposed"] + bd["grad_comm"]) / run["step_time_s"]
    scale = f"{top} {bd[top] / run['step_time_s']:.0%} of the step; communication {comm:.0%}"
    at = predict(at_length(setup_3456(a), s3456["longest"]))
    parts = _parts(at)
    biggest = max(parts, key=parts.get)
    fit = (
        f"{biggest} {parts[biggest] / 1e9:.1f} of {at['peak_bytes'] / 1e9:.1f} GB at the longest l"
    )
    return {
        "speedup": speed,
        "memory": memory,
        "efficiency": scale,
        "throughput": scale,
        "longest": fit,
    }


def _readings(c144: dict, s3456: dict) -> dict:
    """Per claim, {reading: modelled value in the claim's unit}."""
    t = SP_DEGREES
    return {
        "speedup": {
            **{f"per_iteration_t{x}": c144[x]["per_iteration"] for x in t},
            **{f"equal_tokens_t{x}": c144[x]["equal_tokens"] for x in t},
        },
        "memory": {
            **{f"bytes_per_gpu_t{x}": c144[x]["bytes_ratio"] for x in t},
            **{f"longest_l_t{x}": c144[x]["longest_ratio"] for x in t},
        },
        "efficiency": {
            "causal_flops": 100 * s3456["efficiency"],
            "full_square_flops": 100 * s3456["efficiency_full_square"],
            "token_rate": 100 * s3456["token_rate_efficiency"],
        },
        "throughput": {
            "causal_flops": s3456["flops_per_s"] / 1e15,
            "full_square_flops": s3456["flops_per_s_full_square"] / 1e15,
        },
        "longest": {"longest_l_n144_d24": float(s3456["longest"])},
    }


_CLAIM_ASSUMPTIONS = {
    "speedup": "NVIDIA SP head-capped at t = 6 (one node) / 12 (two nodes), D = 144 / t; LSS "
    f"N = 144, D = 1; l {SEQ_144:,}; per iteration = one sequence per replica, "
    "equal tokens = the same sequences per step",
    "memory": "bytes = weights + master + grads + AdamW + saved activations + one layer's "
    f"attention-backward transient at l {SEQ_144:,}; longest l within 16 GB (steps "
    "of 144)",
    "efficiency": "weak scaling, LSS N = 144 x D = 24, 348 tokens per GPU, against one GPU at "
    "l 348; per-GPU FLOP rate (causal or full-square FLOPs) or token rate",
    "throughput": "model FLOPs per step (causal pairs, or the full l^2 square) over the "
    "predicted step time, N = 144 x D = 24",
    "longest": "LSS N = 144 x D = 24 (one sequence per replica), longest l whose peak bytes fit "
    "16 GB (steps of 144)",
}


def summit_paper(assumptions: tuple[str, ...] = SETS, options: Options | None = None) -> dict:
    """One row per claim: the paper's number, the model's readings under each assumption set,
    their ratios model / claim, what drives them; the underlying predictions in ``details``."""
    opts = options or Options()
    sets = [get_set(a) for a in assumptions]
    details, readings, drivers = {}, {}, {}
    for a in sets:
        c144 = _comparison_144(a, opts)
        s3456 = _scale_3456(a, opts)
        readings[a.name] = _readings(c144, s3456)
        drivers[a.name] = _drivers(a, c144, s3456)
        details[a.name] = {"144": c144, "3456": s3456, "layouts": _layouts(a)}
    claims = []
    for key, claim in PAPER_CLAIMS.items():
        model = {a.name: readings[a.name][key] for a in sets}
        claims.append(
            {
                "claim": key,
                "label": claim["label"],
                "paper": claim["value"],
                "unit": claim["unit"],
                "refers_to": claim["refers_to"],
                "model": model,
                "model_over_claim": {
                    s: {r: v / claim["value"] for r, v in m.items()} for s, m in model.items()
                },
                "assumptions": _CLAIM_ASSUMPTIONS[key],
                "driven_by": {a.name: drivers[a.name][key] for a in sets},
            }
        )
    return {
        "device": get_device(DEVICE).name,
        "assumption_sets": {a.name: a.about for a in sets},
        "options": {
            "overlap_kv_gather": opts.overlap_kv_gather,
            "baseline_recompute": opts.baseline_recompute,
        },
        "claims": claims,
        "sources": [dict(zip(("assumption", "value", "source"), s, strict=True)) for s in SOURCES],
        "details": details,
    }


def _layouts(a: AssumptionSet) -> dict:
    """The dtype and attention kernel each side runs under set `a` (from the configs used)."""
    out = {}
    for mode, degree in (("lss", LSS_DEGREE), ("nvidia-sp", SP_DEGREES[0])):
        cfg = setup_144(a, mode, degree)
        out[mode] = {
            "dtype": cfg["train"]["dtype"],
            "attention_kernel": layout_from_config(cfg).attention_kernel,
        }
    return out


# --- the figures' data --------------------------------------------------------------------------
RANKS_SERIES = (6, 12, 24, 48, 72, 144)
LENGTHS_144 = tuple(2304 * k for k in (1, 2, 3, 4, 6, 8, 12, 16))
WEAK_DEGREES = (2, 4, 8, 24, 72, 144)


def _frame(rows: list[dict], columns: list[str], aset: str) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    df["kind"] = "modelled"
    df.attrs.update(kind="modelled", assumptions=aset, device=DEVICE)
    return df


def _speedup_rows(a: AssumptionSet, opts: Options) -> list[dict]:
    rows = []
    for p in RANKS_SERIES:
        lss_degrees = sorted({p, *(n for n in EQUAL_RANKS_LSS if p == RANKS)})
        for n in lss_degrees:
            for t in (x for x in SP_DEGREES if p % x == 0):
                pair = _pair_144(a, n, t, opts, ranks=p)
                rows.append(
                    {
                        "ranks": p,
                        "lss_seq_parallel": n,
                        "sp_tensor_parallel": t,
                        "speedup_per_iteration": pair["per_iteration"],
                        "speedup_equal_tokens": pair["equal_tokens"],
                    }
                )
    return rows


def _memory_rows(a: AssumptionSet, opts: Options) -> list[dict]:
    rows = []
    sides = [
        ("lss", LSS_DEGREE, "none"),
        *(("nvidia-sp", t, opts.baseline_recompute) for t in SP_DEGREES),
    ]
    for mode, degree, recompute in sides:
        cfg = setup_144(a, mode, degree, recompute=recompute)
        for ll in LENGTHS_144:
            pred = predict(at_length(cfg, ll))
            rows.append(
                {
                    "mode": mode,
                    "degree": degree,
                    "seq_length": ll,
                    "bytes_per_rank": pred["peak_bytes"],
                    "held_bytes_per_rank": pred["memory_bytes"],
                }
            )
    return rows


LOCAL_KV_SERIES = {
    "lss-local": {"lss_save_kv": "local"},
    "lss-local-zero1": {"lss_save_kv": "local", "zero_stage": 1},
    "lss-local-zero2": {"lss_save_kv": "local", "zero_stage": 2},
}
"""The longest-l series of LSS with K/V kept local (issue 21), alone and with ZeRO-1 / ZeRO-2
over all P GPUs: the flash-kernel assumption sets only (the trainer keeps K/V local with the
flash kernel alone; a materialised-scores kernel saves its own copies)."""


def _longest_rows(a: AssumptionSet, opts: Options) -> list[dict]:
    """Per GPU count: LSS at N = P, NVIDIA SP at its head-capped t, and under a flash-kernel
    assumption set LSS with K/V kept local (`LOCAL_KV_SERIES`); ``variant`` names the series."""
    local = LOCAL_KV_SERIES if a.attention_kernel == "flash" else {}
    rows = []
    for p in RANKS_SERIES:
        t = head_capped_degree(p)
        for variant, mode, degree, recompute, flags in (
            ("lss", "lss", p, "none", {}),
            *((v, "lss", p, "none", f) for v, f in local.items()),
            ("nvidia-sp", "nvidia-sp", t, opts.baseline_recompute, {}),
        ):
            cfg = setup_144(a, mode, degree, ranks=p, recompute=recompute, **flags)
            rows.append(
                {
                    "variant": variant,
                    "mode": mode,
                    "ranks": p,
                    "degree": degree,
                    "longest_seq_length": longest(cfg, lcm(p, 16), opts),
                }
            )
    return rows


def _weak_rows(a: AssumptionSet, opts: Options) -> list[dict]:
    rows, ref = [], None
    for n in WEAK_DEGREES:
        w = _weak_point(a, n, opts, ref)
        ref = w["reference"]
        rows.append(
            {
                "ranks": w["ranks"],
                "seq_parallel": n,
                "seq_length": w["seq_length"],
                "efficiency": w["efficiency"],
                "efficiency_full_square": w["efficiency_full_square"],
                "token_rate_efficiency": w["token_rate_efficiency"],
                "flops_per_s": w["flops_per_s"],
                "flops_per_s_full_square": w["flops_per_s_full_square"],
            }
        )
    return rows


def paper_series(assumptions: str, options: Options | None = None) -> dict[str, pd.DataFrame]:
    """The modelled series of the paper figures under one assumption set (every value
    modelled: a ``kind`` column and ``attrs['kind']`` say so):

    * ``speedup_vs_ranks``: ranks, lss_seq_parallel, sp_tensor_parallel,
      speedup_per_iteration, speedup_equal_tokens (LSS at N = ranks, and at 144 ranks the
      equal-ranks series N in {6, 24, 144}, against NVIDIA SP at t in {6, 12});
    * ``memory_vs_length``: mode, degree, seq_length, bytes_per_rank (peak: held +
      transient), held_bytes_per_rank (weights, masters, gradients, optimizer state and saved
      activations: the model's ``memory_bytes``) (LSS N = 144; NVIDIA SP t = 6, 12; 144 GPUs);
    * ``longest_vs_ranks``: variant, mode, ranks, degree, longest_seq_length (LSS N = ranks,
      NVIDIA SP at its head-capped degree; under ``modern`` also LSS with K/V kept local, alone
      and with ZeRO-1 / ZeRO-2, `LOCAL_KV_SERIES`) within the V100's 16 GB;
    * ``weak_scaling``: ranks, efficiency (causal FLOP rate per GPU over one GPU's at l 348),
      and the full-square and token-rate readings (N x 24 GPUs, l = 348 N);
    * ``throughput``: ranks, flops_per_s (causal), flops_per_s_full_square.
    """
    opts = options or Options()
    a = get_set(assumptions)
    weak = _weak_rows(a, opts)
    return {
        "speedup_vs_ranks": _frame(
            _speedup_rows(a, opts),
            [
                "ranks",
                "lss_seq_parallel",
                "sp_tensor_parallel",
                "speedup_per_iteration",
                "speedup_equal_tokens",
            ],
            a.name,
        ),
        "memory_vs_length": _frame(
            _memory_rows(a, opts),
            ["mode", "degree", "seq_length", "bytes_per_rank", "held_bytes_per_rank"],
            a.name,
        ),
        "longest_vs_ranks": _frame(
            _longest_rows(a, opts),
            ["variant", "mode", "ranks", "degree", "longest_seq_length"],
            a.name,
        ),
        "weak_scaling": _frame(
            weak,
            [
                "ranks",
                "seq_parallel",
                "seq_length",
                "efficiency",
                "efficiency_full_square",
                "token_rate_efficiency",
            ],
            a.name,
        ),
        "throughput": _frame(
            weak, ["ranks", "seq_length", "flops_per_s", "flops_per_s_full_square"], a.name
        ),
    }


# --- printing -----------------------------------------------------------------------------------
_SHORT = {
    "per_iteration": "iter",
    "equal_tokens": "tok",
    "bytes_per_gpu": "bytes",
    "longest_l": "longest",
    "causal_flops": "causal",
    "full_square_flops": "square",
    "token_rate": "tokens",
    "longest_l_n144_d24": "N144xD24",
}


def _short(reading: str) -> str:
    for key, short in sorted(_SHORT.items(), key=lambda kv: -len(kv[0])):
        if reading.startswith(key):
            return short + reading[len(key) :].replace("_", " ")
    return reading


def _value(v: float, unit: str) -> str:
    if unit == "tokens":
        return f"{v:,.0f}"
    return f"{v:.2f}x" if unit == "x" else f"{v:.3g}{'%' if unit == '%' else ''}"


def _cell(values: dict, unit: str) -> str:
    return ", ".join(f"{_short(r)} {_value(v, unit)}" for r, v in values.items())


def print_report(report: dict) -> None:
    sets = list(report["assumption_sets"])
    print(
        f"summit-paper: the paper's claims against the cost model ({report['device']}); every "
        "model number is modelled, not measured"
    )
    for name, about in report["assumption_sets"].items():
        print(f"  {name}: {about}")
    print(f"  options: {report['options']}\n")
    head = ["claim"] + [f"model under {s}" for s in sets] + ["model/claim", "driven by"]
    print(" | ".join(head))
    for c in report["claims"]:
        unit = {"PFLOP/s": " PFLOP/s", "tokens": " tokens"}.get(c["unit"], "")
        paper = f"{c['label']}: {_value(c['paper'], c['unit'])}{unit}"
        cells = [_cell(c["model"][s], c["unit"]) for s in sets]
        ratios = " ; ".join(
            f"{s}: "
            + ", ".join(f"{_short(r)} {v:.2f}" for r, v in c["model_over_claim"][s].items())
            for s in sets
        )
        drive = " ; ".join(f"{s}: {c['driven_by'][s]}" for s in sets)
        print(" | ".join([paper, *cells, ratios, f"{c['assumptions']}; {drive}"]))
    print(
        "\nunits: speed and memory as ratios (NVIDIA SP / LSS, x), efficiency %, throughput "
        "PFLOP/s, length tokens; t6 / t12: the baseline's tensor-parallel degree"
    )
    for s in sets:
        lay = report["details"][s]["layouts"]
        print(
            f"layouts under {s}: "
            + "; ".join(f"{m} {v['dtype']} {v['attention_kernel']}" for m, v in lay.items())
        )
    print("\nassumption | value | source")
    for row in report["sources"]:
        print(f"  {row['assumption']} | {row['value']} | {row['source']}")
    print(
        "\nReproduce: python -m analysis.costmodel --preset summit-paper "
        "[--assumptions paper-2023|modern] [--overlap-kv-gather] "
        "[--baseline-recompute selective] [--json]"
    )
