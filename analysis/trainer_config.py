"""The trainer's own configuration, as analysis builds and checks it: the one bridge.

Everything in analysis/ that needs a run's configuration gets it here, from the trainer itself:
its command line (flag names, types, choices, defaults and ``--config FILE.yaml`` presets,
`lss_megatron.train`), its `RunConfig` (what it derives: N, D, micro-batches, the padded
vocabulary) and its validation (every limit, the per-mode ones included). Nothing here restates
the schema, so a flag added to the trainer is known here at once.

    cfg = run_config(["--config", "launch/presets/small-cpu-lss.yaml", "--seq-parallel", "2"])
    problems(cfg)            # [] when the trainer would start it
    cfg.to_dict()            # its effective configuration, as the trainer writes config.json
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Mapping, Sequence

from lss_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from lss_megatron.train import ArgsError, build_parser, config_from_args, parse_args

_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig}


def argv(flags: Mapping[str, object]) -> list[str]:
    """Trainer arguments from ``{flag: value}``, a flag named with dashes or underscores
    (``seq-parallel`` or ``seq_parallel``); True gives a bare switch, False and None nothing."""
    out: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    return out


def trainer_actions() -> dict[str, argparse.Action]:
    """The trainer parser's options by option string (``--zero-stage``, ...)."""
    return {s: a for a in build_parser()._actions for s in a.option_strings}


def trainer_flags() -> frozenset[str]:
    """Every option string the trainer's parser knows (``--zero-stage``, ...)."""
    return frozenset(trainer_actions())


def run_config(args: Sequence[str], world_size: int | None = None) -> RunConfig:
    """The trainer's `RunConfig` of the command line `args`, not validated. `world_size` P
    defaults to the command line's N x T x D (one absent counts 1). Arguments the trainer's
    parser refuses (an unknown flag, a value outside its choices) raise `ConfigError`."""
    try:
        parsed = parse_args(list(args), exit_on_error=False)
    except ArgsError as e:
        raise ConfigError(f"the trainer rejects the arguments: {shlex.join(args)} ({e})") from None
    if world_size is None:
        world_size = (
            (parsed.seq_parallel or 1) * (parsed.tensor_parallel or 1) * (parsed.data_parallel or 1)
        )
    return config_from_args(parsed, world_size)


def problems(cfg: RunConfig, data_elsewhere: bool = False) -> list[str]:
    """The trainer's own verdict on `cfg` (`RunConfig.validate`): every problem, one line each;
    empty when it would start. `data_elsewhere`: the data file lives on another machine (a
    cluster, or nowhere: the cost model reads no data), so ``--data-path`` problems are not the
    run's."""
    try:
        cfg.validate()
    except ConfigError as e:
        items = [x.strip() for x in str(e).split("\n  - ")[1:]] or [str(e)]
        if data_elsewhere:
            items = [x for x in items if not x.startswith("--data-path")]
        return [" ".join(x.split()) for x in items]
    return []


def from_dict(config: Mapping) -> RunConfig:
    """The `RunConfig` of an effective configuration (`RunConfig.to_dict()`, a run's
    config.json): each section's fields, whatever else the dict holds left aside."""
    return RunConfig(
        **{
            name: cls(
                **{
                    f.name: config[name][f.name]
                    for f in dataclasses.fields(cls)
                    if f.name in config.get(name, {})
                }
            )
            for name, cls in _SECTIONS.items()
        }
    )
