"""Compare serial, LSS, NVIDIA SP, Ulysses and LSS's options beyond the paper over a grid.

``python -m analysis.compare --preset NAME --out DIR``

Runs every run of the preset's plan (launch/presets/compare/NAME.yaml, read and planned by
analysis/presets.py: grid points x variants, a variant
being a trainer mode plus flags such as ``--lss-layout zigzag``) as its own launch of the trainer,
``python -m torch.distributed.run --standalone --nproc-per-node P -m lss_megatron.train ...`` with
``--progress off`` and ``OMP_NUM_THREADS=1`` (``--standalone`` picks a free port per launch), one
after another in the plan's interleaved order, each under a hard timeout. ``--repeats K`` (default:
the preset's) runs every configuration K times in K rounds, each round every configuration once in
an order shuffled by a seed (``--seed``, else drawn) that plan.json records; the 1-minute load
average is read before and after every launch. A run that fails or times out is recorded with its
status and the tail of its stderr; the driver goes on. Then it writes

* ``DIR/summary.csv``: one row per configuration, the median step time over its repeats with
  their spread and every time ratio with a bootstrap interval (analysis/repeats.py,
  docs/measurement.md);
* ``DIR/runs.csv``: one row per launch, with its place in the order and the load averages
  (analysis/tables.py);
* ``DIR/figures/*.png|pdf`` (analysis/figures.py);
* ``DIR/best_layouts.csv`` (equal-ranks presets such as ``cpu-equal-ranks``): each mode's
  fastest layout on the preset's P ranks against nvidia-sp's (`tables.best_layouts`);
* ``DIR/plan.json``: the preset, the seed, every command in launch order, the runs the trainer
  would reject;
* ``DIR/runs/RUN_ID/``: each run's trainer output plus ``stdout.log`` / ``stderr.log`` and
  ``launch.json`` (status, wall time, order, load averages);

and prints the summary table, then the time ratios whose interval excludes 1 and those whose
interval contains it. ``--dry-run`` prints the commands instead; ``--collect`` builds the
table and figures from run folders already in ``DIR/runs`` (how cluster presets are used: print
their sbatch commands with ``--dry-run``, run them, then ``--collect``).

Exit status: 0 when every run succeeded, 3 when some failed (the table is written anyway), 2 for a
bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lss_megatron.resources import prog

from . import outdir, repeats, tables
from .inputs import InputError, error_line
from .outdir import cli
from .presets import (
    REPO,
    Plan,
    Preset,
    RunSpec,
    all_presets,
    get_preset,
    make_plan,
    recorded_name,
)
from .trainer_config import run_config

STDERR_TAIL = 2000
"""Characters of a failed run's stderr kept in the table's ``error`` column."""
_DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)


def effective_config(run: RunSpec) -> dict:
    """The trainer's effective configuration of `run` (`RunConfig.to_dict()`), without launching."""
    return run_config(run.trainer_args("unused"), run.world_size).to_dict()


def torchrun_command(run: RunSpec, out: Path) -> list[str]:
    """The launch of `run` writing into `out` (`launch_command` of its trainer arguments)."""
    return launch_command(run.world_size, run.trainer_args(out))


def launch_command(world_size: int, trainer_args: list[str]) -> list[str]:
    """The one place a trainer launch is spelled: ``python -m torch.distributed.run --standalone
    --nproc-per-node P -m lss_megatron.train ARGS`` (compare, analysis.longest, calibrate)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(world_size),
        "-m",
        "lss_megatron.train",
        *trainer_args,
    ]


def sbatch_command(run: RunSpec, out: Path, gpus_per_node: int) -> str:
    """The launch/slurm.sbatch command of a cluster run (every trainer flag explicit)."""
    per_node = min(run.world_size, gpus_per_node)
    nodes = math.ceil(run.world_size / per_node)
    return (
        f"sbatch --nodes={nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} "
        f"launch/slurm.sbatch {shlex.join(run.trainer_args(out))}"
    )


def child_env() -> dict[str, str]:
    """This environment without rendezvous variables, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    if REPO is not None:  # a checkout: its code first (an installed wheel needs nothing)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _stop(proc: subprocess.Popen) -> None:
    """End the launch we started (its own process group) on a timeout: TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = STDERR_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:].strip()


def launch(run: RunSpec, run_dir: Path, timeout_s: float, reuse: bool = False) -> dict:
    """Run one launch; returns status (ok / failed / timeout), error (stderr tail), wall_s."""
    return run_trainer(torchrun_command(run, run_dir), run_dir, timeout_s, reuse)


OUTCOME = "outcome.json"
"""In each run folder: the command, status, error and wall time of its launch (for --resume)."""


def reusable(cmd: list[str], run_dir: Path) -> dict | None:
    """The outcome of an earlier, complete launch of exactly `cmd` into `run_dir`, or None."""
    try:
        done = json.loads((run_dir / OUTCOME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("command") != [str(c) for c in cmd]:
        return None
    if done.get("status") != "ok" or not (run_dir / "summary.json").exists():
        return None
    return {k: done[k] for k in ("status", "error", "wall_s") if k in done}


def run_trainer(cmd: list[str], run_dir: Path, timeout_s: float, reuse: bool = False) -> dict:
    """Run the trainer command `cmd` writing into `run_dir` (emptied first), under a hard
    timeout; returns status (ok / failed / timeout), error (stderr tail), wall_s. `reuse`: an
    earlier complete launch of the same command there is kept, not run again (--resume).
    Interrupted (Ctrl-C, SIGTERM: outdir.signals), the launch's process group is stopped and
    waited for before the interruption goes on."""
    if reuse and (done := reusable(cmd, run_dir)) is not None:
        return done
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    outdir.note(run_dir)
    t0 = time.perf_counter()
    with (run_dir / "stdout.log").open("w") as out, (run_dir / "stderr.log").open("w") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, env=child_env(), cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
            error = "" if rc == 0 else f"exit status {rc}: "
        except subprocess.TimeoutExpired:
            _stop(proc)
            status, error = "timeout", f"killed after the {timeout_s:g} s timeout: "
        except BaseException:  # Ctrl-C, SIGTERM (outdir.Interrupted): nothing left running
            _stop(proc)
            raise
    wall = time.perf_counter() - t0
    if status == "ok" and not (run_dir / "summary.json").exists():
        status, error = "failed", "exit status 0 but no summary.json: "
    if status != "ok":
        error += error_line(_tail(run_dir / "stderr.log", 50_000))
    outcome = {"status": status, "error": error, "wall_s": wall}
    (run_dir / OUTCOME).write_text(
        json.dumps({"command": [str(c) for c in cmd], **outcome}, indent=1) + "\n"
    )
    return outcome


def load_1m() -> float:
    """The machine's 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def launch_recorded(
    run: RunSpec, run_dir: Path, timeout_s: float, order: int, seed: int, reuse: bool = False
) -> dict:
    """`launch` with the load average read before and after, and its place in the launch
    order; the outcome is also written to ``run_dir/launch.json`` (what --collect reads).
    `reuse` (--resume): a complete earlier launch of the same command keeps its record."""
    if reuse and (done := reusable(torchrun_command(run, run_dir), run_dir)) is not None:
        return {**done, **_recorded(run_dir)}
    before = load_1m()
    outcome = launch(run, run_dir, timeout_s)
    outcome.update(order=order, order_seed=seed, load_1m_before=before, load_1m_after=load_1m())
    (run_dir / "launch.json").write_text(json.dumps(outcome, indent=2) + "\n")
    return outcome


def _recorded(run_dir: Path) -> dict:
    """The launch record a run left (order, seed, load averages), {} when there is none."""
    try:
        doc = json.loads((run_dir / "launch.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    keys = ("order", "order_seed", "load_1m_before", "load_1m_after", "wall_s")
    return {k: doc[k] for k in keys if k in doc}


def collect(run: RunSpec, run_dir: Path, outcome: dict | None) -> dict:
    """Measured columns of a run, or its failure (`outcome` None: from the folder alone)."""
    if outcome is None:
        outcome = {"status": "ok", "error": "", "wall_s": math.nan, **_recorded(run_dir)}
        if not (run_dir / "summary.json").exists():
            why = "no run folder" if not run_dir.exists() else "no summary.json"
            stderr = _tail(run_dir / "stderr.log", 50_000)
            outcome = {
                **outcome,
                "status": "missing",
                "error": why + (": " + error_line(stderr) if stderr else ""),
            }
    row = dict(outcome)
    if outcome["status"] == "ok":
        try:
            row.update(tables.read_run(run_dir))
        except Exception as e:  # noqa: BLE001 - any run that does not parse is named in the table
            why = " ".join(str(e).split())[:300]
            row.update(status="failed", error=f"unreadable outputs: {type(e).__name__}: {why}")
    return row


def build_table(plan: Plan, out: Path, outcomes: dict[str, dict] | None) -> tuple:
    """(per-launch DataFrame, summary DataFrame, cost-model note) for every run of `plan`: the
    first one row per launch (runs.csv), the second one row per configuration (summary.csv,
    `analysis.repeats.aggregate`)."""
    predict, note = tables.load_costmodel()
    rows = []
    for index, run in enumerate(plan.runs):
        run_dir = out / "runs" / run.run_id
        config = effective_config(run)
        row = tables.identity_row(
            config,
            run.run_id,
            run.role,
            run.repeat,
            recorded_name(plan.preset),
            run.label,
            run.documents,
        )
        row.update(collect(run, run_dir, None if outcomes is None else outcomes[run.run_id]))
        row["run_dir"] = str(run_dir)
        row["config_id"] = run.config_id
        row.setdefault("order", index)
        row.setdefault("order_seed", plan.seed)
        try:
            row.update(tables.predicted_columns(config, predict))
        except Exception as e:  # noqa: BLE001 - a cost-model bug must not lose the measurements
            note = f"analysis.costmodel.predict failed ({type(e).__name__}: {e}); columns empty"
            predict = None
        rows.append(row)
    runs = tables.finish(rows, plan.preset.scaling, plan.preset.memory_budget_bytes)
    return (
        runs,
        repeats.aggregate(runs, plan.preset.scaling, seed=plan.seed, order=plan.configs),
        note,
    )


def _recorded_seed(out: Path, collect: bool) -> int:
    """--collect: the seed plan.json recorded (the runs were made in its order); otherwise a
    fresh one (recorded in plan.json and summary.csv)."""
    if collect:
        try:
            return int(json.loads((out / "plan.json").read_text())["seed"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0
    return random.SystemRandom().randrange(2**31)


LAUNCH_S = 12.0
"""Start-up and shutdown of one trainer launch on the 2-core development machine (imports, process
groups, model build; 2026-12-06: cpu-packed's 40 two-rank launches of 3 short steps took 8 min,
~12 s each): an assumption of `estimate_minutes`, not a measurement of the machine at hand."""


def estimate_minutes(plan: Plan) -> tuple[float, str] | None:
    """(minutes, how) the plan's launches should take on this machine: per launch `LAUNCH_S`
    plus its steps at the calibrated model's step time (`analysis.costmodel.predict` with this
    machine's device file); None without a calibration of this machine or for a cluster preset."""
    from .costmodel import find_device_file, load_device_file, predict

    path = find_device_file()
    if plan.preset.cluster or path is None:
        return None
    device = load_device_file(path)
    total = 0.0
    for run in plan.runs:
        config = effective_config(run)
        step = predict(config, device).get("step_time_s")
        if step is None:  # e.g. bf16: the calibration has no 16-bit rates
            return None
        total += LAUNCH_S + config["train"]["steps"] * step
    return (
        total / 60,
        f"{len(plan.runs)} launches x {LAUNCH_S:g} s start-up + steps at {path.name}'s step times",
    )


def _print_plan(plan: Plan, out: Path) -> None:
    preset = plan.preset
    guess = estimate_minutes(plan)
    if guess is not None:
        print(f"# estimate: about {guess[0]:.0f} min on this machine, idle ({guess[1]})")
    print(
        f"# preset {preset.name}: {preset.summary} ({len(plan.runs)} runs: "
        f"{len(plan.runs) // max(plan.repeats, 1)} configurations x {plan.repeats} repeats, "
        f"interleaved, order seed {plan.seed}; {preset.scaling} scaling)"
    )
    for run in plan.runs:
        run_dir = out / "runs" / run.run_id
        if preset.cluster:
            print(sbatch_command(run, run_dir, preset.gpus_per_node))
        else:
            print("OMP_NUM_THREADS=1 " + shlex.join(torchrun_command(run, run_dir)))
    for run_id, why in plan.skipped:
        print(f"# skipped {run_id}: {why}")


def _write_plan(plan: Plan, out: Path) -> None:
    preset = plan.preset
    doc = {
        "preset": preset.name,
        "summary": preset.summary,
        "scaling": preset.scaling,
        "notes": preset.notes,
        "timeout_s": preset.timeout_s,
        "memory_budget_bytes": preset.memory_budget_bytes,
        "repeats": plan.repeats,
        "seed": plan.seed,
        "order": "interleaved: every configuration once per round, the order within round r "
        "shuffled by random.Random(f'{seed}:{r}') (analysis.presets.make_plan)",
        "interval_level": repeats.LEVEL,
        "runs": [
            {
                "order": i,
                "run_id": r.run_id,
                "config_id": r.config_id,
                "repeat": r.repeat,
                "role": r.role,
                "command": torchrun_command(r, out / "runs" / r.run_id),
            }
            for i, r in enumerate(plan.runs)
        ],
        "skipped": [{"run_id": r, "reason": why} for r, why in plan.skipped],
    }
    (out / "plan.json").write_text(json.dumps(doc, indent=2) + "\n")


def write_documents(preset: Preset, folder: Path) -> None:
    """The preset's document mixes (`Preset.documents`), written into `folder` (deterministic:
    a rerun writes the same files), where its plan's ``--data-path`` flags point."""
    if not preset.documents:
        return
    import warnings

    from .mixes import write_mix

    with warnings.catch_warnings():  # Megatron's import notes (no TransformerEngine / Apex)
        warnings.simplefilter("ignore")
        import lss_megatron.data.make_indexed  # noqa: F401
    for name, lo, hi in preset.documents:
        prefix, lengths = write_mix(folder, name, lo, hi, preset.document_tokens)
        print(
            f"# document mix {name}: {len(lengths):,} documents of {lo + 1}..{hi + 1} tokens "
            f"(EOD included), {sum(lengths):,} tokens -> {prefix}.bin/.idx"
        )
    outdir.note(folder)


def _list_presets() -> None:
    for name, p in all_presets().items():
        plan = make_plan(p)
        kind = "cluster" if p.cluster else "local"
        print(f"{name:22s} {kind:7s} {len(plan.runs):3d} runs  {p.summary}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("python -m analysis.compare"),
        description="Compare serial, LSS, NVIDIA SP, Ulysses and LSS's options over a grid.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(all_presets()),
        help="the grid (a file of launch/presets/compare/)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/compare-PRESET)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument(
        "--collect",
        action="store_true",
        help="build the table and figures from DIR/runs without launching",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="run every configuration K times, interleaved (default: the preset's repeats)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the launch order within each round (default: drawn, and recorded in "
        "plan.json and summary.csv)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="override the preset's per-run timeout (seconds)",
    )
    for key, what in SELECTING.items():
        p.add_argument(
            f"--{key}",
            type=_names,
            default=None,
            metavar="A,B,...",
            help=f"run these {what} instead of the preset's (comma-separated; the model, data, "
            "recipe and precision stay the preset's; plan.json and the summary record it)",
        )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the comparison in --out (deletes exactly what its outputs.json lists)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison in --out: runs already complete (same command) are kept",
    )
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    args = p.parse_args(argv)
    if not args.list and args.preset is None:
        p.error("--preset is required (or --list)")
    if args.repeats is not None and not 1 <= args.repeats <= MAX_REPEATS:
        p.error(f"--repeats must be in [1, {MAX_REPEATS}], got {args.repeats}")
    if args.timeout is not None and not MIN_TIMEOUT_S <= args.timeout <= MAX_TIMEOUT_S:
        p.error(
            f"--timeout must be in [{MIN_TIMEOUT_S:g}, {MAX_TIMEOUT_S:g}] seconds, got {args.timeout}"
        )
    return args


SELECTING = {
    "modes": "variant labels (analysis.presets.VARIANTS)",
    "kernels": "attention kernels",
    "recomputes": "recompute settings",
}
"""The preset fields a command line may set: which schemes and settings run, never the model,
data, recipe or precision, so every ratio the table forms stays between like runs."""


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def select(preset: Preset, args: argparse.Namespace) -> Preset:
    """`preset` with the ``--modes`` / ``--kernels`` / ``--recomputes`` given in place of its
    own (the model, recipe, lengths and degrees stay the preset's). The summary, plan.json and
    every figure title then name the selection."""
    from lss_megatron.config import ATTENTION_KERNELS, RECOMPUTE

    from .presets import VARIANTS

    known = {"modes": tuple(VARIANTS), "kernels": ATTENTION_KERNELS, "recomputes": RECOMPUTE}
    changes = {}
    for key in SELECTING:
        wanted = getattr(args, key, None)
        if wanted is None:
            continue
        bad = [x for x in wanted if x not in known[key]] or ([] if wanted else ["(empty)"])
        if bad:
            raise InputError(
                f"--{key} {', '.join(bad)}: expected a comma-separated list of {', '.join(known[key])}"
            )
        changes[key] = wanted
    if not changes:
        return preset
    said = "; ".join(f"{k} {','.join(v)}" for k, v in changes.items())
    return dataclasses.replace(
        preset, summary=f"{preset.summary} [selected: {said}]", selection=said, **changes
    )


MAX_REPEATS = 1000
"""More repeats than this is a typo (the plan would hold millions of runs), not a measurement."""
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 7 * 24 * 3600.0
"""A per-run timeout below a second kills every launch before it imports; NaN fails both."""


def legacy_outputs(out: Path) -> list[str]:
    """What a comparison written before manifests holds: its files and the runs plan.json lists."""
    names = ["plan.json", "summary.csv", "runs.csv", "best_layouts.csv"]
    try:
        plan = json.loads((out / "plan.json").read_text())
        names += [f"runs/{r['run_id']}" for r in plan.get("runs", []) if isinstance(r, dict)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return names


def run_all(
    plan: Plan, out: Path, timeout_s: float, progress: bool, reuse: bool = False
) -> dict[str, dict]:
    from tqdm import tqdm

    outcomes: dict[str, dict] = {}
    failed = 0
    bar = tqdm(
        plan.runs,
        desc="compare",
        unit="run",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for order, run in enumerate(bar):
        bar.set_postfix_str(f"{run.run_id} (failed so far: {failed})")
        outcomes[run.run_id] = launch_recorded(
            run, out / "runs" / run.run_id, timeout_s, order, plan.seed, reuse
        )
        if outcomes[run.run_id]["status"] != "ok":
            failed += 1
            tqdm.write(f"run {run.run_id}: {outcomes[run.run_id]['status']}", file=sys.stderr)
    bar.close()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    return cli("analysis.compare", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    if args.list:
        _list_presets()
        return 0
    preset = select(get_preset(args.preset), args)
    out = Path(args.out or f"runs/compare-{preset.name}").resolve()
    seed = args.seed if args.seed is not None else _recorded_seed(out, args.collect)
    plan = make_plan(preset, args.repeats, seed, data_dir=out / "data")
    if args.dry_run:
        _print_plan(plan, out)
        return 0
    if preset.cluster and not args.collect:
        print(
            f"analysis.compare: preset {preset.name} needs a cluster ({preset.summary}): print "
            "its sbatch commands with --dry-run, run them, then build the table with --collect",
            file=sys.stderr,
        )
        return 2
    if args.collect and not (out / "runs").is_dir():
        raise InputError(f"--collect {out}: no runs/ folder there (nothing was launched into it)")
    outdir.take(
        out,
        "analysis.compare",
        what="comparison",
        overwrite=args.overwrite,
        resume=args.resume or args.collect,  # --collect builds the table of the runs there
        legacy=legacy_outputs,
    )
    _write_plan(plan, out)
    outdir.note(out / "plan.json")
    outcomes = None
    if not args.collect:
        write_documents(preset, out / "data")
        timeout = args.timeout if args.timeout is not None else preset.timeout_s
        outcomes = run_all(plan, out, timeout, progress=not args.no_progress, reuse=args.resume)
    runs, df, note = build_table(plan, out, outcomes)
    tables.write_summary(runs, out / "runs.csv")
    outdir.note(out / "runs.csv")
    csv = tables.write_summary(df, out / "summary.csv")
    from .figures import make_figures

    figures = make_figures(df, out / "figures")
    outdir.note(csv, *figures)
    print(tables.format_table(df))
    print()
    print(repeats.format_intervals(df, runs))
    print()
    if preset.ranks is not None or preset.grids:  # equal ranks: each mode's best rank grid
        best = tables.best_layouts(df)
        best.to_csv(out / "best_layouts.csv", index=False)
        outdir.note(out / "best_layouts.csv")
        print(tables.format_best_layouts(best))
        print()
    for run_id, why in plan.skipped:
        print(f"skipped (the trainer would reject it) {run_id}: {why}")
    if note:
        print(f"note: {note}")
    bad = runs[runs["status"] != "ok"]
    for _, row in bad.iterrows():
        print(f"{row['status']}: {row['run_id']}: {str(row['error'])[-500:]}")
    print(
        f"{len(runs) - len(bad)}/{len(runs)} runs ok ({len(df)} configurations x "
        f"{plan.repeats} repeats, order seed {plan.seed}); wrote {csv}, runs.csv and "
        f"{len(figures)} figure files in {out / 'figures'}; {time.perf_counter() - t0:.0f} s"
    )
    return 0 if bad.empty else 3


if __name__ == "__main__":
    sys.exit(main())
