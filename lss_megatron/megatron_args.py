"""Megatron-LM's spelling of the trainer's options, where its meaning needs a rule (torch-free).

Flags of the same meaning and values are plain aliases, declared on the config fields
(``config._opt(aliases=...)``: ``--num-attention-heads``, ``--num-query-groups``,
``--train-iters``, ``--lr-warmup-iters``, ``--lr-decay-style``, ``--eval-iters``,
``--deepspeed_config``). The ones here translate into ours after parsing (`resolve`):

* ``--tensor-model-parallel-size T``: with ``--mode nvidia-sp`` the degree N of NVIDIA sequence
  parallelism (Megatron TP with ``sequence_parallel``, as in Megatron-LM); with lss, the tensor
  parallelism T inside each sequence rank;
* ``--context-parallel-size N``: the sequence group N of lss / ulysses (Megatron's context-parallel
  group); nvidia-sp has none (its degree is the tensor-parallel size), so N > 1 is refused there;
* ``--bf16``: ``--dtype bf16``; ``--fp16``: ``--dtype fp16`` (its loss-scaling flags are
  config fields of Megatron-LM's names: ``--loss-scale``, ``--initial-loss-scale``,
  ``--min-loss-scale``, ``--loss-scale-window``, ``--hysteresis``);
* ``--position-embedding-type {learned_absolute,rope}``: ``--position-embedding {learned,rope}``;
* ``--max-position-embeddings M``: the learned table has exactly ``--seq-length`` rows here
  (sequence-distributed in LSS), so M must equal it.

A flag given in both spellings with different values is refused, naming both.
"""

from __future__ import annotations

import argparse

from .config import ConfigError
from .modes import find_mode

POSITION_TYPES = {"learned_absolute": "learned", "rope": "rope"}
"""Megatron-LM's --position-embedding-type values -> ours."""


class _MapValue(argparse.Action):
    """Store ``mapping[value]`` (the choices are the mapping's keys)."""

    def __init__(self, option_strings, dest, mapping: dict, **kwargs):
        self.mapping = mapping
        super().__init__(option_strings, dest, choices=list(mapping), **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.mapping[values])


def add_to(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags that need a rule, in their own --help group."""
    g = parser.add_argument_group(
        "Megatron-LM spelling (docs/megatron-lm.md); plain aliases are listed with their options"
    )
    g.add_argument(
        "--tensor-model-parallel-size",
        dest="megatron_tp",
        type=int,
        default=None,
        metavar="T",
        help="nvidia-sp: its size N (Megatron TP + sequence_parallel); lss: --tensor-parallel",
    )
    g.add_argument(
        "--context-parallel-size",
        dest="megatron_cp",
        type=int,
        default=None,
        metavar="N",
        help="lss / ulysses: --seq-parallel N (the sequence group); refused by nvidia-sp",
    )
    g.add_argument("--bf16", dest="dtype", action="store_const", const="bf16", help="--dtype bf16")
    g.add_argument(
        "--fp16",
        dest="dtype",
        action="store_const",
        const="fp16",
        help="--dtype fp16 (with Megatron's dynamic loss scaling)",
    )
    g.add_argument(
        "--position-embedding-type",
        dest="position_embedding",
        action=_MapValue,
        mapping=POSITION_TYPES,
        help="learned_absolute (--position-embedding learned) or rope",
    )
    g.add_argument(
        "--max-position-embeddings",
        dest="megatron_max_pos",
        type=int,
        default=None,
        metavar="M",
        help="accepted when equal to --seq-length (the learned table has l rows)",
    )


SPECIAL_DESTS = ("megatron_tp", "megatron_cp", "megatron_max_pos")
"""argparse names of this module's flags that are not config fields."""


def resolve(args: argparse.Namespace, parallel: dict, model: dict) -> None:
    """Fold the Megatron-LM flags of `args` into the config values `parallel` and `model`
    (in place); raises `ConfigError` naming a contradiction."""
    problems = []
    mode = parallel["mode"]
    declared = find_mode(mode)
    by_tp = declared is not None and declared.degree_group == "tensor"  # nvidia-sp: its N is TP
    tp, cp = getattr(args, "megatron_tp", None), getattr(args, "megatron_cp", None)

    def put(key: str, value: int, flag: str, ours: str) -> None:
        old = parallel.get(key)
        if old not in (None, 1) and old != value:
            problems.append(f"{flag} {value} contradicts {ours} {old}")
        else:
            parallel[key] = value

    if tp is not None:
        if by_tp:
            put("seq_parallel", tp, "--tensor-model-parallel-size", "--seq-parallel")
        else:
            put("tensor_parallel", tp, "--tensor-model-parallel-size", "--tensor-parallel")
    if cp is not None:
        if by_tp and cp != 1:
            problems.append(
                f"--context-parallel-size {cp}: {mode} has no context-parallel group; its "
                "degree is --tensor-model-parallel-size"
            )
        else:
            put("seq_parallel", cp, "--context-parallel-size", "--seq-parallel")
    max_pos = getattr(args, "megatron_max_pos", None)
    if max_pos is not None and max_pos != model["seq_length"]:
        problems.append(
            f"--max-position-embeddings {max_pos} must equal --seq-length {model['seq_length']} "
            "(the learned position table has exactly l rows, sequence-distributed in LSS)"
        )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
