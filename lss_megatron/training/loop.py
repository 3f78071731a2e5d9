"""The training loop behind `python -m lss_megatron.train` (train.py parses and validates).

`run()`: set up (init, grid, model, stepper, [resume], outputs) -> per step: train step (data,
forward/backward, gradient sync, non-finite check, update), record (metrics.jsonl, log), evaluate
and save -> finish (replica check, summary). The optimizer step is a `Stepper` (stepper.py): the
trainer's own (double gradient averaging, global-norm clipping, a torch optimizer) or, with
``--zero-stage 1|2``, DeepSpeed's ZeRO engine (zero.py); everything else is the same.

Exit codes: 0 done; 1 a failure (exception, collective timeout, a dead peer, a checkpoint that
could not be written); 2 a checkpoint that cannot be used, a GPU that several ranks would share
(devices.py), or a folder another run took since the up-front check; 3 a non-finite loss (without
``--skip-nonfinite``, or ``--max-consecutive-skips`` skipped steps in a row, or non-finite
parameters at a save). Every rank takes the same decision on a non-finite loss because the loss it
tests is the all-reduced global loss (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import RunConfig
from ..envvars import omp_threads
from ..log import get_logger
from ..model import build_model, check_settings
from ..parallel import comm
from ..parallel.grid import Grid, destroy_grid, initialize_grid
from ..resume import changed_hyperparameters
from ..runlock import release_all as release_folders
from ..runs import (
    RunFolderError,
    claim,
    disk_full,
    disk_full_line,
    latest_checkpoint,
    metric_lines,
)
from . import faults
from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_compatible,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from .devices import DeviceError, check_cuda_ranks, prepare_cuda, sync_device
from .megatron_ckpt import MegatronCheckpointError, is_megatron_checkpoint
from .megatron_ckpt import read as read_megatron
from .metrics import (
    SavedBytes,
    TransientPeak,
    attention_balance,
    model_flops_per_step,
    peak_mem_bytes,
    runtime_info,
    step_time_summary,
)
from .micro_batches import evaluate, global_mean_loss, step_micro_batches
from .nonfinite import NonFiniteLoss, SkipGuard, nonfinite_parameters
from .optim import MasterWeights, lr_at, set_lr
from .replicas import check_replicas
from .stepper import PlainStepper, Stepper
from .tracking import Tracker
from .zero import ZeroEngine

log = get_logger("train")


@dataclass
class RunResult:
    exit_code: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)
    skipped_steps: int = 0


@dataclass
class _Run:
    """What a run sets up once and every step uses."""

    cfg: RunConfig
    rank: int
    grid: Grid
    device: torch.device
    model: torch.nn.Module
    stepper: Stepper
    effective: dict
    """`cfg.to_dict()`: config.json, and the config stored with checkpoints."""
    start: int
    """The step resumed from (0: a fresh run)."""
    step_times: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    """Attention kernel, recompute and dtype read back from the built model (config.json)."""

    @property
    def last(self) -> int:
        return self.cfg.train.stop_after or self.cfg.train.steps

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    @property
    def flops_per_step(self) -> int:
        return model_flops_per_step(self.cfg.model, self.cfg.train.global_batch_size)


def init_distributed(cfg: RunConfig, rank: int) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=cfg.parallel.dist_timeout_s)
    if backend == "nccl":
        prepare_cuda()  # this rank's own GPU (never shared), NCCL errors that reach Python
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(
            backend, rank=rank, world_size=cfg.parallel.world_size, timeout=timeout
        )
    elif cfg.parallel.world_size == 1:  # plain `python -m lss_megatron.train`: in-memory store
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        raise RuntimeError("WORLD_SIZE > 1 but no MASTER_ADDR: launch with torchrun or deepspeed")
    if backend == "nccl":
        check_cuda_ranks(timeout)


def _explain(exc: BaseException, cfg: RunConfig) -> str:
    text = str(exc)
    low = text.lower()
    if "timed out" in low or "timeout" in low or "watchdog" in low:  # gloo, NCCL's watchdog
        return (
            f"a collective timed out after {cfg.parallel.dist_timeout_s:g} s (--dist-timeout): "
            "a peer rank is hung or gone"
        )
    if "connection closed" in low or "connection reset" in low or "broken pipe" in low:
        return "a peer rank died (its connection closed)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class _Progress:
    """tqdm bar on rank 0 (step, loss, tokens/s), or nothing."""

    def __init__(self, cfg: RunConfig, rank: int, start: int, last: int):
        want = cfg.train.progress == "on" or (cfg.train.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if rank == 0 and want:
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
    torch.set_num_threads(omp_threads())
    owns_process_group = not dist.is_initialized()
    result = RunResult()
    try:
        if owns_process_group:
            init_distributed(cfg, rank)
        _train(cfg, rank, result)
    except NonFiniteLoss as e:  # decided on global values: the same on every rank, said once
        if rank == 0:
            log.error("%s", e)
        result.exit_code = 3
    except (CheckpointWriteError, RunFolderError) as e:  # decided on rank 0, shared: said once
        if rank == 0:
            log.error("%s", e)
        result.exit_code = 1 if isinstance(e, CheckpointWriteError) else 2
    except (CheckpointError, DeviceError) as e:
        log.error("%s", e)
        result.exit_code = 2
    except Exception as e:  # noqa: BLE001 - every failure ends this rank non-zero, with a reason
        full = disk_full(e)
        if full is not None:  # a full disk under --out (metrics, config, summary): one line
            log.error("rank %d: %s", rank, disk_full_line(full, cfg.train.out))
        else:
            log.error("rank %d failed: %s", rank, _explain(e, cfg), exc_info=True)
        result.exit_code = 1
    finally:
        release_folders()  # rank 0's locks on --out and --save (runlock.py)
        destroy_grid()
        if owns_process_group and dist.is_initialized() and result.exit_code == 0:
            dist.destroy_process_group()
    return result


def _train(cfg: RunConfig, rank: int, result: RunResult) -> None:
    r = _set_up(cfg, rank)
    progress = _Progress(cfg, rank, r.start, r.last)
    t = cfg.train
    tracker = Tracker(
        r.out,
        rank=rank,
        steps=t.steps,
        global_batch=t.global_batch_size,
        log_interval=t.log_interval,
        tensorboard_dir=t.tensorboard_dir,
        start=r.start,
        device_type=r.device.type,
        arguments={
            k: v
            for section in ("model", "parallel", "train", "derived")
            for k, v in r.effective.get(section, {}).items()
        },
    )
    skips = SkipGuard(cfg.train.max_consecutive_skips)
    try:
        for step in range(r.start + 1, r.last + 1):
            rec, transient = _train_step(r, step, result)
            skips.record(step, rec["skipped"])  # stops the run after too many skips in a row
            rec.update(_measure(r, transient))
            rec.update(_evaluate(r, step, result))
            _record(r, rec, progress, tracker)
            _save(r, step, rec["skipped"])
    finally:
        progress.close()
        tracker.close()
    _finish(r, result)
    tracker.finish()


# --- set up ------------------------------------------------------------------------------------
def _set_up(cfg: RunConfig, rank: int) -> _Run:
    """Grid, model (on its device), stepper, the resumed step, and the run's output folder."""
    t = cfg.train
    grid = initialize_grid(cfg.parallel)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    model = build_model(
        cfg.model,
        grid,
        mode=cfg.parallel.mode,
        seed=t.seed,
        kernel=t.attention_kernel,
        recompute=t.recompute,
        dtype=t.dtype,
        reset_position_ids=t.reset_position_ids,
    )
    model.to(device)
    settings = check_settings(
        model, {"attention_kernel": t.attention_kernel, "recompute": t.recompute, "dtype": t.dtype}
    )
    # DeepSpeed's ZeRO owns gradient sync and the optimizer step (zero.py)
    stepper = ZeroEngine(model, cfg, grid) if t.zero_stage else PlainStepper(model, cfg, grid)
    effective = cfg.to_dict()
    start = _resume(cfg, stepper, grid, effective) if t.load else 0
    r = _Run(cfg, rank, grid, device, model, stepper, effective, start, settings=settings)
    effective["run_id"] = _claim_folders(r)  # before anything is written
    if rank == 0:
        _open_outputs(r)
    log.info("run: %s, %s", grid, cfg.model)
    return r


def _resume(cfg: RunConfig, stepper: Stepper, grid: Grid, effective: dict) -> int:
    """Load the newest checkpoint of ``--load`` into what the stepper steps (the model, or its
    fp32 masters under bf16, then copied into the model); returns its step."""
    t = cfg.train
    if is_megatron_checkpoint(t.load):
        if t.zero_stage:
            raise CheckpointError(
                f"--load {t.load}: a Megatron-LM checkpoint loads into a plain run only (not "
                f"--zero-stage {t.zero_stage}); resume from that run's own checkpoint under ZeRO"
            )
        return _import_megatron(t.load, stepper, grid, t.steps)
    path, note = latest_checkpoint(t.load)
    if path is None:
        raise CheckpointError(f"--load {t.load}: no complete checkpoint there")
    if note and grid.rank == 0:
        log.warning("%s", note)
    if grid.rank == 0:
        for line in changed_hyperparameters(path, effective):
            log.warning("%s", line)
    meta = read_meta(path)
    check_compatible(meta, effective["model"], path)
    start = load_checkpoint(
        path, _trainable(stepper), stepper.optimizer, grid, sharding=stepper.checkpoint_sharding()
    )
    if stepper.scaler is not None and isinstance(meta.get("loss_scaler"), dict):
        stepper.scaler.load_state_dict(meta["loss_scaler"])  # fp16 resumes its scale
    if isinstance(_trainable(stepper), MasterWeights):
        stepper.trainable.copy_to_model()
    log.info("resumed from %s (step %d)", path, start)
    if start >= t.steps:
        raise CheckpointError(f"--load {path}: already at step {start} >= --steps {t.steps}")
    return start


def _import_megatron(load: str, stepper: Stepper, grid: Grid, steps: int) -> int:
    """Start from a Megatron-LM checkpoint of the same model (training/megatron_ckpt.py): its
    weights, stitched over its tensor-parallel files, cut to what this rank holds; the step is its
    iteration; the optimizer starts fresh (Megatron's optimizer state is not ours)."""
    from ..parallel.params import to_local

    trainable = _trainable(stepper)
    params = dict(trainable.named_parameters())
    dims = {
        n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        for n, p in params.items()
    }
    try:
        start, full, _ = read_megatron(load, dims)
    except MegatronCheckpointError as e:
        raise CheckpointError(f"--load {load}: {e}") from None
    missing, extra = sorted(set(params) - set(full)), sorted(set(full) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"--load {load}: a Megatron-LM checkpoint of another model: parameters missing "
            f"{missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            try:
                p.copy_(to_local(full[name].to(p.dtype), p, grid))
            except (ValueError, RuntimeError) as e:
                raise CheckpointError(f"--load {load}: {name}: {e}") from None
    if isinstance(trainable, MasterWeights):
        stepper.trainable.copy_to_model()
    log.info("started from Megatron-LM checkpoint %s (iteration %d; fresh optimizer)", load, start)
    if start >= steps:
        raise CheckpointError(f"--load {load}: already at iteration {start} >= --steps {steps}")
    return start


def _trainable(stepper: Stepper):
    """What checkpoints hold: the plain stepper's model or fp32 masters; ZeRO's model."""
    return getattr(stepper, "trainable", None) or stepper.model


def _claim_folders(r: _Run) -> str | None:
    """Rank 0 takes --out and --save for this run (runs.claim); every rank learns the outcome, so
    a refusal ends every rank the same way. Returns the run id (None on other ranks)."""
    run_id, error = None, None
    if r.rank == 0:
        optim_keys = (
            "optimizer",
            "lr",
            "min_lr",
            "weight_decay",
            "lr_schedule",
            "warmup_steps",
            "clip_grad",
            "steps",
            "global_batch_size",
            "dtype",
            "seed",
        )
        record = {
            "model": r.effective["model"],
            "optimizer": {k: r.effective["train"][k] for k in optim_keys},
        }
        notes: list[str] = []
        try:
            run_id = claim(r.cfg.train, record, notes)
        except RunFolderError as e:
            error = str(e)
        except OSError as e:  # e.g. a full disk while writing run.json or checkpoints.json
            full = disk_full(e)
            error = disk_full_line(full, r.cfg.train.out) if full else str(e)
        for line in notes:
            log.warning("%s", line)
    error = comm.all_gather_object(error, None)[0]
    if error is not None:
        raise RunFolderError(error)
    return run_id


def _open_outputs(r: _Run) -> None:
    """config.json (with what really runs), and metrics.jsonl emptied, or on resume cut back to
    the steps up to the one resumed from (rank 0)."""
    r.out.mkdir(parents=True, exist_ok=True)
    r.effective["runtime"] = {
        **runtime_info(r.model, r.grid, r.start, r.cfg.train.load),
        **r.settings,
    }
    described = r.stepper.describe()
    if described is not None:
        r.effective["runtime"]["zero"] = described
    (r.out / "config.json").write_text(json.dumps(r.effective, indent=2) + "\n")
    metrics_path = r.out / "metrics.jsonl"
    kept = []
    if r.start and metrics_path.exists():  # resuming into the same folder: keep steps <= start
        kept = [x for x in metric_lines(metrics_path, log.warning) if x[0] <= r.start]
    metrics_path.write_text("".join(line + "\n" for _, line in kept))


# --- one step ----------------------------------------------------------------------------------
def _train_step(r: _Run, step: int, result: RunResult) -> tuple[dict, object]:
    """Forward, backward, gradient sync and update of `step`; returns its record (loss, lr, norm,
    time, collectives, bytes saved for backward) and the memory probe it ran under."""
    t, stepper = r.cfg.train, r.stepper
    sync_device(r.device)  # nothing queued before counts in this step (the same in every mode)
    t0 = time.perf_counter()
    fault = faults.planned(r.cfg, r.rank, step)
    faults.crash_or_hang(fault, step)
    lr = lr_at(
        step,
        lr=t.lr,
        schedule=t.lr_schedule,
        warmup_steps=t.warmup_steps,
        total_steps=t.steps,
        min_lr=t.final_lr,
    )
    set_lr(stepper.optimizer, lr)
    stepper.zero_grad()
    saved = SavedBytes(r.model)
    # first step only: the peak of the heap in use during forward + backward (slows every op a
    # little; step 1 is excluded from the step-time median anyway)
    transient = TransientPeak(r.device) if step == r.start + 1 else contextlib.nullcontext()
    with comm.record() as clog:
        micro = step_micro_batches(r.cfg, r.grid, step, r.device)
        with transient:
            local_loss = stepper.forward_backward(micro, saved=saved)
        local_loss = faults.poison(fault, local_loss)
        stepper.sync_gradients()
        loss = global_mean_loss(local_loss, r.grid)
        skipped = not math.isfinite(loss)
        if skipped and not t.skip_nonfinite:
            raise NonFiniteLoss(
                f"non-finite loss {loss} at step {step}: stopping "
                "(--skip-nonfinite would skip such steps)"
            )
        grad_norm = stepper.step(skip=skipped)
        overflow = stepper.overflowed  # fp16: gradients overflowed on some rank, update skipped
    sync_device(r.device)  # the step ends when its kernels have run
    dt_local = time.perf_counter() - t0
    dt = comm.max_over_ranks(dt_local, r.device)  # a step is as slow as its slowest rank
    r.step_times.append(dt)
    if skipped or overflow:
        result.skipped_steps += 1
    if skipped:
        log.warning(
            "non-finite loss at step %d: step skipped (%d so far)", step, result.skipped_steps
        )
    elif overflow and r.rank == 0:  # the same decision on every rank: said once
        log.warning(
            "fp16 gradients overflowed at step %d: update skipped on every rank, loss scale now "
            "%g (%d skipped so far)",
            step,
            stepper.scaler.scale,
            result.skipped_steps,
        )
    result.losses[step] = loss
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_time_s": dt,
        "step_time_rank0_s": dt_local,
        "tokens_per_s": r.tokens_per_step / dt,
        "skipped": skipped,
        "skipped_steps": result.skipped_steps,
        **(
            {"overflow": overflow, "loss_scale": stepper.scaler.scale}
            if stepper.scaler is not None
            else {}
        ),
        "consumed_samples": step * t.global_batch_size,
        "consumed_tokens": step * r.tokens_per_step,
        **clog.summary(),
        "activation_bytes": saved.peak,
    }, transient


def _measure(r: _Run, transient) -> dict:
    """After the step: attention balance (collective), memory, FLOP rates."""
    balance = attention_balance(r.model, r.grid, r.device)
    memory = r.stepper.memory_stats()
    if isinstance(transient, TransientPeak):
        balance["transient_peak_bytes"] = transient.bytes
        # what one rank needs for this step: its weights, masters and optimizer state, plus the
        # heap growth of forward + backward (saved activations, transients and the gradients,
        # which the first backward allocates); the largest over ranks (analysis.longest)
        held = sum(
            memory.get(k, 0) for k in ("param_bytes", "master_param_bytes", "optimizer_state_bytes")
        )
        balance["rank_bytes_max"] = int(comm.max_over_ranks(held + transient.bytes, r.device))
    return {
        **memory,
        "peak_mem_bytes": peak_mem_bytes(r.device),
        "model_flops_per_step": r.flops_per_step,
        "achieved_flops_per_s": r.flops_per_step / r.step_times[-1],
        "tflops_per_s_per_rank": r.flops_per_step / r.step_times[-1] / r.grid.world_size / 1e12,
        **balance,
    }


def _evaluate(r: _Run, step: int, result: RunResult) -> dict:
    """Validation loss every ``--eval-interval`` steps and at the last (collective)."""
    t = r.cfg.train
    if not t.eval_interval or (step % t.eval_interval and step != r.last):
        return {}
    valid = evaluate(r.model, r.cfg, r.grid, r.device)
    result.valid[step] = valid
    # bits per token; for byte-level data (enwik8) bits per byte
    return {"valid_loss": valid, "valid_bpb": valid / math.log(2)}


def _record(r: _Run, rec: dict, progress: _Progress, tracker: Tracker) -> None:
    """A line of metrics.jsonl, the progress bar, TensorBoard and the iteration line (rank 0)."""
    if r.rank != 0:
        return
    with (r.out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    progress.update(rec["loss"], rec["tokens_per_s"])
    tracker.step(rec, last=r.last, quiet=progress.bar is not None)


def _save(r: _Run, step: int, skipped: bool) -> None:
    """A checkpoint every ``--save-interval`` steps and at the last of ``--steps`` (collective),
    never from a skipped step or from non-finite parameters (on any rank)."""
    t = r.cfg.train
    if not t.save or not ((t.save_interval and step % t.save_interval == 0) or step == t.steps):
        return
    if skipped:
        if r.rank == 0:
            log.warning("step %d was skipped (non-finite loss): no checkpoint written for it", step)
        return
    bad = nonfinite_parameters(r.model)
    flag = torch.tensor([float(len(bad))], device=r.device)
    comm.all_reduce_(flag, None, category="other")
    if flag.item():
        where = ", ".join(bad[:3]) or "on another rank"
        raise NonFiniteLoss(
            f"parameters are not finite at step {step} ({where}): stopping "
            "without writing a checkpoint"
        )
    path = save_checkpoint(
        t.save,
        step,
        _trainable(r.stepper),
        r.stepper.optimizer,
        r.grid,
        r.effective,
        keep_last=t.keep_last,
        sharding=r.stepper.checkpoint_sharding(),
        extra={"loss_scaler": r.stepper.scaler.state_dict()} if r.stepper.scaler else None,
    )
    if path is not None:
        log.info("saved checkpoint %s", path)


# --- finish ------------------------------------------------------------------------------------
def _finish(r: _Run, result: RunResult) -> None:
    """The replica check (collective), summary.json (rank 0); fails the run on diverged replicas."""
    replicas = check_replicas(r.model, r.grid)
    if r.rank == 0:
        final = result.losses[max(result.losses)] if result.losses else None
        timing = step_time_summary(r.step_times)
        summary = {
            "steps": len(result.losses),
            "last_step": r.last,
            "final_loss": final,
            "skipped_steps": result.skipped_steps,
            **timing,
            "tokens_per_s": r.tokens_per_step / timing["step_time_s"],
            "achieved_flops_per_s": r.flops_per_step / timing["step_time_s"],
            "peak_mem_bytes": peak_mem_bytes(r.device),
            "replicas": replicas,
        }
        if result.valid:
            last_eval = max(result.valid)
            summary.update(
                valid_loss=result.valid[last_eval], valid_bpb=result.valid[last_eval] / math.log(2)
            )
        (r.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not replicas["bitwise_equal"]:
        raise RuntimeError(f"replicated parameters diverged across ranks: {replicas['mismatched']}")
    log.info("done at step %d; replicas bitwise equal across %d ranks", r.last, r.grid.world_size)
