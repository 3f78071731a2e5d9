"""Analytic cost model: FLOPs, communication bytes, memory and step time per rank.

Modes: ``serial``, ``lss``, ``nvidia-sp`` (what the trainer runs; bytes communicated and saved for
backward are derived from its code and Megatron-Core's, and agree exactly with what it counts),
and ``ulysses`` (DeepSpeed-Ulysses) and ``ring`` (ring attention), peers the trainer does not run.
Step times come from a roofline plus an alpha-beta network with intra- and inter-node links
(`hw`), for device presets ``v100-summit``, ``a100``, ``h100``, ``h200``.

    from analysis.costmodel import predict, make_config
    predict(json.load(open("runs/x/config.json")))            # the trainer's effective config
    predict(make_config("lss", 144, 24, num_layers=12, hidden_size=512, num_heads=8,
                        seq_length=50112, global_batch_size=24), device="v100-summit")

The package, from the ground up: `counts` (exact per-rank counts: its own formulas, the check on
the trainer's counters), `hw` (devices, network), `steptime` (step time), `configs` (configurations
from the trainer's own schema and validation, plus what-ifs), this module (the API: `predict`,
`peers`, `compare_run`), `paper` (the summit-paper preset) and `__main__` (the CLI)::

    python -m analysis.costmodel --preset summit-paper      # the paper's claims vs this model
    python -m analysis.costmodel --preset summit-paper --set mode=ulysses   # a hypothetical layout
    python -m analysis.costmodel --run runs/latest          # a finished run: predicted vs counted
    python -m analysis.costmodel --config runs/x/config.json --device h200

Formulas, network model and assumptions: docs/costmodel.md.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from .calibrated import CalibratedDevice, NotCalibrated, find_device_file, load_device_file
from .configs import config_from_model, config_from_preset, layout_problems, make_config
from .counts import (
    FP32,
    MODES,
    activation_bytes,
    attention_imbalance,
    document_attention_fraction,
    document_attention_imbalance,
    grad_comm,
    kv_transient_bytes,
    layout_from_config,
    model_flops_per_step,
    optimizer_state_bytes,
    other_comm,
    param_count,
    parameters,
    shape_from_config,
    sp_bytes_per_micro_batch,
    sp_calls_per_micro_batch,
    transient_bytes,
    zero_counts,
)
from .hw import DEVICES, Device, Network, get_device
from .steptime import Assumptions, step_time

__all__ = [
    "DEVICES",
    "MODES",
    "Assumptions",
    "CalibratedDevice",
    "Device",
    "Network",
    "compare_run",
    "find_device_file",
    "load_device_file",
    "config_from_model",
    "config_from_preset",
    "layout_problems",
    "make_config",
    "peers",
    "predict",
]

COUNTED = (
    "sp_comm_bytes",
    "grad_comm_bytes",
    "other_comm_bytes",
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "model_flops_per_step",
)
"""Fields the trainer writes to metrics.jsonl that `predict` must reproduce exactly."""


def predict(
    config: dict,
    device: str | Device | CalibratedDevice | None = None,
    assumptions: Assumptions | None = None,
    document_lengths=None,
) -> dict:
    """Per-rank costs of one optimizer step of the run `config` (the trainer's config.json).

    `document_lengths` (token counts of the packed documents, an empirical distribution): with
    ``--reset-attention-mask`` in `config`, also ``attention_flops_vs_causal`` (expected pairs
    within documents over causal pairs, `counts.document_attention_fraction`) and LSS's
    ``attention_imbalance`` under document masks (`counts.document_attention_imbalance`).

    Counts (rank 0, per step, as the trainer counts them): ``sp_comm_bytes``,
    ``grad_comm_bytes``, ``other_comm_bytes`` (+ ``*_calls``), ``activation_bytes`` (one
    micro-batch), ``param_bytes``, ``grad_bytes``, ``optimizer_state_bytes``, ``memory_bytes``
    (their sum), ``model_flops_per_step``; for LSS ``attention_imbalance`` (max / mean
    attention pairs over the sequence group) and ``kv_transient_bytes`` (one gather's full-length
    [dK | dV], divided by ``--kv-gather-chunks``); ``transient_bytes`` (an estimate of one
    layer's attention-backward transient: input gradients, and with materialised scores the
    score gradients, `counts.transient_bytes`) and ``peak_bytes`` = ``memory_bytes`` + it.
    With ``train.zero_stage`` 1 or 2 the
    parameter, gradient and optimizer bytes and the gradient traffic are DeepSpeed ZeRO's
    (`counts.zero_counts`: state about 1/P, padded partitions). With a `device`:
    ``step_time_s``, ``time_breakdown_s``, ``achieved_flops_per_s``, ``fits_memory``
    (``peak_bytes`` within the device's memory); a `CalibratedDevice` (``python -m
    analysis.calibrate``) times the run with its measured rates instead of the GPU roofline's
    (`steptime.step_time` prices either).
    """
    s = shape_from_config(config["model"])
    lay = layout_from_config(config)
    optimizer = config["train"].get("optimizer", "adamw")
    grad_b, grad_c = grad_comm(s, lay)
    other_b, other_c = other_comm(s, lay)
    params = param_count(s, lay)
    out: dict = {
        "mode": lay.mode,
        "world_size": lay.world,
        "seq_parallel": lay.n,
        "data_parallel": lay.d,
        "attention_kernel": lay.attention_kernel,
        "recompute": lay.recompute,
        "sp_comm_bytes": lay.micro_batches * sp_bytes_per_micro_batch(s, lay),
        "sp_comm_calls": lay.micro_batches * sp_calls_per_micro_batch(s, lay),
        "grad_comm_bytes": grad_b,
        "grad_comm_calls": grad_c,
        "other_comm_bytes": other_b,
        "other_comm_calls": other_c,
        "activation_bytes": activation_bytes(s, lay),
        "parameters_per_rank": params,
        "param_tensors": len(parameters(s, lay)),
        "param_bytes": params * lay.param_bytes,
        "grad_bytes": params * lay.grad_elem,
        "optimizer_state_bytes": optimizer_state_bytes(s, lay, optimizer),
        "model_flops_per_step": model_flops_per_step(s, lay.global_batch),
        "attention_imbalance": attention_imbalance(s, lay),
        "kv_transient_bytes": kv_transient_bytes(s, lay),
        "zero_stage": lay.zero_stage,
    }
    if document_lengths is not None and config["train"].get("reset_attention_mask"):
        out["attention_flops_vs_causal"] = document_attention_fraction(document_lengths, s.seq)
        if out["attention_imbalance"] is not None:  # a mode that reports it (lss)
            out["attention_imbalance"] = document_attention_imbalance(document_lengths, s, lay)
    if lay.zero_stage:
        out.update(zero_counts(s, lay, optimizer))
    if lay.master_weights and not lay.zero_stage:
        out["master_param_bytes"] = params * FP32
    out["memory_bytes"] = (
        out["param_bytes"]
        + out.get("master_param_bytes", 0)
        + out["grad_bytes"]
        + out["optimizer_state_bytes"]
        + out["activation_bytes"]
    )
    out["transient_bytes"] = transient_bytes(s, lay)
    out["peak_bytes"] = out["memory_bytes"] + out["transient_bytes"]
    if device is not None:
        dev = device if isinstance(device, CalibratedDevice) else get_device(device)
        if assumptions is not None:
            dev = replace(dev, assumptions=assumptions)
        try:
            timing = step_time(s, lay, dev, optimizer)
        except NotCalibrated as e:  # a 16-bit run on an fp32-only calibration: no time
            timing = {"step_time_s": None, "step_time_note": str(e)}
        out.update(timing)
        out["device"] = dev.name
        if timing["step_time_s"] is not None:
            out["achieved_flops_per_s"] = out["model_flops_per_step"] / timing["step_time_s"]
        out["fits_memory"] = out["peak_bytes"] <= dev.memory_bytes
    return out


def peers(
    config: dict,
    device: str | Device | None = None,
    modes: tuple[str, ...] = ("lss", "nvidia-sp", "ulysses", "ring"),
    assumptions: Assumptions | None = None,
) -> dict:
    """The same model, batch and N x D grid under each of `modes`: {mode: prediction}, or
    {mode: {"problems": [...]}} for a mode that cannot run this layout."""
    out = {}
    for mode in modes:
        c = json.loads(json.dumps(config))
        c["parallel"]["mode"] = mode
        c.setdefault("costmodel", {})["attention_kernel"] = c.get("costmodel", {}).get(
            "attention_kernel", "auto"
        )
        problems = layout_problems(c)
        out[mode] = {"problems": problems} if problems else predict(c, device, assumptions)
    return out


def measured_step_time(rows: list[dict]) -> float | None:
    """The trainer's statistic (`metrics.step_time_summary`): the median over the steps after
    the first of ``step_time_s`` (the slowest rank's), all steps when there is only one."""
    times = [
        r["step_time_s"]
        for r in sorted(rows, key=lambda r: r.get("step", 0))
        if isinstance(r.get("step_time_s"), int | float)
    ]
    steady = times[1:] if len(times) > 1 else times
    return statistics.median(steady) if steady else None


def compare_run(run_dir: str | Path, device: CalibratedDevice | None = None) -> dict:
    """Predicted against counted for a finished run: {field: (predicted, counted)} over every
    metrics.jsonl row (counted values must be the same in every row); with a calibrated `device`
    also ``step_time_s``: (predicted, measured by `measured_step_time`)."""
    run = Path(run_dir)
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    pred = predict(config, device)
    out = {}
    for key in (*COUNTED, "activation_bytes"):
        counted = sorted({r[key] for r in rows if key in r})
        out[key] = (pred[key], counted[0] if len(counted) == 1 else counted)
    if device is not None:
        out["step_time_s"] = (pred["step_time_s"], measured_step_time(rows))
        if pred.get("step_time_note"):
            out["step_time_note"] = pred["step_time_note"]
    return out
