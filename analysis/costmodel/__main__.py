"""``python -m analysis.costmodel``: the cost model's command line.

    python -m analysis.costmodel --preset summit-paper      # the paper's claims vs this model
    python -m analysis.costmodel --preset summit-paper --assumptions paper-2023  # one set
    python -m analysis.costmodel --preset summit-paper --set mode=ulysses   # a hypothetical layout
    python -m analysis.costmodel --run runs/latest          # a finished run: predicted vs counted
    python -m analysis.costmodel --config runs/x/config.json --device h200
    python -m analysis.costmodel --run runs/latest --device-file analysis/data/cpu/host.json

``--run`` times the run on this machine's calibration (``python -m analysis.calibrate``;
analysis/data/cpu/<host>.json, found automatically, or ``--device-file``) and prints
``step_time_s: predicted X measured Y`` beside the byte checks.

Bad input (a layout the trainer would refuse, a missing, empty or malformed file or run folder)
is one error line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from lss_megatron.config import ConfigError
from lss_megatron.resources import prog

from ..inputs import InputError, check_run_folder, read_json_file
from . import DEVICES, compare_run, find_device_file, load_device_file, predict
from .calibrated import foreign_cpu_note
from .paper import SETS, Options, print_report, summit_layout, summit_paper

PROG = prog("python -m analysis.costmodel")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Analytic cost model: FLOPs, communication "
        "bytes, memory and step time per rank.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", choices=("summit-paper",), help="the paper's claims vs the model")
    what.add_argument("--config", help="a config.json (the trainer's or make_config's)")
    what.add_argument("--run", help="a finished run folder: predicted vs counted")
    p.add_argument("--device", choices=sorted(DEVICES), default=None, help="for step times")
    p.add_argument(
        "--device-file",
        default=None,
        metavar="FILE",
        help="a calibration written by python -m analysis.calibrate (step times on "
        "that CPU); --run uses this machine's when present",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --preset summit-paper: predict a hypothetical rank grid instead, the "
        "--base preset with make_config arguments changed (e.g. mode=ulysses)",
    )
    p.add_argument(
        "--base", choices=("144", "3456"), default="144", help="the preset --set starts from"
    )
    p.add_argument(
        "--assumptions",
        choices=SETS,
        default=None,
        help="with --preset summit-paper: one named assumption set (default: both; "
        "docs/costmodel.md)",
    )
    p.add_argument(
        "--overlap-kv-gather",
        action="store_true",
        help="with --preset summit-paper: LSS's K/V gather hides behind attention",
    )
    p.add_argument(
        "--baseline-recompute",
        choices=("none", "selective"),
        default="none",
        help="with --preset summit-paper: NVIDIA SP's activation recompute",
    )
    return p


def _print_prediction(pred: dict) -> None:
    width = max(len(k) for k in pred)
    for k, v in pred.items():
        if isinstance(v, dict):
            v = ", ".join(
                f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()
            )
        elif isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def _print_comparison(cmp: dict) -> None:
    for k, value in cmp.items():
        if k == "device_file":
            print(f"device: {value}")
            continue
        if k == "step_time_note":
            print(f"step_time_s: not predicted: {value}")
            continue
        pr, co = value
        if k == "step_time_s" and pr is None:
            continue  # the note says why
        if k == "step_time_s":
            ratio = f"{pr / co:.3f}" if co else "n/a"
            print(
                f"step_time_s: predicted {pr:.4f} measured {co:.4f}  (ratio {ratio}; measured ="
                " median over the steps after the first of the slowest rank's step_time_s)"
            )
            continue
        pr = f"{pr:,}" if isinstance(pr, int | float) else str(pr)
        print(f"{k:<24} predicted {pr:>16}  counted {co!s:>16}")


def _calibration(args: argparse.Namespace):
    """(the calibrated device, where it came from): --device-file, else for --run this
    machine's calibration when there is one, else (None, why not)."""
    if args.device_file:
        return load_device_file(args.device_file), f"{args.device_file} (--device-file)"
    path = find_device_file() if args.run else None
    if path is None:
        return None, "no calibration of this machine (python -m analysis.calibrate): bytes only"
    return load_device_file(path), f"{path} (this machine's calibration, found automatically)"


def _compare(args: argparse.Namespace) -> dict:
    dev, where = _calibration(args)
    out = {"device_file": where}
    note = foreign_cpu_note(dev, where.split(" (")[0]) if dev is not None else None
    if note:
        print(note, file=sys.stderr)
    out.update(_usable(lambda: compare_run(args.run, dev), f"--run {args.run}"))
    return out


def _changes(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as make_config arguments (integers where they look like one)."""
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        changes[key] = int(value) if value.lstrip("-").isdigit() else value
    return changes


def _run(args: argparse.Namespace) -> tuple[object, Callable[[object], None]]:
    """(what to print, how to print it as text) for the parsed command line."""
    if args.preset and args.set:
        return summit_layout(args.base, **_changes(args.set)), _print_prediction
    if args.preset:
        sets = (args.assumptions,) if args.assumptions else SETS
        opts = Options(args.overlap_kv_gather, args.baseline_recompute)
        return summit_paper(sets, opts), print_report
    if args.run:
        check_run_folder(Path(args.run), "--run")
        return _compare(args), _print_comparison
    config = read_json_file(Path(args.config), "--config: a trainer config.json")
    device = _calibration(args)[0] if args.device_file else args.device
    return (
        _usable(lambda: predict(config, device=device), f"--config {args.config}"),
        _print_prediction,
    )


def _usable(fn: Callable[[], object], where: str):
    """`fn()`, with a config that lacks what the model needs reported as bad input."""
    try:
        return fn()
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"{where}: not a usable trainer config ({type(e).__name__}: {e})"
        ) from None


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        result, show = _run(args)
    except (ConfigError, InputError, OSError, json.JSONDecodeError) as e:
        p.error(str(e))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
