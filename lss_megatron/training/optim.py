"""Optimizer, learning-rate schedule and gradient clipping by the true global norm.

The global gradient norm counts every parameter exactly once, whatever the layout
(`parallel.params.param_kind`):

* replicated parameters (the same averaged gradient on every rank): counted from the local copy;
* sequence-local parameters (LSS position slices, one per segment): squared norms summed over the
  sequence group;
* tensor-parallel shards (nvidia-sp): squared norms summed over the tensor-parallel group.

So the norm, and hence the clipping, is identical on every rank and equal to the one-process
model's. Megatron's optimizers hard-code CUDA, so these are torch optimizers.
"""

from __future__ import annotations

import math

import torch

from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import SEQUENCE_LOCAL, TENSOR_PARALLEL, param_kind


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
