"""The training loop behind `python -m lss_megatron.train` (train.py parses and validates).

init -> grid -> model -> optimizer -> [resume] -> steps (data, forward/backward, double gradient
averaging, non-finite check, global-norm clipping, optimizer, metrics, checkpoints, evaluation)
-> replica check -> summary. With ``--zero-stage 1|2`` DeepSpeed's ZeRO engine (zero.py) owns the
gradient averaging, clipping and optimizer step; everything else is the same.

Exit codes: 0 done; 1 a failure (exception, collective timeout, a dead peer); 2 a checkpoint that
cannot be used; 3 a non-finite loss (without ``--skip-nonfinite``). Every rank takes the same
decision on a non-finite loss because the loss it tests is the all-reduced global loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import comm
from .checkpoint import (
    CheckpointError,
    check_compatible,
    find_latest,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from .checks import check_replicas
from .config import RunConfig
from .grad_sync import GradientAverager
from .grid import destroy_grid, initialize_grid
from .log import get_logger
from .metrics import (
    SavedBytes,
    TransientPeak,
    memory_stats,
    model_flops_per_step,
    peak_mem_bytes,
    step_time_summary,
)
from .model import build_model, check_settings
from .optim import (
    MasterWeights,
    build_optimizer,
    clip_gradients,
    global_grad_norm,
    lr_at,
    set_lr,
)
from .step import evaluate, forward_backward, global_mean_loss, step_micro_batches

log = get_logger("train")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunResult:
    exit_code: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)
    skipped_steps: int = 0


def init_distributed(cfg: RunConfig, rank: int) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=cfg.parallel.dist_timeout_s)
    if "MASTER_ADDR" in os.environ:
        if torch.cuda.is_available():
            # schedulers that give each task only its own GPU expose one device: wrap around
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=cfg.parallel.world_size, timeout=timeout
        )
    elif cfg.parallel.world_size == 1:  # plain `python -m lss_megatron.train`
        store = Path(tempfile.mkdtemp(prefix="lss_store_")) / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                                timeout=timeout)  # fmt: skip
    else:
        raise RuntimeError("WORLD_SIZE > 1 but no MASTER_ADDR: launch with torchrun or deepspeed")


def _fault(cfg: RunConfig, rank: int, step: int) -> str | None:
    """The injected failure for this rank and step (testing aid, `--fault KIND:RANK:STEP`)."""
    if not cfg.train.fault:
        return None
    kind, r, s = cfg.train.fault.split(":")
    return kind if (int(r), int(s)) == (rank, step) else None


def _explain(exc: BaseException, cfg: RunConfig) -> str:
    text = str(exc)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return (f"a collective timed out after {cfg.parallel.dist_timeout_s:g} s (--dist-timeout): "
                "a peer rank is hung or gone")  # fmt: skip
    if "connection closed" in low or "connection reset" in low or "broken pipe" in low:
        return "a peer rank died (its connection closed)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class _Progress:
    """tqdm bar on rank 0 (step, loss, tokens/s), or nothing."""

    def __init__(self, cfg: RunConfig, rank: int, start: int, last: int):
        want = cfg.train.progress == "on" or (cfg.train.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if rank == 0 and want:
            from tqdm import tqdm

            self.bar = tqdm(
                total=last, initial=start, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: RunConfig, rank: int) -> RunResult:
    """Train per `cfg`; returns the result on every rank (exit code, losses by step)."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    owns_process_group = not dist.is_initialized()
    result = RunResult()
    try:
        if owns_process_group:
            init_distributed(cfg, rank)
        _train(cfg, rank, result)
    except NonFiniteLoss as e:
        log.error("%s", e)
        result.exit_code = 3
    except CheckpointError as e:
        log.error("%s", e)
        result.exit_code = 2
    except Exception as e:  # noqa: BLE001 - every failure ends this rank non-zero, with a reason
        log.error("rank %d failed: %s", rank, _explain(e, cfg), exc_info=True)
        result.exit_code = 1
    finally:
        destroy_grid()
        if owns_process_group and dist.is_initialized() and result.exit_code == 0:
            dist.destroy_process_group()
    return result


def _train(cfg: RunConfig, rank: int, result: RunResult) -> None:
    t = cfg.train
    grid = initialize_grid(cfg.parallel)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")  # fmt: skip
    model = build_model(cfg.model, grid, mode=cfg.parallel.mode, seed=t.seed,
                        kernel=t.attention_kernel, recompute=t.recompute, dtype=t.dtype)  # fmt: skip
    model.to(device)
    settings = check_settings(model, {"attention_kernel": t.attention_kernel,
                                      "recompute": t.recompute, "dtype": t.dtype})  # fmt: skip
    zero = None
    # the parameters the optimizer steps: the model's own, or fp32 masters of a bf16 model
    trainable = model
    if t.zero_stage:  # DeepSpeed ZeRO owns gradient sync and the optimizer step (zero.py)
        from .zero import ZeroEngine

        zero = ZeroEngine(model, cfg, grid)
        optimizer = zero.optimizer
    elif t.dtype == "bf16":
        trainable = MasterWeights(model)
    params = [p for p in trainable.parameters() if p.requires_grad]
    if zero is None:
        optimizer = build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
        average_gradients = GradientAverager(trainable, grid)
    effective = cfg.to_dict()

    start = 0
    if t.load:
        path = find_latest(t.load)
        if path is None:
            raise CheckpointError(f"--load {t.load}: no complete checkpoint there")
        check_compatible(read_meta(path), effective["model"], path)
        start = load_checkpoint(path, trainable, optimizer, grid)
        if isinstance(trainable, MasterWeights):
            trainable.copy_to_model()
        log.info("resumed from %s (step %d)", path, start)
        if start >= t.steps:
            raise CheckpointError(f"--load {path}: already at step {start} >= --steps {t.steps}")

    out = Path(t.out)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        effective["runtime"] = {**_runtime(model, grid, params, start, t.load), **settings}
        if zero is not None:
            effective["runtime"]["zero"] = zero.describe()
        (out / "config.json").write_text(json.dumps(effective, indent=2) + "\n")
        kept = []
        if start and metrics_path.exists():  # resuming into the same folder: keep steps <= start
            kept = [x for x in metrics_path.read_text().splitlines()
                    if x.strip() and json.loads(x).get("step", 0) <= start]  # fmt: skip
        metrics_path.write_text("".join(x + "\n" for x in kept))
    log.info("run: %s, %s", grid, cfg.model)

    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    flops_per_step = model_flops_per_step(cfg.model, t.global_batch_size)
    step_times: list[float] = []
    last = t.stop_after or t.steps
    progress = _Progress(cfg, rank, start, last)
    try:
        for step in range(start + 1, last + 1):
            t0 = time.perf_counter()
            fault = _fault(cfg, rank, step)
            if fault == "crash":
                log.error("injected crash at step %d", step)
                os._exit(17)
            if fault == "hang":
                log.error("injected hang at step %d", step)
                while True:
                    time.sleep(3600)
            lr = lr_at(step, lr=t.lr, schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
                       total_steps=t.steps, min_lr=t.final_lr)  # fmt: skip
            set_lr(optimizer, lr)
            if zero is None:
                optimizer.zero_grad(set_to_none=True)
            saved = SavedBytes(model)
            # first step only: the peak of the heap in use during forward + backward (slows
            # every op a little; step 1 is excluded from the step-time median anyway)
            transient = TransientPeak(device) if step == start + 1 else contextlib.nullcontext()
            with comm.record() as clog:
                micro = step_micro_batches(cfg, grid, step, device)
                with transient:
                    if zero is None:
                        local_loss, _ = forward_backward(model, micro, saved=saved)
                    else:
                        local_loss = zero.forward_backward(micro, saved=saved)
                if fault == "nan":
                    local_loss = local_loss * float("nan")
                if zero is None:
                    average_gradients()
                loss = global_mean_loss(local_loss, grid)
                skipped = not math.isfinite(loss)
                if skipped and not t.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"non-finite loss {loss} at step {step}: stopping (--skip-nonfinite "
                        "would skip such steps)"
                    )
                if zero is not None:  # reduce (stage 1), clip, update, gather: DeepSpeed's norm
                    grad_norm = zero.step(skip=skipped)
                else:
                    grad_norm = float("nan") if skipped else global_grad_norm(trainable, grid)
            if skipped:
                result.skipped_steps += 1
                if zero is None:
                    optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at step %d: step skipped (%d so far)", step,
                            result.skipped_steps)  # fmt: skip
            elif zero is None:
                clip_gradients(trainable, grad_norm, t.clip_grad)
                optimizer.step()
                if isinstance(trainable, MasterWeights):
                    trainable.copy_to_model()
            dt = _slowest_rank(time.perf_counter() - t0, device)
            step_times.append(dt)
            balance = _attention_balance(model, grid, device)
            if isinstance(transient, TransientPeak):
                balance["transient_peak_bytes"] = transient.bytes
            mem = zero.memory_stats() if zero is not None else memory_stats(model, optimizer,
                                                                            trainable)  # fmt: skip
            evals = {}
            if t.eval_interval and (step % t.eval_interval == 0 or step == last):
                valid = evaluate(model, cfg, grid, device)
                # bits per token; for byte-level data (enwik8) bits per byte
                evals = {"valid_loss": valid, "valid_bpb": valid / math.log(2)}
                result.valid[step] = valid
            result.losses[step] = loss
            if rank == 0:
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                       "skipped": skipped, "skipped_steps": result.skipped_steps,
                       **clog.summary(), "activation_bytes": saved.peak, **mem,
                       "peak_mem_bytes": peak_mem_bytes(device),
                       "model_flops_per_step": flops_per_step,
                       "achieved_flops_per_s": flops_per_step / dt, **balance,
                       **evals}  # fmt: skip
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                progress.update(loss, tokens_per_step / dt)
                if progress.bar is None and (step % t.log_interval == 0 or step == last):
                    log.info("step %d/%d loss %.6f lr %.3g grad_norm %.3f (%.3f s, %.0f tok/s)%s",
                             step, t.steps, loss, lr, grad_norm, dt, tokens_per_step / dt,
                             f" valid {evals['valid_loss']:.4f} ({evals['valid_bpb']:.3f} bpb)"
                             if evals else "")  # fmt: skip
            if t.save and ((t.save_interval and step % t.save_interval == 0) or step == t.steps):
                path = save_checkpoint(t.save, step, trainable, optimizer, grid, effective)
                if path is not None:
                    log.info("saved checkpoint %s", path)
    finally:
        progress.close()

    replicas = check_replicas(model, grid)
    if rank == 0:
        final = result.losses[max(result.losses)] if result.losses else None
        timing = step_time_summary(step_times)
        summary = {"steps": len(result.losses), "last_step": last, "final_loss": final,
                   "skipped_steps": result.skipped_steps, **timing,
                   "tokens_per_s": tokens_per_step / timing["step_time_s"],
                   "achieved_flops_per_s": flops_per_step / timing["step_time_s"],
                   "peak_mem_bytes": peak_mem_bytes(device), "replicas": replicas}  # fmt: skip
        if result.valid:
            last_eval = max(result.valid)
            summary.update(valid_loss=result.valid[last_eval],
                           valid_bpb=result.valid[last_eval] / math.log(2))  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not replicas["bitwise_equal"]:
        raise RuntimeError(f"replicated parameters diverged across ranks: {replicas['mismatched']}")
    log.info("done at step %d; replicas bitwise equal across %d ranks", last, grid.world_size)


def _slowest_rank(seconds: float, device) -> float:
    """The step time of the slowest rank (the step ends when every rank has finished it); the
    gather runs after the step's clock stopped and outside its communication counters."""
    mine = torch.tensor([seconds], dtype=torch.float64, device=device)
    return float(comm.all_gather_dim0(mine, dist.group.WORLD, category="other").max())


def _attention_balance(model, grid, device) -> dict:
    """Per-rank attention FLOPs of this step (forward + backward = 3 x forward) across the
    sequence group, counted by the LSS core attention modules, and max/mean: the causal load
    imbalance (1.0 = balanced). Empty for modes without LSS core attention."""
    from .core_attention import LSSCoreAttention

    modules = [m for m in model.modules() if isinstance(m, LSSCoreAttention)]
    if not modules:
        return {}
    mine = torch.tensor([3 * sum(m.attention_flops for m in modules)], dtype=torch.int64,
                        device=device)  # fmt: skip
    for m in modules:
        m.attention_flops = 0
    per_rank = comm.all_gather_dim0(mine, grid.seq_group, category="other").tolist()
    mean = sum(per_rank) / len(per_rank)
    return {
        "attention_flops_per_rank": per_rank,
        "attention_imbalance": max(per_rank) / mean if mean else 1.0,
    }


def _runtime(model, grid, params, start: int, load: str | None) -> dict:
    """What really runs, read back from the built model."""
    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - metadata missing in odd installs
        mcore = "unknown"
    return {
        "grid": repr(grid),
        "backend": dist.get_backend(),
        "core_attention": type(model.decoder.layers[0].self_attention.core_attention).__name__,
        "tensor_parallel": model.config.tensor_model_parallel_size,
        "sequence_parallel": bool(model.config.sequence_parallel),
        "context_parallel": model.config.context_parallel_size,
        "parameters_per_rank": sum(p.numel() for p in params),
        "resumed_from_step": start,
        "resumed_from": load,
        "torch": torch.__version__,
        "megatron_core": mcore,
    }
