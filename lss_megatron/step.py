"""One optimizer step's data and forward/backward, shared by the trainer and the tests.

Loss: the global per-token mean over the G x l tokens of the step. Each rank's backward uses
``sum(its token losses) / (its tokens this step)``; all ranks hold equally many tokens, so the
global mean is the average of the ranks' losses, which is what double gradient averaging
(grad_sync.py) turns the gradients into.
"""

from __future__ import annotations

import contextlib

import torch

from . import comm
from .config import RunConfig
from .data import replica_sample_indices, shard_segment, synthetic_sequences
from .grid import Grid


def step_micro_batches(cfg: RunConfig, grid: Grid, step: int, device=None):
    """This rank's micro-batches of optimizer step `step` (1-based): list of
    (tokens, labels, position_ids), each [B, l/N], on `device` (default: CPU)."""
    m, t = cfg.model, cfg.train
    indices = replica_sample_indices(t.global_batch_size, grid.data_rank, grid.data_size)
    seqs = synthetic_sequences(t.seed, step, indices, m.seq_length, m.vocab_size)  # [G/D, l+1]
    b = cfg.micro_batch
    return [
        shard_segment(seqs[i : i + b], grid.seq_rank, grid.seq_size) for i in range(0, len(seqs), b)
    ]


def forward_backward(model, micro_batches, *, return_token_losses: bool = False, saved=None):
    """Run forward and backward over the micro-batches; gradients accumulate in `.grad`.

    `saved`: an optional `metrics.SavedBytes` measuring what each forward saves for backward.
    Returns (local mean loss as a float tensor, per-token losses [B_total, l/N] or None).
    """
    n_tokens = sum(tok.numel() for tok, _, _ in micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0][0].device)
    token_losses = []
    for tokens, labels, positions in micro_batches:
        with saved.measure() if saved is not None else contextlib.nullcontext():
            per_token = model(tokens, positions, None, labels=labels)  # [B, l/N]
        loss = per_token.float().sum() / n_tokens
        loss.backward()
        total += loss.detach().double()
        if return_token_losses:
            token_losses.append(per_token.detach())
    return total, (torch.cat(token_losses) if return_token_losses else None)


def global_mean_loss(local_loss: torch.Tensor, grid: Grid) -> float:
    """Average of the ranks' local mean losses = the global per-token mean loss."""
    buf = local_loss.detach().double().reshape(1).clone()
    comm.all_reduce_(buf, grid.grad_group, category="other")
    return float(buf.item()) / (grid.seq_size * grid.data_size)
