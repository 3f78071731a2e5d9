"""Predicted against measured step times: ``python -m analysis.calibrate.validate``.

Runs the cpu-strong grid (analysis/presets.py, one repeat) and shapes no preset uses (`SHAPES`),
each a short trainer launch, predicts each with the calibrated device and writes one CSV row per
run with the load average before and after it. Outliers (|ratio - 1| > 0.25) run once more and
the run measured at the lower load average is kept (both are listed in the log).

    python -m analysis.calibrate.validate --out analysis/data/cpu/validation.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import statistics
import sys
from pathlib import Path

from lss_megatron.resources import prog

from .. import outdir
from ..compare import run_trainer, torchrun_command
from ..costmodel import compare_run, find_device_file, load_device_file, predict
from ..costmodel.calibrated import foreign_cpu_note, writable_dir
from ..outdir import check_output_file, cli, write_file
from ..presets import get_preset, make_plan

SHAPES = [  # (mode, N, D, layers, hidden, heads, kv heads, ffn, l, kernel[, recompute, zero])
    ("serial", 1, 1, 2, 192, 6, 6, 384, 768, "flash"),
    ("lss", 4, 1, 3, 96, 4, 2, 256, 1536, "flash"),
    ("nvidia-sp", 2, 2, 2, 160, 4, 4, 320, 512, "flash"),
    ("ulysses", 2, 1, 6, 64, 4, 2, 256, 2048, "flash"),
    ("lss", 2, 2, 2, 256, 8, 8, 512, 768, "dense"),
    ("serial", 1, 2, 3, 128, 4, 4, 256, 1024, "dense"),
    # recompute and ZeRO (issue 20): what the trainer runs beyond the plain step
    ("lss", 2, 1, 3, 128, 4, 4, 384, 1024, "flash", "selective", 0),
    ("nvidia-sp", 2, 1, 2, 192, 6, 6, 512, 768, "dense", "selective", 0),
    ("lss", 4, 1, 2, 128, 4, 2, 256, 2048, "flash", "full", 0),
    ("serial", 1, 1, 2, 160, 5, 5, 320, 640, "flash", "full", 0),
    ("lss", 2, 2, 2, 128, 4, 4, 256, 1024, "flash", "none", 1),
    ("ulysses", 2, 1, 3, 96, 4, 2, 256, 1536, "flash", "none", 2),
]
"""Shapes no preset uses; the last six add selective and full recompute and ZeRO 1 / 2."""
COLUMNS = [
    "run_id",
    "set",
    "mode",
    "N",
    "D",
    "P",
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "ffn",
    "seq_length",
    "kernel",
    "recompute",
    "zero_stage",
    "predicted_s",
    "measured_s",
    "ratio",
    "load1_before",
    "load1_after",
    "predicted_at_load_s",
    "ratio_at_load",
]
COMPUTE = ("gemm", "attention", "elementwise", "recompute", "fixed_overhead", "optimizer")
"""The breakdown terms the model shares among the cores (`steptime.step_time`)."""


def at_load(pred: dict, load: float, cores: int) -> float:
    """The prediction with the compute terms shared as if `load` runnable processes (the load
    average during the run, the run's own ranks among them) shared the `cores`, instead of the
    run's P ranks alone: compute x max(1, load / cores) / max(1, P / cores); communication
    unchanged. A stated first-order correction for a machine others are using, not a fit."""
    parts = pred["time_breakdown_s"]
    factor = max(1.0, load / cores) / pred["compute_share"]
    return sum(v * (factor if k in COMPUTE else 1.0) for k, v in parts.items())


def new_shape_runs(template) -> list:
    """RunSpecs of `SHAPES`, from a cpu-strong run's flags with the model and layout changed."""
    runs = []
    for mode, n, d, layers, e, h, kv, f, ll, kernel, *more in SHAPES:
        recompute, zero = more or ("none", 0)
        flags = {
            **template.flags,
            "mode": mode,
            "seq-parallel": n,
            "data-parallel": d,
            "num-layers": layers,
            "hidden-size": e,
            "num-heads": h,
            "num-kv-heads": kv,
            "ffn-hidden-size": f,
            "seq-length": ll,
            "attention-kernel": kernel,
            "recompute": recompute,
            "zero-stage": zero,
            "steps": 5,
        }
        runs.append(
            dataclasses.replace(
                template,
                mode=mode,
                seq_parallel=n,
                data_parallel=d,
                seq_length=ll,
                flags=flags,
                variant=f"new{len(runs)}-{mode}",
            )
        )
    return runs


_REUSE = False
"""--resume: a run already complete with the same command is not run again."""


def launch(run, out: Path) -> dict:
    """One trainer launch into its own folder `out` (emptied first, as analysis.compare does);
    its CSV row fields (without the prediction). A failed run ends the validation in one line."""
    before = os.getloadavg()[0]
    outcome = run_trainer(torchrun_command(run, out), out, timeout_s=600, reuse=_REUSE)
    after = os.getloadavg()[0]
    if outcome["status"] != "ok":
        raise SystemExit(
            f"analysis.calibrate.validate: {run.run_id} {outcome['status']}: {outcome['error']}"
        )
    return {"load1_before": before, "load1_after": after}


def row(run, set_name: str, out: Path, dev, load: dict) -> dict:
    cmp = compare_run(out, dev)
    pred, meas = cmp["step_time_s"]
    config = json.loads((out / "config.json").read_text())
    m = config["model"]
    loaded = at_load(
        predict(config, dev), (load["load1_before"] + load["load1_after"]) / 2, dev.cores
    )
    return {
        "run_id": run.run_id,
        "set": set_name,
        "mode": run.mode,
        "N": run.seq_parallel,
        "D": run.data_parallel,
        "P": run.world_size,
        "layers": m["num_layers"],
        "hidden": m["hidden_size"],
        "heads": m["num_heads"],
        "kv_heads": m.get("num_kv_heads"),
        "ffn": m.get("ffn_hidden_size"),
        "seq_length": run.seq_length,
        "kernel": run.flags.get("attention-kernel", "flash"),
        "recompute": run.flags.get("recompute", "none"),
        "zero_stage": run.flags.get("zero-stage", 0),
        "predicted_s": round(pred, 5),
        "measured_s": round(meas, 5),
        "ratio": round(pred / meas, 4),
        **load,
        "predicted_at_load_s": round(loaded, 5),
        "ratio_at_load": round(loaded / meas, 4),
    }


def run_all(runs: list, runs_dir: Path, dev, rerun: bool = True) -> list[dict]:
    rows = []
    for set_name, run in runs:
        out = runs_dir / run.run_id
        r = row(run, set_name, out, dev, launch(run, out))
        if rerun and abs(r["ratio"] - 1) > 0.25:  # once more; keep the run at the lower load
            out2 = runs_dir / (run.run_id + "_again")
            r2 = row(run, set_name, out2, dev, launch(run, out2))
            print(
                f"outlier {run.run_id}: ratio {r['ratio']} (load {r['load1_before']:.2f}), "
                f"again {r2['ratio']} (load {r2['load1_before']:.2f})",
                flush=True,
            )
            r = min(r, r2, key=lambda x: x["load1_before"] + x["load1_after"])
        print(
            f"{r['run_id']:<40} predicted {r['predicted_s']:.4f} measured {r['measured_s']:.4f}"
            f" ratio {r['ratio']:.3f} load {r['load1_before']:.2f}"
            f" (at that load: predicted {r['predicted_at_load_s']:.4f}, {r['ratio_at_load']:.3f})",
            flush=True,
        )
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("python -m analysis.calibrate.validate"))
    p.add_argument(
        "--out",
        default=str(writable_dir() / "validation.csv"),
        help="CSV (default: analysis/data/cpu in a checkout, else the user's data folder)",
    )
    p.add_argument("--runs-dir", default="runs/calibrate-validation")
    p.add_argument("--device-file", default=None)
    p.add_argument("--only", choices=("cpu-strong", "new-shapes"), default=None)
    p.add_argument(
        "--no-rerun",
        action="store_true",
        help="do not run outliers a second time (on a loaded machine every run may be one)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out and the runs in --runs-dir (exactly what its outputs.json lists)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs in --runs-dir already complete (same command)",
    )
    args = p.parse_args(argv)
    path = Path(args.device_file) if args.device_file else find_device_file()
    if path is None:
        p.error("no calibration of this machine: run python -m analysis.calibrate first")
    return cli("analysis.calibrate.validate", lambda: _main(args, path))


def _main(args, path: Path) -> int:
    global _REUSE
    dev = load_device_file(path)
    note = foreign_cpu_note(dev, str(path))
    if note:
        print(note, file=sys.stderr)
    out = Path(args.out)
    check_output_file(
        out, "--out", overwrite=args.overwrite or args.resume, what="a validation table"
    )
    outdir.take(
        Path(args.runs_dir).resolve(),
        "analysis.calibrate.validate",
        what="validation",
        overwrite=args.overwrite,
        resume=args.resume,
        legacy=lambda d: sorted(x.name for x in d.iterdir() if (x / "outcome.json").exists()),
    )
    _REUSE = args.resume
    plan = make_plan(get_preset("cpu-strong"), repeats=1).runs
    runs = [] if args.only == "new-shapes" else [("cpu-strong", r) for r in plan]
    if args.only != "cpu-strong":
        runs += [("new-shape", r) for r in new_shape_runs(plan[0])]
    rows = run_all(runs, Path(args.runs_dir).resolve(), dev, rerun=not args.no_rerun)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_file(out, text.getvalue())
    err = [abs(r["ratio"] - 1) for r in rows]
    print(
        f"{len(rows)} runs, device {path}: median |error| {statistics.median(err):.1%}, "
        f"max {max(err):.1%}, within 25%: {sum(e <= 0.25 for e in err)}/{len(err)}"
    )
    err = [abs(r["ratio_at_load"] - 1) for r in rows]
    print(
        f"at the measured load: median |error| {statistics.median(err):.1%}, max {max(err):.1%}, "
        f"within 25%: {sum(e <= 0.25 for e in err)}/{len(err)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
