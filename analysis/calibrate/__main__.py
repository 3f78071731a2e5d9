"""``python -m analysis.calibrate [--out FILE] [--ranks P ...] [--quick]``: measure this machine
and write the device file the cost model reads (`analysis.calibrate`). Bad input: one error
line, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lss_megatron.resources import prog

from ..costmodel.calibrated import default_path
from ..outdir import check_output_file, cli, write_file
from . import calibrate

PROG = prog("python -m analysis.calibrate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Measure this CPU for the cost model.")
    p.add_argument("--out", default=None, help=f"device file (default {default_path()})")
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[2, 4],
        metavar="P",
        help="rank counts for collectives and core sharing (default 2 4)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="few sizes, no trainer runs (seconds; for tests, not for predictions)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    bad = [r for r in args.ranks if r < 2 or r > 64]
    if bad:
        p.error(f"--ranks {bad[0]}: rank counts must be between 2 and 64")
    return cli("analysis.calibrate", lambda: _main(args))


def _main(args) -> int:
    out = Path(args.out) if args.out else default_path()
    # before measuring (minutes): a file that cannot be written, or an earlier calibration
    check_output_file(out, "--out", overwrite=args.overwrite, what="a calibration")
    record = calibrate(sorted(set(args.ranks)), quick=args.quick)
    write_file(out, json.dumps(record, indent=1) + "\n")
    load = record["load_avg"]
    print(
        f"wrote {out} ({record['seconds']} s; load average {load[0][0]:.2f} -> {load[1][0]:.2f} "
        f"on {record['cores']} cores)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
