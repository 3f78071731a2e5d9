"""The trainer: `torchrun --standalone --nproc-per-node P -m lss_megatron.train --mode lss ...`.

Parse -> validate (before any process group exists) -> init -> build -> loop -> metrics.

The command line is derived from the config dataclasses (config.py): one option per field, with
the field's flag, type, choices and help; a ``--config FILE.yaml`` preset supplies defaults the
flags override. Every flag has a small built-in default, so
``torchrun --nproc-per-node 4 -m lss_megatron.train`` runs a short LSS job on 4 CPU processes.
Outputs, in ``--out``:

* ``metrics.jsonl``: one JSON object per optimizer step (rank 0): ``step`` (1-based), ``loss`` (the
  global per-token mean training loss of that step), ``step_time_s`` (the slowest rank's),
  ``tokens_per_s`` and this rank's communication counters (``sp_comm_bytes``,
  ``grad_comm_bytes``, calls);
* ``config.json``: the effective configuration after all derivations, plus what really ran
  (``runtime``: among others the attention kernel, recompute and dtype read back from the built
  model; a model that runs other settings than requested refuses to start).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
import warnings
from pathlib import Path

from .config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from .envvars import launch_env
from .estimate import estimate, memory_problems
from .lifeline import install as install_lifeline
from .log import setup_logging
from .megatron_args import add_to as add_megatron_flags
from .megatron_args import resolve as resolve_megatron_flags
from .modes import MODES, get_mode
from .resources import find_preset, preset_names, prog
from .resume import resume_problems
from .runs import default_out, plan
from .strict_yaml import YamlFileError, check_value, load_file

PROG = prog("python -m lss_megatron.train")
SECTIONS = {ParallelConfig: "parallel layout", ModelConfig: "model", TrainConfig: "training"}
"""Each config class and the --help section of its options (a field's metadata may move one)."""
_NOT_PRESET_KEYS = ("config", "help", "local_rank", "validate_only")


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option: a config field seen from the command line."""

    owner: type
    field: dataclasses.Field

    @property
    def flag(self) -> str:
        return self.field.metadata["flag"] or "--" + self.field.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The argparse name, and the key of a YAML preset (with '-' or '_')."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def negated(self) -> bool:
        """A ``--no-x`` switch for a bool field that defaults to True."""
        return self.flag.startswith("--no-")

    def add_to(self, group) -> None:
        meta, f = self.field.metadata, self.field
        kind = _base_type(typing.get_type_hints(self.owner)[f.name])
        default = f.default if meta["cli_default"] is dataclasses.MISSING else meta["cli_default"]
        text = meta["help"].replace("%", "%%")
        if default not in (None, False, ()) and kind is not bool:
            text += " (default: %(default)s)"
        kwargs = {"help": argparse.SUPPRESS if meta["hidden"] else text}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(default=default, choices=meta["choices"], metavar=meta["metavar"])
            if kind is not str:  # strings stay argparse's own (no type), as YAML values do
                kwargs["type"] = kind
        group.add_argument(self.flag, *meta.get("aliases", ()), dest=self.dest, **kwargs)

    def value(self, args: argparse.Namespace):
        v = getattr(args, self.dest)
        return not v if self.negated else v


def _base_type(hint) -> type:
    """int | None -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def options() -> list[Option]:
    """Every command-line option, in --help order."""
    return [Option(cls, f) for cls in SECTIONS for f in dataclasses.fields(cls) if f.metadata]


def build_parser(*, exit_on_error: bool = True) -> argparse.ArgumentParser:
    """The trainer's parser; on a bad argument it prints usage and exits 2 (argparse's way), or,
    with ``exit_on_error=False``, raises `ArgsError`."""
    p = (argparse.ArgumentParser if exit_on_error else _RaisingParser)(
        prog=PROG,
        description="Train a Megatron-Core GPT model with LSS sequence parallelism, the NVIDIA "
        "sequence-parallel or DeepSpeed-Ulysses baselines, or serially.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML preset, a file or a packaged preset's name (" + ", ".join(preset_names()) + "): "
        "keys are flag names (e.g. seq-length: 1024; Megatron-LM's names too); flags given "
        "on the command line override it",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options():
        section = opt.field.metadata["section"] or SECTIONS[opt.owner]
        if section not in groups:
            groups[section] = p.add_argument_group(section)
        opt.add_to(groups[section])
    add_megatron_flags(p)
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="check the configuration, folders and memory estimate, then exit (0: it would run)",
    )
    # the DeepSpeed launcher passes --local_rank=i; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


class ArgsError(ConfigError):
    """A command line (or preset) that does not parse; `usage` is the parser's usage line."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class _RaisingParser(argparse.ArgumentParser):
    """Raises `ArgsError` instead of exiting, so a caller gets an error it can handle."""

    def error(self, message: str):
        raise ArgsError(message, self.format_usage())


def parse_args(argv: list[str] | None = None, *, exit_on_error: bool = True) -> argparse.Namespace:
    """Parse the command line; a ``--config FILE.yaml`` supplies defaults the flags override.
    What does not parse exits 2 with argparse's message, or raises `ArgsError` (a `ConfigError`)
    with ``exit_on_error=False``."""
    parser = build_parser(exit_on_error=exit_on_error)
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_yaml_preset(args.config, parser))
        args = parser.parse_args(argv)
    return args


def load_yaml_preset(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML preset into argparse defaults; unknown keys and ill-typed values are errors
    (strict_yaml.py: no coercion), all reported in one message."""
    if not Path(path).exists() and find_preset(path) is not None:
        path = str(find_preset(path))  # a packaged preset named as such: --config tiny-cpu
    if not Path(path).exists():
        parser.error(f"--config {path}: no such file, nor a packaged preset {preset_names()}")
    try:  # a FIFO, folder, binary file, duplicate key or alias bomb: one line (strict_yaml)
        data = load_file(path, "--config") or {}
    except YamlFileError as e:
        parser.error(str(e))
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    # a key is any of a flag's names (ours or Megatron-LM's), with '-' or '_'
    actions = {
        s.lstrip("-").replace("-", "_"): a
        for a in parser._actions
        if a.dest not in _NOT_PRESET_KEYS
        for s in a.option_strings
    }
    out, unknown, bad = {}, [], []
    for key, value in data.items():
        action = actions.get(str(key).lstrip("-").replace("-", "_"))
        if action is None:
            unknown.append(str(key))
            continue
        value, problem = _preset_value(str(key), value, action)
        if problem:
            bad.append(problem)
        elif value is not _ABSENT:
            out[action.dest] = value
    if unknown:
        bad.insert(0, f"unknown keys {unknown}")
    if bad:
        parser.error(f"--config {path}: " + "; ".join(bad))
    return out


_ABSENT = object()


def _preset_value(key: str, value, action: argparse.Action):
    """A preset value for `action`: a constant switch (``bf16: true``) or a translated choice
    (``position-embedding-type: rope``), else strict_yaml's check."""
    if isinstance(action, argparse._StoreConstAction) and not isinstance(
        action, argparse._StoreTrueAction | argparse._StoreFalseAction
    ):
        if not isinstance(value, bool):
            return None, f"{key}: {value!r} is not a boolean; write true or false without quotes"
        return (action.const if value else _ABSENT), None
    mapping = getattr(action, "mapping", None)
    if mapping is not None:
        if value not in mapping:
            return None, f"{key}: {value!r} is not one of {list(mapping)}"
        return mapping[value], None
    return check_value(key, value, action)


def _without_degree(mode: str) -> bool:
    """A mode without a degree group runs at N = 1 (serial)."""
    return mode in MODES and get_mode(mode).degree_group is None


def config_from_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The (not yet validated) configuration of parsed `args` on `world_size` processes; N
    defaults to P / T (1 for serial)."""
    values: dict[type, dict] = {cls: {} for cls in SECTIONS}
    for opt in options():
        values[opt.owner][opt.field.name] = opt.value(args)
    parallel, train = values[ParallelConfig], values[TrainConfig]
    resolve_megatron_flags(args, parallel, values[ModelConfig])
    if train["out"] is None:  # a fresh folder per run, the same on every rank
        train["out"] = default_out(parallel["mode"])
    if parallel["seq_parallel"] is None:  # N = P / T (T = --tensor-parallel, 1 by default)
        t = parallel.get("tensor_parallel") or 1
        whole = t >= 1 and world_size % t == 0
        parallel["seq_parallel"] = (
            1 if _without_degree(parallel["mode"]) else (world_size // t if whole else world_size)
        )
    return RunConfig(
        model=ModelConfig(**values[ModelConfig]),
        parallel=ParallelConfig(world_size=world_size, **parallel),
        train=TrainConfig(**values[TrainConfig]),
    )


def config_from_argv(argv: list[str], world_size: int) -> RunConfig:
    """Parse `argv` (with its ``--config`` preset), derive and validate, for `world_size`
    processes. Raises `ConfigError` naming every problem; builds no process group."""
    return config_from_args(parse_args(argv, exit_on_error=False), world_size).validate()


def preflight(args: argparse.Namespace, env=None, env_problems=()) -> RunConfig:
    """Everything checked before any process group exists, read-only: the launcher's environment,
    the configuration, the folders (runs.py) and the per-rank memory estimate (estimate.py).
    Raises one `ConfigError` listing every problem; returns the validated configuration."""
    if env is None:
        env, env_problems = launch_env()
    if env_problems:
        raise ConfigError("invalid launch environment:\n  - " + "\n  - ".join(env_problems))
    cfg = config_from_args(args, env.world_size)
    try:
        cfg.validate()
        problems = []
    except ConfigError as e:  # "invalid configuration:" and one "  - problem" line each
        problems = [x.strip()[2:] for x in str(e).splitlines()[1:]]
    folders = plan(cfg.train)  # folders: independent of the rest
    problems += folders.problems
    if not problems and folders.load_path is not None:  # what the resume would change
        problems += resume_problems(folders.load_path, cfg.to_dict())
    if not problems and cfg.train.memory_check:
        problems += memory_problems(cfg, env.local_rank, env.local_world_size)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


SILENT_EXIT_DELAY_S = 10.0
"""How long a rank that refuses bad input without printing it waits before exiting: the launcher
(torchrun, DeepSpeed) stops the job at the first exit, so a quiet rank leaving first would kill
rank 0 before it prints the one line. Rank 0's exit ends the wait (the launcher stops the rest)."""


def _refused(speaks: bool, launched: bool) -> int:
    if launched and not speaks:
        time.sleep(SILENT_EXIT_DELAY_S)
    return 2


def main(argv: list[str] | None = None) -> int:
    # Megatron-Core warns about missing apex/TransformerEngine and deprecated defaults on every
    # rank; they are expected here (see docs/design.md) and drown the training log.
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    env, env_problems = launch_env()
    speaks = env.rank == 0  # bad input is the same on every rank: one of them says so (exit 2)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, exit_on_error=False)
    except ArgsError as e:  # as argparse itself: usage, the message, exit status 2
        if speaks:
            sys.stderr.write(f"{e.usage}{PROG}: error: {e}\n")
        raise SystemExit(_refused(speaks, env.launched)) from None
    if env.launched and not args.validate_only:
        install_lifeline()  # this rank ends within seconds of its launcher (lifeline.py)
    try:
        cfg = preflight(args, env, env_problems)
    except ConfigError as e:
        if speaks:
            print(f"lss_megatron.train: error: {e}", file=sys.stderr)
        return _refused(speaks, env.launched)
    if args.validate_only:
        p = cfg.parallel
        print(
            f"lss_megatron.train: valid: --mode {p.mode}, P = {p.world_size} = N {p.seq_parallel} "
            f"x T {p.tensor_parallel} x D {p.dp}; per-rank memory estimate "
            f"{estimate(cfg).describe()}"
        )
        return 0
    from .training.loop import run  # torch and Megatron load only once the config is valid

    setup_logging(env.rank)
    return run(cfg, env.rank).exit_code


if __name__ == "__main__":
    sys.exit(main())
