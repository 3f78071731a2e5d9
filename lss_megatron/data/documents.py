"""Packed documents on a rank's batch: Megatron-LM's ``--reset-position-ids``,
``--reset-attention-mask`` and ``--eod-mask-loss`` (docs/packed.md).

Megatron-LM's meaning (``megatron.core.datasets.gpt_dataset._get_ltor_masks_and_position_ids``,
on the ``l`` input tokens of a sample): after every end-of-document token at position ``i``,
position ids restart (``i + 1`` gets 0), no query after ``i`` attends a key ``<= i``, and the loss
at every position whose INPUT is the EOD is masked (the prediction of the next document's first
token from the last one's EOD). Samples cut documents anywhere (`megatron_indexed.py`): a
document longer than a sequence continues into the next sample, whose positions start at 0.

Every rank needs the document boundaries of the WHOLE sequence (a rank holding the end of a
document must know where it began), so with ``--reset-position-ids`` / ``--reset-attention-mask``
each rank reads the sample's ``l`` input tokens (as Megatron-LM's ``get_batch`` reads the whole
batch on every context-parallel rank) and derives ``doc_start`` ``[b, l]``, the global start of
the document of every position (`document_starts`); it keeps its own positions and hands
``doc_start`` to the attention (`lss.documents`). The loss mask needs only the rank's own inputs.

`packed_batch` returns the rank's ``(tokens, labels, position_ids, loss_mask, attention)``;
``attention`` is None (plain causal), ``doc_start`` ``[b, l]`` for the sequence core attentions,
or, with ``megatron_mask`` (serial and nvidia-sp with Megatron's own `DotProductAttention`),
Megatron's ``[b, 1, l, l]`` boolean mask from Megatron's own function, which then also gives the
position ids and the loss mask: that path is the reference every mode is tested against.

torch and Megatron are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..layout import segment_chunks
from .base import Dataset


def document_starts(tokens, eod: int):
    """[b, l] token ids -> [b, l] long: the start of the document of each position (0, or one
    past the last `eod` strictly before it). Megatron's mask lets position p see keys
    ``document_starts[p] <= j <= p``; its reset position id is ``p - document_starts[p]``."""
    import torch

    b, length = tokens.shape
    after = torch.arange(1, length + 1).expand(b, length)  # [b, l]: p + 1
    after = torch.where(tokens == eod, after, torch.zeros_like(after))  # [b, l]
    shifted = torch.cat([after.new_zeros(b, 1), after[:, :-1]], dim=1)  # [b, l]: EODs before p
    return shifted.cummax(dim=1).values.contiguous()  # [b, l]


def megatron_masks(
    tokens, eod: int, reset_position_ids: bool, reset_attention_mask: bool, eod_mask_loss: bool
):
    """Megatron's own masks of [b, l] inputs, row by row: (attention mask [b, 1, l, l] bool,
    True = masked; loss mask [b, l] float; position ids [b, l] long)."""
    import torch
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    rows = [
        _get_ltor_masks_and_position_ids(
            row, eod, reset_position_ids, reset_attention_mask, eod_mask_loss, True
        )
        for row in tokens
    ]
    mask = torch.stack([r[0] for r in rows])  # [b, 1, l, l]
    loss = torch.stack([r[1] for r in rows])  # [b, l]
    pos = torch.stack([r[2] for r in rows])  # [b, l]
    return mask, loss, pos


def packed_batch(
    dataset: Dataset,
    split: str,
    step: int,
    indices: Iterable[int],
    seq_rank: int,
    seq_size: int,
    layout: str = "contiguous",
    *,
    eod: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    megatron_mask: bool = False,
):
    """This rank's (tokens, labels, position_ids, loss_mask, attention) of samples `indices`
    (module doc): the first three as `sharding.segment_batch`, loss_mask float [b, l/N],
    attention None, doc_start [b, l] or (`megatron_mask`, N = 1) Megatron's [b, 1, l, l] mask."""
    import torch

    from .sharding import segment_batch

    indices = list(indices)
    tokens, labels, positions = segment_batch(
        dataset, split, step, indices, seq_rank, seq_size, layout
    )
    length = dataset.seq_length
    held = torch.cat(
        [torch.arange(lo, hi) for lo, hi in segment_chunks(length, seq_rank, seq_size, layout)]
    )  # [l/N]: the global positions this rank holds, in local order
    if megatron_mask:
        if seq_size != 1:
            raise ValueError("Megatron's [b, 1, l, l] mask needs the whole sequence (N = 1)")
        mask, loss, pos = megatron_masks(
            tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss
        )
        return tokens, labels, pos, loss, (mask if reset_attention_mask else None)
    loss = (tokens != eod).float() if eod_mask_loss else torch.ones(tokens.shape)  # [b, l/N]
    attention = None
    if reset_position_ids or reset_attention_mask:
        full = torch.from_numpy(dataset.read(split, step, indices, 0, length - 1))  # [b, l] inputs
        doc_start = document_starts(full, eod)  # [b, l]
        if reset_position_ids:
            positions = (held[None, :] - doc_start[:, held]).contiguous()  # [b, l/N]
        if reset_attention_mask:
            attention = doc_start
    return tokens, labels, positions, loss, attention
