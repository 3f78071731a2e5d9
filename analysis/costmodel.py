"""Analytic cost model: FLOPs, communication bytes, memory and step time per rank.

Modes: ``serial``, ``lss``, ``nvidia-sp`` (what the trainer runs; bytes communicated and saved for
backward are derived from its code and Megatron-Core's, and agree exactly with what it counts),
and ``ulysses`` (DeepSpeed-Ulysses) and ``ring`` (ring attention), peers the trainer does not run.
Step times come from a roofline plus an alpha-beta network with intra- and inter-node links
(`costmodel_hw`), for device presets ``v100-summit``, ``a100``, ``h100``, ``h200``.

    from analysis.costmodel import predict, make_config
    predict(json.load(open("runs/x/config.json")))            # the trainer's effective config
    predict(make_config("lss", 144, 24, num_layers=12, hidden_size=512, num_heads=8,
                        seq_length=50112, global_batch_size=24), device="v100-summit")

CLI::

    python -m analysis.costmodel --preset summit-paper      # the paper's claims vs this model
    python -m analysis.costmodel --preset summit-paper --set mode=ulysses   # a hypothetical layout
    python -m analysis.costmodel --run runs/latest          # a finished run: predicted vs counted
    python -m analysis.costmodel --config runs/x/config.json --device h200

Formulas, network model and assumptions: docs/costmodel.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .costmodel_counts import (
    FP32,
    MODES,
    activation_bytes,
    attention_imbalance,
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
    zero_counts,
)
from .costmodel_hw import DEVICES, Device, Network, get_device
from .costmodel_time import Assumptions, step_time

__all__ = [
    "DEVICES",
    "MODES",
    "Assumptions",
    "Device",
    "Network",
    "compare_run",
    "config_from_preset",
    "layout_problems",
    "make_config",
    "peers",
    "predict",
]

COUNTED = ("sp_comm_bytes", "grad_comm_bytes", "other_comm_bytes", "param_bytes", "grad_bytes",
           "optimizer_state_bytes", "model_flops_per_step")  # fmt: skip
"""Fields the trainer writes to metrics.jsonl that `predict` must reproduce exactly."""


def predict(
    config: dict, device: str | Device | None = None, assumptions: Assumptions | None = None
) -> dict:
    """Per-rank costs of one optimizer step of the run `config` (the trainer's config.json).

    Counts (rank 0, per step, as the trainer counts them): ``sp_comm_bytes``,
    ``grad_comm_bytes``, ``other_comm_bytes`` (+ ``*_calls``), ``activation_bytes`` (one
    micro-batch), ``param_bytes``, ``grad_bytes``, ``optimizer_state_bytes``, ``memory_bytes``
    (their sum), ``model_flops_per_step``; for LSS ``attention_imbalance`` (max / mean
    attention pairs over the sequence group) and ``kv_transient_bytes`` (one gather's full-length
    [dK | dV], divided by ``--kv-gather-chunks``). With ``train.zero_stage`` 1 or 2 the
    parameter, gradient and optimizer bytes and the gradient traffic are DeepSpeed ZeRO's
    (`costmodel_counts.zero_counts`: state about 1/P, padded partitions). With a `device`:
    ``step_time_s``, ``time_breakdown_s``, ``achieved_flops_per_s``, ``fits_memory``.
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
    if lay.master_weights and not lay.zero_stage:
        out["master_param_bytes"] = params * FP32
    if lay.zero_stage:
        out.update(zero_counts(s, lay, optimizer))
    out["memory_bytes"] = (
        out["param_bytes"] + out.get("master_param_bytes", 0) + out["grad_bytes"]
        + out["optimizer_state_bytes"] + out["activation_bytes"]
    )  # fmt: skip
    if device is not None:
        dev = get_device(device)
        timing = step_time(s, lay, dev, assumptions or Assumptions(), optimizer)
        out.update(timing)
        out["device"] = dev.name
        out["achieved_flops_per_s"] = out["model_flops_per_step"] / timing["step_time_s"]
        out["fits_memory"] = out["memory_bytes"] <= dev.memory_bytes
    return out


def make_config(
    mode: str,
    seq_parallel: int,
    data_parallel: int,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    seq_length: int,
    global_batch_size: int,
    micro_batch_size: int | None = None,
    num_kv_heads: int | None = None,
    ffn_hidden_size: int | None = None,
    vocab_size: int = 256,
    make_vocab_size_divisible_by: int = 1,
    position_embedding: str = "learned",
    causal: bool = True,
    dtype: str = "fp32",
    optimizer: str = "adamw",
    attention_kernel: str = "auto",
    lss_layout: str = "contiguous",
) -> dict:
    """A config dict in the trainer's config.json schema, built from numbers (a hypothetical
    layout: any mode of `MODES`, any scale). ``dtype`` fp16/bf16 means half-precision
    activations and compute with fp32 master weights and gradients (the trainer's bf16 mode on
    GPU); ``attention_kernel`` "auto", "flash" or "materialized"; ``lss_layout`` "contiguous"
    or "zigzag" (balanced causal work)."""
    m = -(-vocab_size // make_vocab_size_divisible_by) * make_vocab_size_divisible_by
    b = micro_batch_size or global_batch_size // data_parallel
    return {
        "model": {
            "num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
            "num_kv_heads": num_kv_heads or num_heads,
            "ffn_hidden_size": ffn_hidden_size or 4 * hidden_size, "seq_length": seq_length,
            "vocab_size": vocab_size, "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "padded_vocab_size": m, "position_embedding": position_embedding, "causal": causal,
            "head_dim": hidden_size // num_heads,
        },
        "parallel": {"mode": mode, "world_size": seq_parallel * data_parallel,
                     "seq_parallel": seq_parallel, "data_parallel": data_parallel,
                     "lss_layout": lss_layout},
        "train": {"global_batch_size": global_batch_size, "micro_batch_size": b,
                  "num_micro_batches": global_batch_size // (data_parallel * b), "dtype": dtype,
                  "optimizer": optimizer},
        "derived": {"segment_length": seq_length // seq_parallel,
                    "tokens_per_step": global_batch_size * seq_length},
        "costmodel": {"attention_kernel": attention_kernel},
    }  # fmt: skip


def config_from_preset(path: str | Path, **overrides) -> dict:
    """`make_config` from a launch/presets/*.yaml file (flag names as keys); `overrides` use
    `make_config`'s argument names (e.g. mode="nvidia-sp", dtype="fp16")."""
    import yaml

    y = yaml.safe_load(Path(path).read_text()) or {}
    args = {
        "mode": y.get("mode", "lss"),
        "seq_parallel": int(y.get("seq-parallel", 1)),
        "data_parallel": int(y.get("data-parallel", 1)),
        "num_layers": int(y["num-layers"]),
        "hidden_size": int(y["hidden-size"]),
        "num_heads": int(y["num-heads"]),
        "seq_length": int(y["seq-length"]),
        "global_batch_size": int(y["global-batch-size"]),
        "micro_batch_size": y.get("micro-batch-size"),
        "num_kv_heads": y.get("num-kv-heads"),
        "ffn_hidden_size": y.get("ffn-hidden-size"),
        "vocab_size": int(y.get("vocab-size", 256)),
        "make_vocab_size_divisible_by": int(y.get("make-vocab-size-divisible-by", 1)),
        "position_embedding": y.get("position-embedding", "learned"),
        "causal": not y.get("no-causal", False),
        "dtype": y.get("dtype", "fp32"),
        "optimizer": y.get("optimizer", "adamw"),
    }
    args.update(overrides)
    return make_config(**args)


def layout_problems(config: dict) -> list[str]:
    """Why `config`'s mode cannot run its layout (head and vocabulary divisibility, sequence
    length), as the trainer would refuse it; empty when it can."""
    m, par = config["model"], config["parallel"]
    mode, n = par["mode"], int(par["seq_parallel"])
    kv = m.get("num_kv_heads") or m["num_heads"]
    p = []
    if m["seq_length"] % n:
        p.append(f"seq_length {m['seq_length']} not divisible by N = {n}")
    if mode == "nvidia-sp":
        for key, val in (
            ("num_heads", m["num_heads"]),
            ("num_kv_heads", kv),
            ("ffn_hidden_size", m.get("ffn_hidden_size") or 4 * m["hidden_size"]),
            ("padded_vocab_size", m.get("padded_vocab_size") or m["vocab_size"]),
        ):
            if val % n:
                p.append(f"nvidia-sp: {key} {val} not divisible by N = {n}")
    if mode == "ulysses":
        for key, val in (("num_heads", m["num_heads"]), ("num_kv_heads", kv)):
            if val % n:
                p.append(f"ulysses: {key} {val} not divisible by N = {n}")
    if mode == "serial" and n != 1:
        p.append("serial means N = 1")
    return p


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


def compare_run(run_dir: str | Path) -> dict:
    """Predicted against counted for a finished run: {field: (predicted, counted)} over every
    metrics.jsonl row (counted values must be the same in every row)."""
    run = Path(run_dir)
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    pred = predict(config)
    out = {}
    for key in (*COUNTED, "activation_bytes"):
        counted = sorted({r[key] for r in rows if key in r})
        out[key] = (pred[key], counted[0] if len(counted) == 1 else counted)
    return out


def _print_prediction(pred: dict) -> None:
    width = max(len(k) for k in pred)
    for k, v in pred.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                          for a, b in v.items())  # fmt: skip
        elif isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.costmodel", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", choices=("summit-paper",), help="the paper's claims vs the model")
    what.add_argument("--config", help="a config.json (the trainer's or make_config's)")
    what.add_argument("--run", help="a finished run folder: predicted vs counted")
    p.add_argument("--device", choices=sorted(DEVICES), default=None, help="for step times")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --preset summit-paper: predict a hypothetical layout instead, the "
        "--base preset with make_config arguments changed (e.g. mode=ulysses)",
    )
    p.add_argument("--base", choices=("144", "3456"), default="144",
                   help="the preset --set starts from")  # fmt: skip
    args = p.parse_args(argv)
    if args.preset and args.set:
        from .costmodel_paper import summit_layout

        changes = {}
        for item in args.set:
            key, _, value = item.partition("=")
            changes[key] = int(value) if value.lstrip("-").isdigit() else value
        pred = summit_layout(args.base, **changes)
        print(json.dumps(pred, indent=2)) if args.json else _print_prediction(pred)
        return 0
    if args.preset:
        from .costmodel_paper import print_report, summit_paper

        report = summit_paper()
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print_report(report)
        return 0
    if args.run:
        cmp = compare_run(args.run)
        if args.json:
            print(json.dumps(cmp, indent=2))
        else:
            for k, (pr, co) in cmp.items():
                pr = f"{pr:,}" if isinstance(pr, int | float) else str(pr)
                print(f"{k:<24} predicted {pr:>16}  counted {co!s:>16}")
        return 0
    pred = predict(json.loads(Path(args.config).read_text()), device=args.device)
    print(json.dumps(pred, indent=2)) if args.json else _print_prediction(pred)
    return 0


if __name__ == "__main__":
    sys.exit(main())
