"""The longest sequence that fits a per-rank memory budget, MEASURED by running the trainer:
``python -m analysis.longest`` (the search itself, `fitsearch.longest_fitting`, is the one the
cost model and the figures use too).

    python -m analysis.longest --ranks 4 --num-heads 2 --budget-mib 64 --out runs/longest

For each mode (lss, nvidia-sp, ulysses, ring) and each rank count P, the mode runs at its most
memory-saving legal layout on P ranks: the largest sequence degree N (nvidia-sp: tensor-parallel
size t) the trainer accepts for this model, the rest data-parallel (D = P / N, one micro-batch of
one sequence per rank). It runs with the flash kernel and, for each ``--recompute`` setting, the
longest length l is searched by running the trainer for ONE step at candidate lengths: doubling
from the smallest length the layout allows (a multiple of ``--granularity`` and of N), then
bisecting between the last fit and the first miss. A candidate fits when the trainer's measured
``rank_bytes_max`` (the most any rank needed: parameters, fp32 masters and optimizer state plus
the heap growth of the step's forward and backward, docs/measurement.md) is at most the budget. A
run that fails or times out does not fit (its error is kept); doubling stops at the first miss, so
runs far past the budget are never launched. Nothing is extrapolated: every length in the table
is a run folder that fitted.

Outputs in ``--out DIR``: ``runs/RUN_ID/`` (each trainer run), ``searches.csv`` (every run: mode,
layout, recompute, l, bytes, fits, status), ``longest.csv`` (per mode and P: the longest l over the
recompute settings, ``bytes_at_longest`` and the ``run_dir`` that measured it) and
``figures/longest_seq_length.png|pdf`` (longest l vs P, one colour per mode). Everything the
trainer does not know (``--ranks``, ``--budget-mib``, ...) is this tool's; every other flag goes to
the trainer unchanged (``--num-layers``, ``--hidden-size``, ``--vocab-size``, ...).

``--modes`` takes the variant labels of ``analysis.compare`` (`presets.VARIANTS`: a mode plus its
own flags) as well as the plain modes, so one search sets the LSS options side by side, each only
on its own mode: ``lss-local`` (``--lss-save-kv local``), ``lss-overlap`` (``--lss-overlap``),
``lss-local-overlap``, ``lss-megatron-cp`` (``--lss-save-kv local --lss-kv-gather separate``),
``lss-kv2`` / ``lss-kv4``, ``lss-zero1`` / ``lss-zero2``, ... The label names the runs, the
``variant`` column of both tables and the figure's series:

    python -m analysis.longest --ranks 2 --modes lss lss-local nvidia-sp --num-heads 2 \
        --budget-mib 48 --out runs/longest-local
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lss_megatron.config import ConfigError
from lss_megatron.modes import get_mode
from lss_megatron.resources import prog

from . import outdir
from .fitsearch import longest_fitting
from .inputs import InputError
from .outdir import cli
from .presets import VARIANTS, get_variant
from .trainer_config import argv as flag_argv

MiB = 1 << 20
MODES = ("lss", "nvidia-sp", "ulysses", "ring")
VARIANT_LABELS = tuple(k for k, v in VARIANTS.items() if v.mode in MODES)
"""Every label `--modes` takes: the plain modes and their variants (`presets.VARIANTS`)."""
RECOMPUTES = ("none", "selective", "full")
COLUMNS = (
    "variant",
    "mode",
    "seq_parallel",
    "tensor_parallel",
    "data_parallel",
    "longest_seq_length",
    "bytes_at_longest",
    "run_dir",
    "world_size",
    "recompute",
    "attention_kernel",
    "budget_bytes",
    "granularity",
    "runs",
)
SEARCH_COLUMNS = (
    "variant",
    "mode",
    "world_size",
    "seq_parallel",
    "data_parallel",
    "recompute",
    "seq_length",
    "rank_bytes_max",
    "fits",
    "status",
    "wall_s",
    "error",
    "run_dir",
)


# --- what to run ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Search:
    """One mode at one layout and recompute setting: the trainer flags of its candidate runs."""

    mode: str
    seq_parallel: int
    data_parallel: int
    recompute: str
    trainer: tuple[str, ...] = ()
    """The user's trainer flags (the model), passed through unchanged."""
    step: int = 0
    """Candidate lengths are multiples of this (the layout's need and the granularity)."""
    variant: str = ""
    """The `presets.VARIANTS` label whose flags the runs add (empty: the plain mode)."""

    @property
    def label(self) -> str:
        return self.variant or self.mode

    @property
    def world_size(self) -> int:
        return self.seq_parallel * self.data_parallel

    def args(self, seq_length: int) -> list[str]:
        """The trainer's arguments of the one-step run at `seq_length` (without --out)."""
        d = self.data_parallel
        return [
            *self.trainer,
            *flag_argv(get_variant(self.label).flags),
            "--mode",
            self.mode,
            "--seq-parallel",
            str(self.seq_parallel),
            "--data-parallel",
            str(d),
            "--seq-length",
            str(seq_length),
            "--global-batch-size",
            str(d),
            "--micro-batch-size",
            "1",
            "--steps",
            "1",
            "--attention-kernel",
            "flash",
            "--recompute",
            self.recompute,
            "--eval-interval",
            "0",
            "--progress",
            "off",
        ]

    def run_id(self, seq_length: int) -> str:
        return f"{self.label}_N{self.seq_parallel}_D{self.data_parallel}_{self.recompute}_l{seq_length}"


def trainer_verdict(args: list[str], world_size: int) -> str | None:
    """The trainer's own reason to refuse `args` on `world_size` ranks, or None."""
    from .trainer_config import problems, run_config

    try:
        cfg = run_config(args, world_size)
    except ConfigError as e:
        return str(e)
    return "; ".join(problems(cfg)) or None


def best_layout(
    label: str, ranks: int, trainer: tuple[str, ...], granularity: int, recompute: str = "none"
) -> tuple[Search | None, str]:
    """The most memory-saving layout on `ranks` ranks (the largest legal sequence degree) of the
    mode or variant `label`, or None and the trainer's reasons for refusing every degree."""
    mode = get_variant(label).mode
    variant = "" if label == mode else label
    reasons = []
    for n in sorted((n for n in range(1, ranks + 1) if ranks % n == 0), reverse=True):
        search = Search(mode, n, ranks // n, recompute, trainer, math.lcm(granularity, n), variant)
        why = trainer_verdict(search.args(search.step), ranks)
        if why is None:
            return search, ""
        reasons.append(f"N = {n}: {why}")
    return None, f"{label} on {ranks} ranks: no legal layout ({' | '.join(reasons)})"


# --- running it ----------------------------------------------------------------------------------
_REUSE = False
"""--resume: a run already complete with the same command is not run again."""


def legacy_outputs(out: Path) -> list[str]:
    """What a search written before manifests holds: its tables and the runs searches.csv lists."""
    names = ["longest.csv", "longest_all_recompute.csv", "searches.csv"]
    try:
        with (out / "searches.csv").open() as f:
            names += [
                str(Path(r["run_dir"]).relative_to(out.resolve()))
                for r in csv.DictReader(f)
                if r.get("run_dir") and Path(r["run_dir"]).is_relative_to(out.resolve())
            ]
    except (OSError, ValueError, csv.Error):
        pass
    return names


def launch_one(search: Search, seq_length: int, out: Path, timeout_s: float) -> dict:
    """Run the trainer for one step at `seq_length`; its record for searches.csv."""
    from .compare import launch_command, run_trainer

    run_dir = out / "runs" / search.run_id(seq_length)
    cmd = launch_command(search.world_size, [*search.args(seq_length), "--out", str(run_dir)])
    outcome = run_trainer(cmd, run_dir, timeout_s, reuse=_REUSE)
    measured = _rank_bytes(run_dir) if outcome["status"] == "ok" else None
    if outcome["status"] == "ok" and measured is None:
        outcome = {**outcome, "status": "failed", "error": "no rank_bytes_max in metrics.jsonl"}
    return {
        "variant": search.label,
        "mode": search.mode,
        "world_size": search.world_size,
        "seq_parallel": search.seq_parallel,
        "data_parallel": search.data_parallel,
        "recompute": search.recompute,
        "seq_length": seq_length,
        "rank_bytes_max": measured,
        "fits": False,
        "status": outcome["status"],
        "wall_s": round(outcome["wall_s"], 2),
        "error": outcome["error"],
        "run_dir": str(run_dir),
    }


def _rank_bytes(run_dir: Path) -> int | None:
    try:
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    value = first.get("rank_bytes_max")
    return int(value) if isinstance(value, (int, float)) else None


def search_longest(
    search: Search,
    budget: int,
    limit: int,
    run: Callable[[Search, int], dict],
    log: Callable[[dict], None],
) -> tuple[int, dict | None]:
    """The longest fitting l of `search` and the record of the run that measured it."""
    records: dict[int, dict] = {}

    def size(length: int) -> float:
        rec = run(search, length)
        fits = rec["status"] == "ok" and rec["rank_bytes_max"] <= budget
        records[length] = {**rec, "fits": fits}
        log(records[length])
        return rec["rank_bytes_max"] if fits else math.inf

    best = longest_fitting(search.step, size, budget, limit)
    return best, records.get(best)


# --- the command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("python -m analysis.longest"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        required=True,
        metavar="P",
        help="rank counts P (one search per mode and P)",
    )
    p.add_argument(
        "--budget-mib",
        type=float,
        required=True,
        metavar="B",
        help="per-rank memory budget in MiB (compared with rank_bytes_max)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (refused if it holds another search)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the search in --out (deletes exactly what its outputs.json lists)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the search in --out: runs already complete (same command) are kept",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=VARIANT_LABELS,
        default=list(MODES),
        metavar="MODE",
        help=f"modes and variants to search (default: {' '.join(MODES)}); a variant adds its "
        "own flags to its mode's runs only, e.g. lss-local (--lss-save-kv local), lss-overlap, "
        f"lss-megatron-cp (--lss-save-kv local --lss-kv-gather separate); any of: "
        f"{', '.join(VARIANT_LABELS)}",
    )
    p.add_argument(
        "--recompute",
        nargs="+",
        choices=RECOMPUTES,
        default=list(RECOMPUTES),
        help="settings to try; the one reaching furthest is reported",
    )
    p.add_argument(
        "--granularity",
        type=int,
        default=256,
        metavar="G",
        help="candidate lengths are multiples of G and of the rank grid's N (default 256)",
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=1 << 16,
        metavar="L",
        help="never run longer than L (default 65536)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="hard limit per trainer run in seconds (default 600)",
    )
    return p


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """This tool's options and the trainer flags passed through; bad values -> InputError."""
    args, trainer = build_parser().parse_known_args(argv)
    bad = [f"--ranks {p}" for p in args.ranks if p < 1]
    bad += [
        f"--{k.replace('_', '-')} {getattr(args, k)}"
        for k in ("budget_mib", "granularity", "max_seq_length", "timeout")
        if not (getattr(args, k) > 0 and math.isfinite(getattr(args, k)))
    ]
    if bad:
        raise InputError(f"must be positive and finite: {', '.join(bad)}")
    owned = [a for a in trainer if a.split("=")[0] in _OWNED]
    if owned:
        raise InputError(
            f"{' '.join(owned)}: analysis.longest sets these itself (the layout, "
            "the length, one step of one sequence per rank, flash)"
        )
    return args, tuple(trainer)


_OWNED = {
    "--mode",
    "--seq-parallel",
    "--data-parallel",
    "--tensor-parallel",
    "--seq-length",
    "--global-batch-size",
    "--micro-batch-size",
    "--steps",
    "--attention-kernel",
    "--recompute",
    "--out",
    "--save",
    "--load",
}


def plan(args: argparse.Namespace, trainer: tuple[str, ...]) -> tuple[list[Search], list[str]]:
    """Every search to run, and the (mode, P) pairs with no legal layout (and why); checked by
    the trainer's own validation before anything is launched."""
    searches, refused = [], []
    for ranks in args.ranks:
        for mode in args.modes:
            base, why = best_layout(mode, ranks, trainer, args.granularity)
            if base is None:
                refused.append(why)
                continue
            searches += [replace(base, recompute=r) for r in args.recompute]
    if not searches:
        raise InputError("nothing to run: " + "; ".join(refused))
    return searches, refused


def longest_row(
    search: Search, length: int, rec: dict | None, budget: int, granularity: int, runs: int
) -> dict:
    t = get_mode(search.mode).tensor_parallel(search.seq_parallel)
    return {
        "variant": search.label,
        "mode": search.mode,
        "seq_parallel": search.seq_parallel,
        "tensor_parallel": t,
        "data_parallel": search.data_parallel,
        "longest_seq_length": length,
        "bytes_at_longest": rec["rank_bytes_max"] if rec else None,
        "run_dir": rec["run_dir"] if rec else "",
        "world_size": search.world_size,
        "recompute": search.recompute,
        "attention_kernel": "flash",
        "budget_bytes": budget,
        "granularity": search.step,
        "runs": runs,
    }


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (variant, P): the recompute setting reaching the longest l (ties: fewer bytes)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("variant") or row["mode"], row["world_size"])
        score = (row["longest_seq_length"], -(row["bytes_at_longest"] or 0))
        old = best.get(key)
        if old is None or score > (old["longest_seq_length"], -(old["bytes_at_longest"] or 0)):
            best[key] = row
    return list(best.values())


def _write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    return cli("analysis.longest", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args, trainer = parse(argv)
    global _REUSE
    searches, refused = plan(args, trainer)
    out = Path(args.out).resolve()
    outdir.take(
        out,
        "analysis.longest",
        what="search",
        overwrite=args.overwrite,
        resume=args.resume,
        legacy=legacy_outputs,
    )
    _REUSE = args.resume
    budget = int(args.budget_mib * MiB)
    for why in refused:
        print(f"skipped: {why}")
    log_rows: list[dict] = []

    def log(rec: dict) -> None:
        log_rows.append(rec)
        _write_csv(out / "searches.csv", log_rows, SEARCH_COLUMNS)
        outdir.note(out / "searches.csv")
        b = rec["rank_bytes_max"]
        print(
            f"  {rec['variant']:<9} N={rec['seq_parallel']} D={rec['data_parallel']} "
            f"{rec['recompute']:<9} l={rec['seq_length']:<7} "
            f"{'-' if b is None else f'{b / MiB:,.1f} MiB':>12} "
            f"{'fits' if rec['fits'] else 'over' if rec['status'] == 'ok' else rec['status']}",
            flush=True,
        )

    rows = []
    for s in searches:
        print(
            f"{s.label} on {s.world_size} ranks (N = {s.seq_parallel}, D = {s.data_parallel}), "
            f"recompute {s.recompute}:",
            flush=True,
        )
        before = len(log_rows)
        length, rec = search_longest(
            s, budget, args.max_seq_length, lambda x, n: launch_one(x, n, out, args.timeout), log
        )
        rows.append(longest_row(s, length, rec, budget, s.step, len(log_rows) - before))
    table = best_rows(rows)
    _write_csv(out / "longest.csv", table, COLUMNS)
    _write_csv(out / "longest_all_recompute.csv", rows, COLUMNS)
    figures = plot_longest(table, out / "figures" / "longest_seq_length", budget)
    outdir.note(out / "longest.csv", out / "longest_all_recompute.csv", *figures)
    for row in table:
        print(
            f"{row['variant']:<9} P={row['world_size']} N={row['seq_parallel']} "
            f"D={row['data_parallel']} recompute={row['recompute']}: longest l = "
            f"{row['longest_seq_length']:,} ({(row['bytes_at_longest'] or 0) / MiB:,.1f} MiB "
            f"of {budget / MiB:,.1f})"
        )
    print(f"wrote {out / 'longest.csv'}, {out / 'searches.csv'} and {len(figures)} figure files")
    return 0


def plot_longest(rows: list[dict], stem: Path, budget: int) -> list[Path]:
    """Longest l vs P, one colour per mode, a shade of it per variant (measured: every point is
    a run that fitted)."""
    from .plotting import pyplot, save, shades

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [v for v in VARIANT_LABELS if any(r["variant"] == v for r in rows)]
    for label, colour in shades(labels).items():
        pts = sorted(
            (r["world_size"], r["longest_seq_length"]) for r in rows if r["variant"] == label
        )
        ax.plot(*zip(*pts, strict=True), marker="o", color=colour, label=label)
    ax.set_xlabel("ranks P")
    ax.set_ylabel("longest sequence length l (tokens)")
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.legend(title="mode or variant (best legal layout)")
    ax.set_title(f"Longest l within {budget / MiB:,.0f} MiB per rank (measured, CPU)", fontsize=10)
    ax.grid(alpha=0.3)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, stem)


if __name__ == "__main__":
    sys.exit(main())
