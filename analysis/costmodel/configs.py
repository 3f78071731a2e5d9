"""The configurations the cost model predicts: the trainer's own, and what-ifs beyond it.

A configuration is the trainer's effective configuration (`RunConfig.to_dict()`, the schema of a
run's config.json), built and checked by the trainer itself (`analysis.trainer_config`): its
flags, defaults, derivations and limits, the per-mode ones included. `make_config` builds one from
numbers, `config_from_preset` from a launch/presets YAML file; either raises `ConfigError` with
the trainer's messages for a layout the trainer would refuse (data files aside: the cost model
reads none).

Two things the trainer does not run are what-ifs written over its configuration, each checked
as the trainer value with the same limits (`TWINS`):

* dtype ``fp16`` (V100 tensor cores; half-precision activations and compute, fp32 master
  weights): checked as ``fp32``;
* the ``costmodel`` section: ``attention_kernel`` ``auto``, ``flash`` or ``materialized``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from lss_megatron.config import ConfigError, ModelConfig

from ..trainer_config import argv, from_dict, problems, run_config

TWINS = {("train", "dtype"): {"fp16": "fp32"}}
"""(section, field) -> {what-if value: the trainer value it is checked as}."""
COSTMODEL_KEYS = ("attention_kernel", "param_dtype")
"""Keys of the ``costmodel`` section (`counts.layout_from_config`), not trainer flags."""


def _build(head: list[str], values: Mapping[str, object]) -> dict:
    """The checked configuration of the trainer arguments `head` plus `values` (make_config's
    names: trainer flags with underscores, ``causal``, the `COSTMODEL_KEYS`)."""
    flags = {k: v for k, v in values.items() if k not in COSTMODEL_KEYS and k != "causal"}
    if values.get("causal") is False:
        flags["no_causal"] = True
    what_if = {}
    for (section, key), twins in TWINS.items():
        if flags.get(key) in twins:
            what_if[section, key] = flags[key]
            flags[key] = twins[flags[key]]
    cfg = run_config([*head, *argv(flags)])
    found = problems(cfg, data_elsewhere=True)
    if found:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(found))
    out = cfg.to_dict()
    for (section, key), value in what_if.items():
        out[section][key] = value
    out["costmodel"] = {"attention_kernel": values.get("attention_kernel", "auto")}
    if "param_dtype" in values:
        out["costmodel"]["param_dtype"] = values["param_dtype"]
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
    attention_kernel: str = "auto",
    **flags,
) -> dict:
    """A configuration from numbers: `mode` (any of `counts.MODES`) on an N x D grid. `flags`:
    any other trainer flag by its name (``micro_batch_size``, ``num_kv_heads``,
    ``ffn_hidden_size``, ``vocab_size``, ``make_vocab_size_divisible_by``,
    ``position_embedding``, ``causal``, ``dtype``, ``optimizer``, ``lss_layout``,
    ``kv_gather_chunks``, ``zero_stage``, ...), the trainer's defaults otherwise. ``dtype``
    fp16/bf16 means half-precision activations and compute with fp32 master weights and
    gradients (the trainer's bf16 on GPU). Raises `ConfigError` where the trainer would refuse."""
    return _build(
        [],
        dict(
            mode=mode,
            seq_parallel=seq_parallel,
            data_parallel=data_parallel,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            seq_length=seq_length,
            global_batch_size=global_batch_size,
            attention_kernel=attention_kernel,
            **flags,
        ),
    )


def config_from_model(
    mode: str, seq_parallel: int, data_parallel: int, model: ModelConfig, **flags
) -> dict:
    """`make_config` of the trainer's own `ModelConfig` (every field of it as the model flags):
    the one place a model described as the trainer describes it becomes a configuration
    (`analysis.emulate`'s layer shapes, the tests). `flags`: the rest, as `make_config`'s
    (``global_batch_size`` is required)."""
    return make_config(mode, seq_parallel, data_parallel, **dataclasses.asdict(model), **flags)


def config_from_preset(path: str | Path, **overrides) -> dict:
    """The configuration of a launch/presets/*.yaml file, read by the trainer's own ``--config``;
    `overrides` in `make_config`'s names (e.g. mode="nvidia-sp", dtype="fp16")."""
    return _build(["--config", str(path)], overrides)


def layout_problems(config: dict) -> list[str]:
    """Why the trainer would refuse `config` (its own messages: head, FFN and vocabulary
    divisibility, sequence length, ...), what-ifs checked as their `TWINS`; empty when it can
    run. Data files are not checked: the cost model reads none."""
    c = copy.deepcopy(config)
    for (section, key), twins in TWINS.items():
        if c[section].get(key) in twins:
            c[section][key] = twins[c[section][key]]
    return problems(from_dict(c), data_elsewhere=True)
