"""Optimizer, learning-rate schedule and gradient clipping by the true global norm.

The global gradient norm counts every parameter exactly once, whatever the layout
(`parallel.params.param_kind`):

* replicated parameters (the same averaged gradient on every rank): counted from the local copy;
* sequence-local parameters (LSS position slices, one per segment): squared norms summed over the
  sequence group;
* tensor-parallel shards (nvidia-sp): squared norms summed over the tensor-parallel group.

So the norm, and hence the clipping, is identical on every rank and equal to the one-process
model's. Megatron's optimizers hard-code CUDA, so these are torch optimizers; under ``--dtype
bf16`` they step `MasterWeights`, the fp32 master copies of Megatron's bf16 model (what Megatron's
mixed-precision optimizer keeps).
"""

from __future__ import annotations

import math

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import SEQUENCE_LOCAL, TENSOR_PARALLEL, param_kind


class MasterWeights:
    """fp32 master weights of a bf16 model, kept the way Megatron's mixed precision keeps them.

    * Masters: fp32 copies of the bf16 parameters (as Megatron's mixed-precision optimizer makes
      them), carrying the same attributes (tensor-/sequence-parallel and sequence-local tags,
      global rows), so gradient averaging, the global norm and checkpoints treat them as the
      model's parameters.
    * Gradients: as soon as backward has accumulated a bf16 parameter's gradient, a hook adds it
      into the master's fp32 ``.grad`` and drops the bf16 one (Megatron's DDP does the same into
      ``main_grad``): micro-batches accumulate in fp32, and gradient averaging all-reduces fp32
      (Megatron-LM's bf16 default, ``accumulate_allreduce_grads_in_fp32``).
    * The optimizer (its state fp32) steps the masters; `copy_to_model` writes them back, rounded
      to bf16.

    Duck-types the module interface the trainer's gradient code uses: `parameters()`,
    `named_parameters()`.
    """

    def __init__(self, model: torch.nn.Module):
        self._pairs = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            master = torch.nn.Parameter(p.detach().to(torch.float32, copy=True))
            master.__dict__.update(p.__dict__)  # Megatron's and LSS's tags
            p.register_post_accumulate_grad_hook(self._accumulate_into(master))
            self._pairs.append((name, p, master))

    @staticmethod
    def _accumulate_into(master: torch.nn.Parameter):
        def hook(p: torch.nn.Parameter) -> None:
            if master.grad is None:
                master.grad = p.grad.to(torch.float32, copy=True)
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    def parameters(self):
        return iter([m for _, _, m in self._pairs])

    def named_parameters(self):
        return iter([(name, m) for name, _, m in self._pairs])

    def model_parameters(self):
        return [p for _, p, _ in self._pairs]

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for _, p, master in self._pairs:
            p.copy_(master)


class LossScaler:
    """Megatron's fp16 loss scaling (``--fp16``): the loss is multiplied by `scale` before
    backward and the fp32 master gradients divided by it after; a step whose gradients are not
    finite on ANY rank is skipped on every rank (`found_nonfinite` all-reduces the flag).

    Static (``--loss-scale S``): the scale never changes. Dynamic (Megatron-LM's
    DynamicGradScaler): start at ``--initial-loss-scale``; after ``--hysteresis`` overflowing
    steps (counted since the last growth) halve it, not below ``--min-loss-scale``; after
    ``--loss-scale-window`` steps in a row without overflow double it. Its state goes into
    checkpoints, so a resumed run scales as the uninterrupted one."""

    def __init__(
        self,
        *,
        static: float | None = None,
        initial: float = 2.0**32,
        minimum: float = 1.0,
        window: int = 1000,
        hysteresis: int = 2,
    ):
        self.dynamic = static is None
        self.scale = float(initial if static is None else static)
        self.minimum, self.window, self.hysteresis = minimum, window, hysteresis
        self._growth, self._hysteresis_left = 0, hysteresis

    def update(self, overflow: bool) -> None:
        """After a step: shrink on overflow (after the hysteresis), grow after a clean window."""
        if not self.dynamic:
            return
        if overflow:
            self._growth = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.minimum)
        else:
            self._growth += 1
            if self._growth == self.window:
                self._growth, self._hysteresis_left = 0, self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth": self._growth,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.dynamic:
            self.scale = float(state["scale"])
            self._growth, self._hysteresis_left = (
                int(state["growth"]),
                int(state["hysteresis_left"]),
            )


def found_nonfinite(params) -> bool:
    """Whether any gradient of `params` on ANY rank holds inf or nan (one all-reduce over every
    rank: sequence-local slices and tensor-parallel shards differ between ranks)."""
    grads = [p.grad for p in params if p.grad is not None]
    local = any(not torch.isfinite(g).all() for g in grads)
    device = grads[0].device if grads else torch.device("cpu")
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    comm.all_reduce_(flag, None, category="other")  # the number of ranks that overflowed
    return bool(flag.item())


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(
    step: int, *, lr: float, schedule: str, warmup_steps: int, total_steps: int, min_lr: float
) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup over `warmup_steps` (step
    `warmup_steps` reaches `lr`), then constant, or cosine decay from `lr` at the first step after
    warmup to `min_lr` at step `total_steps`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    span = max(1, total_steps - warmup_steps - 1)  # first step after warmup: lr; last: min_lr
    progress = min(1.0, max(0.0, (step - warmup_steps - 1) / span))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(model: torch.nn.Module, grid: Grid) -> float:
    """L2 norm of the full model's gradient, each parameter counted once (see module doc)."""
    device = next(model.parameters()).device
    slot = {SEQUENCE_LOCAL: 1, TENSOR_PARALLEL: 2}  # 0: replicated
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # replicated, seq-local, tp-sharded
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum()
            sums[slot.get(param_kind(p, grid.tp_size).kind, 0)] += sq
    local = sums[1:2].clone()
    comm.all_reduce_(local, grid.seq_group, category="other")
    tp = sums[2:3].clone()
    comm.all_reduce_(tp, grid.tp_group, category="other")
    return math.sqrt(float(sums[0] + local[0] + tp[0]))


def clip_gradients(model: torch.nn.Module, norm: float, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / norm); returns the factor applied."""
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return 1.0
    factor = max_norm / (norm + 1e-6)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)
    return factor
