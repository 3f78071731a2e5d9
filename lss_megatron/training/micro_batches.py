"""A step's micro-batches and the loop over them, shared by the trainer and the tests: the data of one
optimizer step, its forward/backward, evaluation and the global loss.

Loss: the global per-token mean over the G x l tokens of the step. Each rank's backward uses
``sum(its token losses) / (its tokens this step)``; all ranks hold equally many tokens, so the
global mean is the average of the ranks' losses, which is what double gradient averaging
(lss/grad_sync.py) turns the gradients into.

Packed documents (``--reset-position-ids``, ``--reset-attention-mask``, ``--eod-mask-loss``;
`data.documents`): a micro-batch is then (tokens, labels, position_ids, loss_weight, attention).
With the EOD loss masked, ranks hold unequally many counted tokens, so the global mean is
``sum(masked losses) / C`` with C the global count of unmasked tokens (all-reduced once per step,
as Megatron-LM all-reduces its token count): each token's loss weight is
``mask x P x (its rank's tokens) / C``, which keeps the formula above exact. The micro-batch loop is `forward_backward`, for the
plain model and for DeepSpeed's engine alike.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..config import RunConfig
from ..data import build_dataset, replica_sample_indices, segment_batch
from ..data.documents import packed_batch
from ..parallel import comm
from ..parallel.grid import Grid


@functools.lru_cache(maxsize=4)
def _dataset(
    name: str,
    seq_length: int,
    vocab_size: int,
    seed: int,
    path: str | None,
    eval_batch: int,
    split: tuple[float, ...] | None = None,
):
    return build_dataset(
        name,
        seq_length=seq_length,
        vocab_size=vocab_size,
        seed=seed,
        path=path,
        eval_batch_size=eval_batch,
        split=split,
    )


def dataset_for(cfg: RunConfig):
    """The run's dataset (built once per process; the data vocabulary, not the padded one)."""
    m, t = cfg.model, cfg.train
    return _dataset(
        t.data, m.seq_length, m.vocab_size, t.seed, t.data_path, t.global_batch_size, t.fractions
    )


def megatron_mask(cfg: RunConfig) -> bool:
    """The model's core attention is Megatron's own `DotProductAttention` (the dense kernel in
    serial and nvidia-sp): it takes Megatron's [b, 1, l, l] document mask."""
    return cfg.train.attention_kernel == "dense" and cfg.parallel.rules.megatron_attention


def step_micro_batches(cfg: RunConfig, grid: Grid, step: int, device=None, split: str = "train"):
    """This rank's micro-batches of step `step` (1-based; for split "valid"/"test": the eval
    step): list of (tokens, labels, position_ids), each [B, l/N], on `device` (default: CPU);
    with packed documents (module doc) also (loss_weight [B, l/N], attention).
    Only this rank's segment of its data replica's samples is read (and, to find document
    boundaries, the whole input rows)."""
    ds = dataset_for(cfg)
    indices = replica_sample_indices(cfg.train.global_batch_size, grid.data_rank, grid.data_size)
    b, t = cfg.micro_batch, cfg.train
    where = (grid.seq_rank, grid.seq_size, grid.layout)
    if not t.packed:
        micro = [
            segment_batch(ds, split, step, indices[i : i + b], *where)
            for i in range(0, len(indices), b)
        ]
    else:
        micro = [
            packed_batch(
                ds,
                split,
                step,
                indices[i : i + b],
                *where,
                eod=t.eod_token,
                reset_position_ids=t.reset_position_ids,
                reset_attention_mask=t.reset_attention_mask,
                eod_mask_loss=t.eod_mask_loss,
                megatron_mask=megatron_mask(cfg),
            )
            for i in range(0, len(indices), b)
        ]
        micro = _loss_weights(micro, grid)
    if device is not None:
        micro = [
            tuple(None if x is None else x.to(device, non_blocking=True) for x in mb)
            for mb in micro
        ]
    return micro


def _loss_weights(micro, grid: Grid):
    """Replace each micro-batch's loss mask by its loss weight (module doc): one all-reduce of
    this rank's count of unmasked tokens over the gradient group."""
    n_local = sum(mb[0].numel() for mb in micro)
    count = torch.tensor([float(sum(float(mb[3].sum()) for mb in micro))], dtype=torch.float64)
    comm.all_reduce_(count, grid.grad_group, category="other")
    ranks = grid.seq_size * grid.data_size
    scale = ranks * n_local / float(count.item()) if count.item() > 0 else 0.0
    return [(tok, lab, pos, mask * scale, att) for tok, lab, pos, mask, att in micro]


def _unpack(mb):
    """(tokens, labels, positions, loss weight or None, attention or None) of a micro-batch."""
    return (*mb, None, None) if len(mb) == 3 else tuple(mb)


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def forward_backward(
    model, micro_batches, *, return_token_losses: bool = False, saved=None, backward=_backward
):
    """Run forward and backward over the micro-batches; gradients accumulate in `.grad`.

    `model`: the GPT model, or anything called like it (DeepSpeed's engine); `backward(loss)`
    runs the backward of one micro-batch's loss (default: `loss.backward()`).
    `saved`: an optional `metrics.SavedBytes` measuring what each forward saves for backward.
    Returns (local mean loss as a float64 tensor, per-token losses [B_total, l/N] or None).
    """
    n_tokens = sum(mb[0].numel() for mb in micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0][0].device)
    token_losses = []
    for mb in micro_batches:
        tokens, labels, positions, weight, attention = _unpack(mb)
        with saved.measure() if saved is not None else contextlib.nullcontext():
            per_token = model(tokens, positions, attention, labels=labels)  # [B, l/N]
        per_token = per_token if weight is None else per_token * weight  # [B, l/N]
        loss = per_token.float().sum() / n_tokens
        backward(loss)
        total += loss.detach().double()
        if return_token_losses:
            token_losses.append(per_token.detach())
    return total, (torch.cat(token_losses) if return_token_losses else None)


@torch.no_grad()
def evaluate(model, cfg: RunConfig, grid: Grid, device, split: str = "valid") -> float:
    """Global per-token mean loss over `--eval-steps` batches of G sequences of `split`."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for eval_step in range(1, cfg.train.eval_steps + 1):
        micro = step_micro_batches(cfg, grid, eval_step, device, split=split)
        n_tokens = sum(mb[0].numel() for mb in micro)
        for mb in micro:
            tokens, labels, positions, weight, attention = _unpack(mb)
            per_token = model(tokens, positions, attention, labels=labels)  # [B, l/N]
            per_token = per_token if weight is None else per_token * weight  # [B, l/N]
            total += per_token.double().sum() / n_tokens
    model.train(was_training)
    return global_mean_loss(total / cfg.train.eval_steps, grid)


def global_mean_loss(local_loss: torch.Tensor, grid: Grid) -> float:
    """Average of the ranks' local mean losses = the global per-token mean loss."""
    buf = local_loss.detach().double().reshape(1).clone()
    comm.all_reduce_(buf, grid.grad_group, category="other")
    return float(buf.item()) / (grid.seq_size * grid.data_size)
