"""One optimizer step's work behind one interface, so the loop does not care who owns it.

A step is: `zero_grad()` before the forward; `forward_backward(micro, saved=)` over this rank's
micro-batches (measured: it runs under the transient-memory probe); then
`sync_gradients()`; then, once the loss is known to be finite or not, `step(skip)`, which updates
(or, when skipped, drops the gradients) and returns the global gradient norm before clipping.

* `PlainStepper`: the trainer's own path: double gradient averaging (`lss.grad_sync`), the global
  norm with every parameter counted once, clipping and a torch optimizer (optim.py);
* `zero.ZeroEngine`: DeepSpeed's ZeRO engine owns averaging, clipping and the update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import RunConfig
from ..lss.grad_sync import GradientAverager
from ..parallel.grid import Grid
from .metrics import memory_stats
from .micro_batches import forward_backward
from .optim import (
    LossScaler,
    MasterWeights,
    build_optimizer,
    clip_gradients,
    found_nonfinite,
    global_grad_norm,
)


class Stepper(ABC):
    """The optimizer step of a run (see module doc)."""

    optimizer: torch.optim.Optimizer
    """Its param groups take the learning rate; checkpoints save its state."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Clear the previous step's gradients (before this step's forward)."""

    @abstractmethod
    def forward_backward(self, micro_batches, *, saved=None) -> torch.Tensor:
        """Forward and backward over the micro-batches; returns the local mean loss (float64)."""

    @abstractmethod
    def sync_gradients(self) -> None:
        """Make the gradients those of the global loss, where that happens before `step`."""

    @abstractmethod
    def step(self, skip: bool = False) -> float:
        """Update (or, `skip`: drop this step's gradients, no update, on every rank alike).
        Returns the global gradient norm before clipping (nan when skipped)."""

    @abstractmethod
    def memory_stats(self) -> dict:
        """This rank's parameter, gradient and optimizer-state bytes."""

    overflowed: bool = False
    """The last `step` was skipped because fp16 gradients overflowed (on any rank)."""
    scaler: LossScaler | None = None
    """fp16's loss scaler (None in fp32 / bf16); its state is saved with checkpoints."""

    def describe(self) -> dict | None:
        """What runs the step, for config.json (None: the trainer's own path)."""
        return None

    def checkpoint_sharding(self):
        """What this rank holds for a checkpoint (None: `checkpoint.PlainSharding` of the
        trainable parameters and the optimizer)."""
        return None


class PlainStepper(Stepper):
    """Double gradient averaging, global-norm clipping and a torch optimizer. Under ``--dtype
    bf16`` (a bf16 model) the optimizer steps `optim.MasterWeights`, fp32 masters of the model's
    parameters (``trainable``; else the model itself), copied back after each update."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, grid: Grid):
        t = cfg.train
        self.model, self.grid, self.clip = model, grid, t.clip_grad
        self.trainable = MasterWeights(model) if t.dtype in ("bf16", "fp16") else model
        """What the optimizer steps and checkpoints save: the model or its fp32 masters."""
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
        self.average_gradients = GradientAverager(self.trainable, grid)
        if t.dtype == "fp16":
            self.scaler = LossScaler(
                static=t.loss_scale,
                initial=t.initial_loss_scale,
                minimum=t.min_loss_scale,
                window=t.loss_scale_window,
                hysteresis=t.hysteresis,
            )

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, micro_batches, *, saved=None) -> torch.Tensor:
        if self.scaler is None:
            local_loss, _ = forward_backward(self.model, micro_batches, saved=saved)
        else:  # fp16: backward of the scaled loss (the reported loss is not scaled)
            scale = self.scaler.scale
            local_loss, _ = forward_backward(
                self.model, micro_batches, saved=saved, backward=lambda x: (x * scale).backward()
            )
        return local_loss

    def sync_gradients(self) -> None:
        self.average_gradients()

    def step(self, skip: bool = False) -> float:
        self.overflowed = False
        if self.scaler is not None and not skip:
            params = list(self.trainable.parameters())
            for p in params:  # fp32 master gradients, unscaled
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.scaler.scale)
            self.overflowed = found_nonfinite(params)
            self.scaler.update(self.overflowed)
            skip = self.overflowed
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        norm = global_grad_norm(self.trainable, self.grid)
        clip_gradients(self.trainable, norm, self.clip)
        self.optimizer.step()
        if isinstance(self.trainable, MasterWeights):
            self.trainable.copy_to_model()
        return norm

    def memory_stats(self) -> dict:
        return memory_stats(self.model, self.optimizer, self.trainable)
