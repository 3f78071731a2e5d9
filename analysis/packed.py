"""cpu-packed: every mode on packed documents against unpacked runs of the same tokens.

    python -m analysis.packed --out runs/cpu-packed [--steps 3]

Two document-length mixes (`MIXES`) are written as JSONL and converted with
``make_indexed --json-keys text --append-eod`` into ``OUT/data/MIX``. For each mix and each mode
(`MODES`: serial on one rank; lss contiguous, lss zigzag, nvidia-sp, ulysses and ring on N = 4
ranks)
the trainer runs twice on the same samples: packed (``--reset-position-ids
--reset-attention-mask --eod-mask-loss``) and unpacked (no flags: plain causal attention over
the same tokens). The table (``OUT/packed.csv``, printed as markdown) gives per run the step time
(the trainer's median after warm-up), the attention FLOPs of the step summed over the sequence
group and their max / mean over its ranks, the packed / unpacked ratios of both, LSS's
``kv_needed_fraction`` (the K/V bytes a gather of only the needed keys would move, of the
all-gather's) and ``kv_unneeded_bytes`` (the sp bytes per rank and step carrying keys no
receiving query sees, `tables.read_run`) and the cost model's predicted attention-FLOP fraction for the mix's document
lengths (`analysis.costmodel.counts.document_attention_fraction`). The load average is recorded
before and after every run. Runs are sequential; CPU timings are noisy, FLOPs and bytes exact.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from .compare import load_1m, run_trainer, torchrun_command
from .costmodel.counts import document_attention_fraction
from .mixes import write_mix
from .presets import RunSpec
from .tables import read_run

L, N = 1024, 4
MIXES = {
    "short": (16, 160),
    "long": (256, 3072),
}
"""Document lengths in bytes, uniform in [lo, hi] (plus the EOD token): short documents (mean
~88 tokens, ~12 per sequence) and long ones (mean ~1,660: most sequences hold one or two)."""
MODES = {
    "serial": ("serial", 1, {}),
    "lss": ("lss", N, {}),
    "lss-zigzag": ("lss", N, {"lss-layout": "zigzag"}),
    "nvidia-sp": ("nvidia-sp", N, {}),
    "ulysses": ("ulysses", N, {}),
    "ring": ("ring", N, {}),
}
MODEL = {
    "num-layers": 2,
    "hidden-size": 256,
    "num-heads": 8,
    "num-kv-heads": 4,
    "ffn-hidden-size": 256,
    "vocab-size": 257,
    "make-vocab-size-divisible-by": 4,
    "position-embedding": "learned",
}
FLAGS = {"reset-position-ids": True, "reset-attention-mask": True, "eod-mask-loss": True}


def make_mix(folder: Path, name: str, tokens: int = 400_000, seed: int = 0) -> tuple[str, list]:
    """Write OUT/data/NAME.jsonl and its indexed dataset (`mixes.write_mix`); returns (prefix,
    document lengths in tokens, EOD included)."""
    lo, hi = MIXES[name]
    return write_mix(folder, name, lo, hi, tokens, seed)


def trainer_command(mode: str, n: int, extra: dict, data: str, out: Path, steps: int) -> list:
    """The trainer command of one run, built by the compare harness (`compare.torchrun_command`
    of a `presets.RunSpec`): the one place a run configuration becomes a trainer command."""
    flags = {
        "mode": mode,
        "seq-parallel": n,
        "seq-length": L,
        **MODEL,
        "global-batch-size": 2,
        "micro-batch-size": 1,
        "steps": steps,
        "data": "megatron",
        "data-path": data,
        "overwrite": True,
        **extra,
    }
    run = RunSpec(mode, n, 1, L, 0, "grid", flags)
    return torchrun_command(run, out)


def kv_need_count(
    prefix: str,
    n: int,
    layout: str,
    *,
    seq_length: int = L,
    steps: int = 3,
    batch: int = 2,
    seed: int = 1234,
) -> dict:
    """Exact count, from the document starts alone (no training), of what LSS's K/V all-gather
    brings that no query needs: for the first `steps` training steps of `batch` samples of one
    row each (micro-batch 1, the presets' recipe), on each of the `n` ranks (`layout`), the other
    ranks' key positions some local query sees (`lss.documents.needed_remote_keys`) against the
    (N-1) l/N the gather brings. Returns the totals and, per rank, the needed fraction; bytes
    follow as positions x b x 2 h_kv d x element size, per layer, forward (gather) and again
    backward (reduce-scatter)."""
    import torch

    from lss_megatron.data import build_dataset
    from lss_megatron.data.documents import document_starts
    from lss_megatron.data.make_indexed import EOD_TOKEN
    from lss_megatron.lss.documents import needed_remote_keys
    from lss_megatron.lss.positions import local_positions

    ds = build_dataset(
        "megatron",
        seq_length=seq_length,
        vocab_size=257,
        seed=seed,
        path=prefix,
        eval_batch_size=batch,
    )
    needed, gathered = [0] * n, [0] * n
    for step in range(1, steps + 1):
        for i in range(batch):
            rows = torch.from_numpy(ds.read("train", step, [i], 0, seq_length - 1))  # [1, l]
            starts = document_starts(rows, EOD_TOKEN)  # [1, l]
            for r in range(n):
                held = local_positions(seq_length, r, n, layout)  # [l/N]
                needed[r] += needed_remote_keys(starts, held)
                gathered[r] += (n - 1) * (seq_length // n)
    return {
        "n": n,
        "layout": layout,
        "needed_positions": sum(needed),
        "gathered_positions": sum(gathered),
        "needed_fraction": sum(needed) / sum(gathered),
        "needed_fraction_per_rank": [a / b for a, b in zip(needed, gathered, strict=True)],
    }


def run_one(label, mix, packed, data, out: Path, steps: int, timeout_s: float) -> dict:
    mode, n, extra = MODES[label]
    run_dir = out / "runs" / f"{label}_{mix}_{'packed' if packed else 'unpacked'}"
    before = load_1m()
    cmd = trainer_command(mode, n, {**extra, **(FLAGS if packed else {})}, data, run_dir, steps)
    outcome = run_trainer(cmd, run_dir, timeout_s)
    row = {"mode": label, "mix": mix, "packed": packed, "status": outcome["status"]}
    row.update(load_1m_before=before, load_1m_after=load_1m(), error=outcome["error"])
    if outcome["status"] != "ok":
        return row
    measured = read_run(run_dir)
    steps_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = steps_rows[-1]
    per_rank = last.get("attention_flops_per_rank") or []
    row.update(
        step_time_s=measured["step_time_s"],
        sp_comm_bytes=measured["sp_comm_bytes"],
        attention_flops=sum(per_rank) if per_rank else math.nan,
        attention_max_over_mean=last.get("attention_imbalance", math.nan),
        attention_flops_vs_causal=last.get(
            "attention_flops_vs_causal", 1.0 if per_rank else math.nan
        ),
        kv_needed_fraction=last.get("kv_needed_fraction", math.nan),
        kv_unneeded_bytes=measured["kv_unneeded_bytes"],
        final_loss=measured["final_loss"],
    )
    return row


def table(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    ok = df[df["status"] == "ok"]
    key = ["mode", "mix"]
    unpacked = ok[~ok["packed"]].set_index(key)
    out = []
    for r in ok[ok["packed"]].itertuples():
        base = unpacked.loc[(r.mode, r.mix)] if (r.mode, r.mix) in unpacked.index else None
        t0 = base["step_time_s"] if base is not None else math.nan
        f0 = base["attention_flops"] if base is not None else math.nan
        out.append(
            {
                "mode": r.mode,
                "mix": r.mix,
                "attn FLOPs packed": f"{r.attention_flops:.3g}",
                "attn FLOPs ratio": f"{r.attention_flops / f0:.3f}",
                "predicted ratio": f"{r.predicted_fraction:.3f}",
                "attn max/mean packed": f"{r.attention_max_over_mean:.3f}",
                "attn max/mean unpacked": f"{base['attention_max_over_mean']:.3f}"
                if base is not None
                else "",
                "K/V needed": ""
                if math.isnan(r.kv_needed_fraction)
                else f"{r.kv_needed_fraction:.3f}",
                "K/V unneeded B": ""
                if math.isnan(getattr(r, "kv_unneeded_bytes", math.nan))
                else f"{r.kv_unneeded_bytes:,.0f}",
                "step s packed": f"{r.step_time_s:.3f}",
                "step s unpacked": f"{t0:.3f}",
                "time ratio": f"{r.step_time_s / t0:.3f}",
            }
        )
    if not out:
        return "(no packed run finished)"
    head = list(out[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in out]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m analysis.packed", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/cpu-packed", metavar="DIR")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    p.add_argument("--table", action="store_true", help="print the table of OUT/packed.json only")
    p.add_argument(
        "--kv-count",
        action="store_true",
        help="write the mixes and print the exact needed-K/V count of LSS's gather (no training)",
    )
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    if args.table:
        print(table(json.loads((out / "packed.json").read_text())))
        return 0
    if args.kv_count:  # this script's mixes and the cpu-packed preset's
        from .presets import get_preset

        preset = get_preset("cpu-packed")
        mixes = [(m, *MIXES[m], 400_000) for m in args.mixes]
        mixes += [
            (f"cpu-packed-{m}", lo, hi, preset.document_tokens) for m, lo, hi in preset.documents
        ]
        for name, lo, hi, tokens in mixes:
            data, _ = write_mix(out / "data", name, lo, hi, tokens)
            for n in (2, 4):
                for layout in ("contiguous", "zigzag"):
                    count = kv_need_count(data, n, layout)
                    print(json.dumps({"mix": name, "doc_bytes": [lo, hi], **count}), flush=True)
        return 0
    rows = []
    for mix in args.mixes:
        data, lengths = make_mix(out / "data", mix)
        predicted = document_attention_fraction(lengths, L)
        for label in args.modes:
            for packed in (True, False):
                row = run_one(label, mix, packed, data, out, args.steps, args.timeout_s)
                row["predicted_fraction"] = predicted
                rows.append(row)
                print(json.dumps(row), flush=True)
    (out / "packed.json").write_text(json.dumps(rows, indent=1) + "\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "packed.csv", index=False)
    loads = [r[k] for r in rows for k in ("load_1m_before", "load_1m_after")]
    print(table(rows))
    print(
        f"load average (1 min) over the runs: median {statistics.median(loads):.1f}, "
        f"max {max(loads):.1f}"
    )
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
