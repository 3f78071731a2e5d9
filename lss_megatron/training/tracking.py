"""Rank 0's view of a run beside ``metrics.jsonl``: TensorBoard scalars and the iteration line.

* `scalars(rec)`: the numbers of one metrics record as TensorBoard tags. The values Megatron-LM
  logs carry its tag names (`MEGATRON_TAGS`: ``lm loss``, ``learning-rate``, ``grad-norm``,
  ``iteration-time``, ``lm loss validation`` and its ``ppl``, ...), so a Megatron-LM dashboard
  reads our runs; everything Megatron has no name for (the communication counters, bytes saved
  for backward, balance, ...) keeps its ``metrics.jsonl`` key (a boolean as 0/1, a list ``k`` as
  ``k/0``, ``k/1``, ...).
* `Tracker`: on rank 0 it prints Megatron's aligned ``arguments`` block at the start
  (`arguments_block`), says where the outputs go (at the start and at the end), writes each
  step's scalars with `torch.utils.tensorboard.SummaryWriter` when ``--tensorboard-dir`` is set
  (a resumed run purges the events after its resume step, like ``metrics.jsonl``), and logs a
  Megatron-LM-style iteration line every ``--log-interval`` steps, whose loss and time per
  iteration are the averages over the steps since the previous line (`interval_record`), as
  Megatron-LM's are. On other ranks it does nothing.
* `iteration_line(rec, steps=, global_batch=)`: that line, e.g. ::

    iteration       10/     100 | consumed samples:          80 | consumed tokens:        20480 |
    elapsed time per iteration (ms): 41.2 | throughput per rank (TFLOP/s/rank): 0.003 |
    learning rate: 1.000000E-03 | global batch size:     8 | lm loss: 2.079440E+00 |
    grad norm: 0.512 | number of skipped iterations:   0 | peak memory (MiB): 612.4 (CPU RSS) |

  (one line in the log). The throughput is the model FLOPs of the step (`metrics.
  model_flops_per_step`, the same for every mode) over the step time and the P ranks.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

from ..log import get_logger

log = get_logger("train")


MEGATRON_TAGS = {
    "loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "step_time_s": "iteration-time",
    "valid_loss": "lm loss validation",
    "loss_scale": "loss-scale",
    "global_batch_size": "batch-size",
}
"""metrics.jsonl key -> the tag Megatron-LM's training.py writes for the same value."""


def scalars(rec: dict) -> dict[str, float]:
    """The numeric entries of a metrics record as ``{tag: value}`` (``step`` is the x axis):
    Megatron-LM's tag where it has one (`MEGATRON_TAGS`), else the metrics key."""
    out: dict[str, float] = {}
    if isinstance(rec.get("valid_loss"), numbers.Real):
        out["lm loss validation ppl"] = math.exp(min(float(rec["valid_loss"]), 20.0))
    for key, value in rec.items():
        if key == "step":
            continue
        key = MEGATRON_TAGS.get(key, key)
        if isinstance(value, bool | numbers.Real):
            out[key] = float(value)
        elif isinstance(value, list | tuple):
            out.update(
                {
                    f"{key}/{i}": float(v)
                    for i, v in enumerate(value)
                    if isinstance(v, bool | numbers.Real)
                }
            )
    return out


def iteration_line(rec: dict, *, steps: int, global_batch: int, device_type: str = "cpu") -> str:
    """The Megatron-LM-style line of one step's record (module docstring)."""
    mem = rec.get("peak_mem_bytes")
    where = "GPU max allocated" if device_type == "cuda" else "CPU RSS"
    parts = [
        f"iteration {rec['step']:8d}/{steps:8d}",
        f"consumed samples: {rec['consumed_samples']:12d}",
        f"consumed tokens: {rec['consumed_tokens']:14d}",
        f"elapsed time per iteration (ms): {rec['step_time_s'] * 1e3:.1f}",
        f"throughput per rank (TFLOP/s/rank): {rec['tflops_per_s_per_rank']:.3g}",
        f"learning rate: {rec['lr']:.6E}",
        f"global batch size: {global_batch:5d}",
        f"lm loss: {rec['loss']:.6E}",
        f"grad norm: {rec['grad_norm']:.3f}",
        f"number of skipped iterations: {rec.get('skipped_steps', 0):3d}",
    ]
    if "loss_scale" in rec:  # --fp16, as Megatron-LM prints it
        parts.insert(8, f"loss scale: {rec['loss_scale']:.1f}")
    if mem is not None:
        parts.append(f"peak memory (MiB): {mem / 2**20:.1f} ({where})")
    return " | ".join(parts) + " |"


def interval_record(recs: list[dict]) -> dict:
    """The record an iteration line shows for the steps `recs` since the previous line: the last
    step's record with Megatron-LM's interval averages: ``loss`` over the steps that were not
    skipped, ``step_time_s`` and the throughput over all of them, and the skipped steps of the
    interval."""
    last = dict(recs[-1])
    kept = [r["loss"] for r in recs if not (r.get("skipped") or r.get("overflow"))]
    if kept:
        last["loss"] = sum(kept) / len(kept)
    for key in ("step_time_s", "tflops_per_s_per_rank"):
        last[key] = sum(r[key] for r in recs) / len(recs)
    last["skipped_steps"] = sum(bool(r.get("skipped") or r.get("overflow")) for r in recs)
    return last


def arguments_block(values: dict) -> str:
    """Megatron-LM's start-of-run dump: ``------- arguments -------``, one ``name ....... value``
    line per argument (sorted, dots to column 48), ``-- end of arguments --``."""
    lines = ["------------------------ arguments ------------------------"]
    for key in sorted(values):
        lines.append(f"  {key} {'.' * max(1, 48 - len(key))} {values[key]}")
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)


def validation_line(rec: dict) -> str:
    """Megatron's validation line: loss, perplexity and bits per token (bits per byte on bytes)."""
    loss = rec["valid_loss"]
    ppl = math.exp(min(loss, 20.0))
    return (
        f"validation loss at iteration {rec['step']} | lm loss value: {loss:.6E} | "
        f"lm loss PPL: {ppl:.6E} | bits per token: {rec['valid_bpb']:.4f} |"
    )


class Tracker:
    """Rank 0's TensorBoard writer, iteration line and output-folder notes (module docstring)."""

    def __init__(
        self,
        out: str | Path,
        *,
        rank: int,
        steps: int,
        global_batch: int,
        log_interval: int,
        tensorboard_dir: str | None = None,
        start: int = 0,
        device_type: str = "cpu",
        arguments: dict | None = None,
    ):
        self.active = rank == 0
        self.out = Path(out).resolve()
        self.steps, self.global_batch, self.log_interval = steps, global_batch, log_interval
        self.device_type = device_type
        self.tb_dir = Path(tensorboard_dir).resolve() if tensorboard_dir else None
        self.writer = None
        self._window: list[dict] = []
        if not self.active:
            return
        if self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events after its resume step (the same steps
            # metrics.jsonl drops), so a curve never holds two values for one step
            self.writer = SummaryWriter(
                log_dir=str(self.tb_dir), purge_step=start + 1 if start else None
            )
        if arguments:
            log.info("%s", arguments_block(arguments))
        log.info(
            "output folder: %s (metrics.jsonl, config.json, summary.json)%s",
            self.out,
            f"; TensorBoard: {self.tb_dir}" if self.tb_dir else "",
        )

    def step(self, rec: dict, *, last: int, quiet: bool = False) -> None:
        """Write one step's record to TensorBoard; log its iteration line every `log_interval`
        steps and at step `last`, unless `quiet` (a progress bar shows the steps instead)."""
        if not self.active:
            return
        show = not quiet and (rec["step"] % self.log_interval == 0 or rec["step"] == last)
        self._window.append(rec)
        if self.writer is not None:
            for tag, value in scalars(rec).items():
                self.writer.add_scalar(tag, value, rec["step"])
        if show:
            log.info(
                "%s",
                iteration_line(
                    interval_record(self._window),
                    steps=self.steps,
                    global_batch=self.global_batch,
                    device_type=self.device_type,
                ),
            )
        if show and "valid_loss" in rec:
            log.info("%s", validation_line(rec))
        if show or quiet:
            self._window = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> None:
        """Close the writer and say once more where everything went."""
        self.close()
        if self.active:
            log.info(
                "outputs in %s%s",
                self.out,
                f"; TensorBoard events in {self.tb_dir} (tensorboard --logdir {self.tb_dir})"
                if self.tb_dir
                else "",
            )
