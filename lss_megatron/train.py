"""The trainer: `torchrun --standalone --nproc-per-node P -m lss_megatron.train --mode lss ...`.

Parse -> validate (before any process group exists) -> init -> build -> loop -> metrics.

Every flag has a small built-in default, so ``torchrun --nproc-per-node 4 -m lss_megatron.train``
runs a short LSS job on 4 CPU processes. Outputs, in ``--out``:

* ``metrics.jsonl``: one JSON object per optimizer step (rank 0): ``step`` (1-based), ``loss`` (the
  global per-token mean training loss of that step), ``step_time_s``, ``tokens_per_s`` and this
  rank's communication counters (``sp_comm_bytes``, ``grad_comm_bytes``, calls);
* ``config.json``: the effective configuration after all derivations, plus what really ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from .config import MODES, ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig


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
    g.add_argument("--dtype", choices=("fp32",), default=d_t.dtype)
    g.add_argument("--data", choices=("synthetic",), default=d_t.data)
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
            position_embedding=args.position_embedding,
            causal=not args.no_causal,
        ),
        parallel=ParallelConfig(
            mode=args.mode,
            world_size=world_size,
            seq_parallel=n,
            data_parallel=args.data_parallel,
            dist_timeout_s=args.dist_timeout,
        ),
        train=TrainConfig(
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            steps=args.steps,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            dtype=args.dtype,
            data=args.data,
            out=args.out,
            log_interval=args.log_interval,
        ),
    )


def _init_distributed(cfg: RunConfig, rank: int) -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=cfg.parallel.dist_timeout_s)
    if "MASTER_ADDR" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            backend, rank=rank, world_size=cfg.parallel.world_size, timeout=timeout
        )
    elif cfg.parallel.world_size == 1:  # plain `python -m lss_megatron.train`
        store = Path(tempfile.mkdtemp(prefix="lss_store_")) / "store"
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout
        )
    else:
        raise RuntimeError("WORLD_SIZE > 1 but no MASTER_ADDR: launch with torchrun or deepspeed")


def run(cfg: RunConfig, rank: int) -> list[float]:
    """Train; return the per-step global losses (on every rank)."""
    import torch
    import torch.distributed as dist

    from . import comm
    from .checks import check_replicas
    from .grad_sync import GradientAverager
    from .grid import destroy_grid, initialize_grid
    from .log import get_logger
    from .model import build_model
    from .step import forward_backward, global_mean_loss, step_micro_batches

    log = get_logger("train")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    owns_process_group = not dist.is_initialized()
    if owns_process_group:
        _init_distributed(cfg, rank)
    try:
        grid = initialize_grid(cfg.parallel)
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        model = build_model(cfg.model, grid, mode=cfg.parallel.mode, seed=cfg.train.seed)
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.train.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.train.lr)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
        average_gradients = GradientAverager(model, grid)

        out = Path(cfg.train.out)
        metrics_path = out / "metrics.jsonl"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            effective = cfg.to_dict()
            effective["runtime"] = {
                "grid": repr(grid),
                "backend": dist.get_backend(),
                "core_attention": type(
                    model.decoder.layers[0].self_attention.core_attention
                ).__name__,
                # what Megatron really runs with, read back from the built model
                "tensor_parallel": model.config.tensor_model_parallel_size,
                "sequence_parallel": bool(model.config.sequence_parallel),
                "context_parallel": model.config.context_parallel_size,
                "parameters_per_rank": sum(p.numel() for p in params),
                "torch": torch.__version__,
                "megatron_core": _megatron_version(),
            }
            (out / "config.json").write_text(json.dumps(effective, indent=2) + "\n")
            metrics_path.write_text("")
        log.info("run: %s, %s", grid, cfg.model)

        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        losses = []
        for step in range(1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with comm.record() as clog:
                micro = step_micro_batches(cfg, grid, step, device)
                local_loss, _ = forward_backward(model, micro)
                average_gradients()
                loss = global_mean_loss(local_loss, grid)
            opt.step()
            dt = time.perf_counter() - t0
            losses.append(loss)
            if rank == 0:
                rec = {
                    "step": step,
                    "loss": loss,
                    "step_time_s": dt,
                    "tokens_per_s": tokens_per_step / dt,
                    **clog.summary(),
                }
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                    log.info(
                        "step %d/%d loss %.6f (%.3f s, %.0f tok/s)",
                        step,
                        cfg.train.steps,
                        loss,
                        dt,
                        tokens_per_step / dt,
                    )
        replicas = check_replicas(model, grid)
        if rank == 0:
            summary = {"steps": len(losses), "final_loss": losses[-1], "replicas": replicas}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not replicas["bitwise_equal"]:
            raise RuntimeError(
                f"replicated parameters diverged across ranks: {replicas['mismatched']}"
            )
        log.info(
            "done: final loss %.6f; replicas bitwise equal across %d ranks",
            losses[-1],
            grid.world_size,
        )
        return losses
    finally:
        destroy_grid()
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "unknown"


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
    try:
        run(cfg, rank)
    except Exception:
        from .log import get_logger

        get_logger("train").exception("rank %d failed", rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
