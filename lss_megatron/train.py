"""The trainer: `torchrun --standalone --nproc-per-node P -m lss_megatron.train --mode lss ...`.

Parse -> validate (before any process group exists) -> init -> build -> loop -> metrics.

Every flag has a small built-in default, so ``torchrun --nproc-per-node 4 -m lss_megatron.train``
runs a short LSS job on 4 CPU processes. Outputs, in ``--out``:

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
import os
import sys
from pathlib import Path

from .config import (
    ATTENTION_KERNELS,
    DATASETS,
    DTYPES,
    LR_SCHEDULES,
    MODES,
    RECOMPUTE,
    ZERO_STAGES,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lss_megatron.train",
        description="Train a Megatron-Core GPT model with LSS sequence parallelism, the NVIDIA "
        "sequence-parallel baseline, or serially.",
        allow_abbrev=False,
    )
    d_m, d_t = ModelConfig(), TrainConfig()
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML preset: keys are flag names (e.g. seq-length: 1024); flags given "
        "on the command line override it",
    )
    g = p.add_argument_group("parallel layout")
    g.add_argument("--mode", choices=MODES, default="lss")
    g.add_argument(
        "--seq-parallel",
        type=int,
        default=None,
        help="N, segments per sequence (default: P for lss, 1 for serial)",
    )
    g.add_argument("--data-parallel", type=int, default=None, help="D (default: P / N)")
    g.add_argument(
        "--kv-gather-chunks",
        type=int,
        default=1,
        metavar="C",
        help="LSS: gather K/V in C double-buffered head chunks (bounded memory)",
    )
    g.add_argument(
        "--lss-layout",
        choices=("contiguous", "zigzag"),
        default="contiguous",
        help="LSS segments: contiguous (paper) or zigzag (causal load balance)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds before a hung collective fails the job",
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=d_m.num_layers)
    g.add_argument("--hidden-size", type=int, default=d_m.hidden_size)
    g.add_argument("--num-heads", type=int, default=d_m.num_heads)
    g.add_argument("--num-kv-heads", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=d_m.seq_length)
    g.add_argument("--vocab-size", type=int, default=d_m.vocab_size)
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=d_m.make_vocab_size_divisible_by,
        help="pad the model vocabulary to a multiple of this (same in every mode)",
    )
    g.add_argument(
        "--position-embedding", default=d_m.position_embedding, choices=("learned", "rope")
    )
    g.add_argument("--no-causal", action="store_true", help="bidirectional attention")
    g = p.add_argument_group("training")
    g.add_argument("--global-batch-size", type=int, default=d_t.global_batch_size)
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--steps", type=int, default=d_t.steps)
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=d_t.optimizer)
    g.add_argument("--lr", type=float, default=d_t.lr)
    g.add_argument("--seed", type=int, default=d_t.seed)
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d_t.dtype,
        help="bf16: Megatron mixed precision (bf16 parameters and activations, fp32 master "
        "weights, optimizer state and gradient reduction)",
    )
    g.add_argument(
        "--attention-kernel",
        choices=ATTENTION_KERNELS,
        default=d_t.attention_kernel,
        help="flash: memory-efficient attention in every mode (nothing quadratic saved); "
        "dense: scores materialised and probabilities saved in every mode",
    )
    g.add_argument(
        "--recompute",
        choices=RECOMPUTE,
        default=d_t.recompute,
        help="Megatron activation recompute: selective (core attention) or full (every layer)",
    )
    g.add_argument("--weight-decay", type=float, default=d_t.weight_decay)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d_t.lr_schedule)
    g.add_argument("--warmup-steps", type=int, default=d_t.warmup_steps)
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr/10)")
    g.add_argument(
        "--clip-grad",
        type=float,
        default=d_t.clip_grad,
        help="clip to this global gradient norm; 0 disables",
    )
    g.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip a step whose loss is not finite instead of stopping",
    )
    g.add_argument(
        "--zero-stage",
        type=int,
        choices=ZERO_STAGES,
        default=d_t.zero_stage,
        help="DeepSpeed ZeRO over all P ranks: 1 shards optimizer state, 2 also gradients",
    )
    g.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # testing aid, see config.py
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default=d_t.data)
    g.add_argument("--data-path", default=None, help="the data file (enwik8: raw or .zip)")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=d_t.eval_interval,
        help="validate every K steps and at the end (0: never)",
    )
    g.add_argument(
        "--eval-steps",
        type=int,
        default=d_t.eval_steps,
        help="validation batches (of G sequences) per evaluation",
    )
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--save", default=None, metavar="DIR", help="checkpoint folder")
    g.add_argument("--save-interval", type=int, default=d_t.save_interval, metavar="K")
    g.add_argument(
        "--load",
        default=None,
        metavar="DIR",
        help="resume from the newest checkpoint in DIR, or from DIR/step_K itself "
        "(any layout or mode)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="K",
        help="end after step K as if interrupted; schedules still span --steps",
    )
    g.add_argument("--progress", choices=("auto", "on", "off"), default=d_t.progress)
    g.add_argument("--out", default=d_t.out)
    g.add_argument("--log-interval", type=int, default=d_t.log_interval)
    # the DeepSpeed launcher passes --local_rank=i; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a ``--config FILE.yaml`` supplies defaults the flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_yaml_preset(args.config, parser))
        args = parser.parse_args(argv)
    return args


def load_yaml_preset(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML preset into argparse defaults; unknown keys and bad values are errors."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    out, unknown = {}, []
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("config", "help", "local_rank"):
            unknown.append(str(key))
            continue
        action = actions[dest]
        if action.type is not None and value is not None and not isinstance(value, bool):
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}: {value!r} is not one of {list(action.choices)}")
        out[dest] = value
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}")
    return out


def config_from_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    n = args.seq_parallel
    if n is None:
        n = 1 if args.mode == "serial" else world_size
    return RunConfig(
        model=ModelConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            ffn_hidden_size=args.ffn_hidden_size,
            seq_length=args.seq_length,
            vocab_size=args.vocab_size,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            position_embedding=args.position_embedding,
            causal=not args.no_causal,
        ),
        parallel=ParallelConfig(
            mode=args.mode,
            world_size=world_size,
            seq_parallel=n,
            data_parallel=args.data_parallel,
            dist_timeout_s=args.dist_timeout,
            lss_layout=args.lss_layout,
            kv_gather_chunks=args.kv_gather_chunks,
        ),
        train=TrainConfig(
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            steps=args.steps,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            dtype=args.dtype,
            attention_kernel=args.attention_kernel,
            recompute=args.recompute,
            data=args.data,
            out=args.out,
            log_interval=args.log_interval,
            weight_decay=args.weight_decay,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            min_lr=args.min_lr,
            clip_grad=args.clip_grad,
            save=args.save,
            save_interval=args.save_interval,
            load=args.load,
            stop_after=args.stop_after,
            skip_nonfinite=args.skip_nonfinite,
            data_path=args.data_path,
            eval_interval=args.eval_interval,
            eval_steps=args.eval_steps,
            progress=args.progress,
            fault=args.fault,
            zero_stage=args.zero_stage,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Megatron-Core warns about missing apex/TransformerEngine and deprecated defaults on every
    # rank; they are expected here (see docs/design.md) and drown the training log.
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = config_from_args(args, world_size).validate()
    except ConfigError as e:
        print(f"lss_megatron.train: error: {e}", file=sys.stderr)
        return 2
    from .log import setup_logging

    setup_logging(rank)
    from .loop import run

    return run(cfg, rank).exit_code


if __name__ == "__main__":
    sys.exit(main())
