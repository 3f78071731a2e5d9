"""`LSSCoreAttention`: the LSS operator as Megatron-Core's `core_attention` module.

It plugs into the `core_attention` field of `SelfAttentionSubmodules` (`modes.lss.get_lss_layer_spec`)
and is built and called by Megatron's `SelfAttention` like its own `DotProductAttention`:

    core_attention(query [s/N, b, h, d], key [s/N, b, h_kv, d], value [s/N, b, h_kv, d],
                   attention_mask, attn_mask_type=..., attention_bias=None,
                   packed_seq_params=None) -> [s/N, b, h*d]

RoPE has already been applied to query and key with global positions (positions.py). The
sequence group is Megatron's context-parallel group (`pg_collection.cp`).

`SequenceCoreAttention` is the part every sequence-splitting core attention shares (the checks,
the sequence group, the softmax scale, the output reshape); Ulysses' (`baselines/ulysses_attention.py`) is one
too.
`FlashCoreAttention` (serial, nvidia-sp) is one as well: the flash kernel over the whole sequence
on this rank's heads. ``kernel`` (a spec parameter, ``--attention-kernel``) picks flash or dense
attention (`attend`) in every mode, so modes compare parallel schemes, not kernels.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..layout import LAYOUTS, attended_pairs
from .dense_attention import dense_attention
from .documents import document_attention, document_pairs, needed_remote_keys
from .kernel import partial_attention, to_compute_dtype
from .kv_gather import SAVE_KV
from .operator import lss_attention
from .positions import local_positions

KERNELS = ("flash", "dense")


def attend(
    q,
    k,
    v,
    *,
    kernel: str,
    q_offset: int,
    causal: bool,
    softmax_scale: float,
    doc_start: torch.Tensor | None = None,
):
    """q [sq, b, h, d], k/v [sk, b, h_kv, d] -> [sq, b, h, d] with `kernel`: ``flash``
    (`kernel.partial_attention`: nothing quadratic in l saved) or ``dense`` (`dense_attention`:
    scores materialised and probabilities saved). `doc_start` ([b, l], the global document start
    of every position): attention within documents (`documents.document_attention`)."""
    if doc_start is not None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
        if not causal:
            raise ValueError("document masks (--reset-attention-mask) need causal attention")
        return document_attention(
            q,
            k,
            v,
            q_offset=q_offset,
            doc_start=doc_start,
            softmax_scale=softmax_scale,
            backend="dense" if kernel == "dense" else "auto",
        )
    if kernel == "flash":
        return partial_attention(
            q, k, v, q_offset=q_offset, causal=causal, softmax_scale=softmax_scale
        )
    if kernel == "dense":
        return dense_attention(
            q, k, v, q_offset=q_offset, causal=causal, softmax_scale=softmax_scale
        )
    raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")


class SequenceCoreAttention(MegatronModule):
    """A `core_attention` over the context-parallel (sequence) group: causal or no mask, no
    dropout, bias or packed (THD) sequences. Subclasses implement `attend`.

    Document masks (Megatron-LM's ``--reset-attention-mask``): the trainer passes, as Megatron's
    ``attention_mask`` argument, a LongTensor ``[b, l]``: the global document start of every
    global position (`lss.documents`; the same tensor on every rank, not a ``[b, 1, l, l]``
    mask). A subclass that honours it sets ``supports_documents = True`` and takes
    ``attend(..., doc_start=)``; the others refuse it in one line."""

    supports_documents = False

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        kernel: str = "flash",
    ):
        super().__init__(config=config)
        name = type(self).__name__
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"{name}: attention dropout {dropout} is not supported (use 0.0)")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise ValueError(f"{name}: apply_query_key_layer_scaling is not supported")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(
                f"{name}: attn_mask_type {attn_mask_type} unsupported (causal or no_mask)"
            )
        if kernel not in KERNELS:
            raise ValueError(f"{name}: unknown attention kernel {kernel!r}; expected {KERNELS}")
        self.kernel = kernel
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.seq_group = cp if cp is not None else parallel_state.get_context_parallel_group()
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.attention_flops = 0
        """Forward attention FLOPs (4 b h d x attended pairs) of the training forwards since the
        last reset (`count_flops`): this rank's share of the attention work."""
        self.causal_flops = 0
        """The same forwards' FLOPs without document masks (plain causal): with
        ``--reset-attention-mask`` the work the document tiles skip is the difference."""

    def count_flops(self, flops: int, causal_flops: int | None = None) -> None:
        """Add one forward's attention FLOPs (and, with documents, the plain causal FLOPs of the
        same forward), except in evaluation (not training) and in Megatron's recompute during
        backward (checkpointing with grad enabled): each training step counts each layer's
        forward once."""
        if not self.training or (is_checkpointing() and torch.is_grad_enabled()):
            return
        self.attention_flops += flops
        self.causal_flops += flops if causal_flops is None else causal_flops

    def count_sequence_flops(self, b: int, seq: int, heads: int, d: int, causal, doc_start) -> None:
        """`count_flops` for attention over the whole sequence (every query of the sequence against the
        keys it sees) on `heads` heads: serial / nvidia-sp's flash kernel, Ulysses' local
        attention."""
        full = b * (seq * (seq + 1) // 2 if causal else seq * seq)
        pairs = full if doc_start is None else document_pairs(doc_start, torch.arange(seq))
        self.count_flops(4 * heads * d * pairs, 4 * heads * d * full)

    def attend(self, query, key, value, causal: bool, doc_start=None) -> torch.Tensor:
        """q [s/N, b, h, d], k/v [s/N, b, h_kv, d] -> [s/N, b, h, d]; `doc_start` [b, l] or
        None."""
        raise NotImplementedError

    def _doc_start(self, attention_mask) -> torch.Tensor | None:
        """The document starts [b, l] passed as ``attention_mask``, checked (class doc)."""
        name = type(self).__name__
        if attention_mask is None:
            return None
        if attention_mask.dtype != torch.long or attention_mask.dim() != 2:
            raise NotImplementedError(
                f"{name} masks by global position itself; pass attention_mask=None or document "
                f"starts (int64 [b, l]), not a {attention_mask.dtype} tensor of shape "
                f"{tuple(attention_mask.shape)}"
            )
        if not self.supports_documents:
            raise NotImplementedError(
                f"{name} cannot honour --reset-attention-mask (document masks)"
            )
        return attention_mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        name = type(self).__name__
        doc_start = self._doc_start(attention_mask)
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                f"{name}: attention_bias and packed sequences are not supported"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # the compute dtype (autocast's, or bf16 parameters') before any communication: LSS's K/V
        # gather and Ulysses' all-to-alls carry it, whatever dtype Megatron's bias add left
        query, key, value = to_compute_dtype(
            query, key, value, getattr(self.config, "params_dtype", None)
        )
        causal = mask_type == AttnMaskType.causal
        if doc_start is None:
            out = self.attend(query, key, value, causal)  # [s/N, b, h, d]
        else:
            out = self.attend(query, key, value, causal, doc_start=doc_start)  # [s/N, b, h, d]
        sq, b, h, d = out.shape
        return out.reshape(sq, b, h * d)  # [s/N, b, h*d]


class FlashCoreAttention(SequenceCoreAttention):
    """The flash kernel on this rank's heads over the whole sequence (serial, nvidia-sp; Megatron
    gathers the sequence before QKV): q [l, b, hp, d], k/v [l, b, hp_kv, d] -> [l, b, hp, d]."""

    supports_documents = True

    def attend(self, query, key, value, causal: bool, doc_start=None) -> torch.Tensor:
        out = attend(
            query,
            key,
            value,
            kernel="flash",
            q_offset=0,
            causal=causal,
            softmax_scale=self.softmax_scale,
            doc_start=doc_start,
        )  # [l, b, hp, d]
        sq, b, hp, d = out.shape
        self.count_sequence_flops(b, sq, hp, d, causal, doc_start)
        return out


class LSSCoreAttention(SequenceCoreAttention):
    """Exact LSS partial attention over the context-parallel (sequence) group."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        *,
        layout: str = "contiguous",
        kv_chunks: int = 1,
        save_kv: str = "gathered",
        fused_kv: bool = True,
        overlap: bool = False,
        **kwargs,
    ):
        super().__init__(config, layer_number, attn_mask_type, **kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"LSSCoreAttention: layout {layout!r} is not one of {LAYOUTS}")
        local_kv = config.num_query_groups or config.num_attention_heads
        local_kv //= config.tensor_model_parallel_size  # this rank's h_kv / T key/value heads
        if kv_chunks < 1 or local_kv % kv_chunks:
            raise ValueError(
                f"LSSCoreAttention: kv_chunks {kv_chunks} does not divide this rank's "
                f"{local_kv} key/value heads"
            )
        self.layout = layout
        """Which tokens this rank holds (`layout.LAYOUTS`): a spec parameter
        (`modes.lss.get_lss_layer_spec(layout=...)`), checked by `prepare_lss_model`."""
        self.kv_chunks = kv_chunks
        """K/V are gathered in this many double-buffered head chunks (a spec parameter)."""
        if save_kv not in SAVE_KV:
            raise ValueError(f"LSSCoreAttention: save_kv {save_kv!r} is not one of {SAVE_KV}")
        if save_kv == "local" and self.kernel == "dense":
            raise ValueError(
                "LSSCoreAttention: save_kv='local' needs the flash kernel (the dense kernel "
                "saves its own copies of the gathered K/V)"
            )
        self.save_kv = save_kv
        """What autograd keeps of K/V: ``gathered`` or ``local`` (re-gathered in backward)."""
        self.fused_kv = fused_kv
        """K and V travel in one collective each way (the paper) or in two (Megatron's CP)."""
        if overlap and self.kernel != "flash":
            raise ValueError("LSSCoreAttention: overlap needs the flash kernel")
        self.overlap = overlap
        """Gathers and reduce-scatters overlapped with the attention blocks (`lss/overlap.py`)."""

        self.kv_remote_needed = self.kv_remote_gathered = 0
        """With document masks: other ranks' key positions that some local query sees, and
        those the all-gather brings ((N-1) l/N), over the training forwards since the last
        reset: what a gather of only the needed K/V would move (`metrics.attention_balance`)."""
        self.prepared = False
        """Set by `prepare_lss_model`; a group of N > 1 refuses to run without it (positions
        would be the whole table's, or RoPE's local ones: silently wrong)."""

    supports_documents = True

    def attend(self, query, key, value, causal: bool, doc_start=None) -> torch.Tensor:
        if not self.prepared and self.seq_group.size() > 1:
            raise RuntimeError(
                "LSSCoreAttention: this model was not prepared for LSS: call "
                "prepare_lss_model(model) once after building it, on every rank of the "
                "context-parallel group (it makes positions sequence-distributed)"
            )
        # Megatron's recompute runs this forward again inside backward, where the gathered K/V
        # are used at once: keeping them local there would only gather a third time
        recomputing = is_checkpointing() and torch.is_grad_enabled()
        out = lss_attention(
            query,
            key,
            value,
            self.seq_group,
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend="dense" if self.kernel == "dense" else "auto",
            layout=self.layout,
            kv_chunks=self.kv_chunks,
            save_kv="gathered" if recomputing else self.save_kv,
            fused=self.fused_kv,
            overlap=self.overlap,
            doc_start=doc_start,
        )  # [s/N, b, h, d], in the compute dtype
        sq, b, h, d = out.shape
        n = self.seq_group.size()
        full = b * attended_pairs(n * sq, self.seq_group.rank(), n, causal, self.layout)
        pairs = full
        if doc_start is not None:  # pairs within documents, summed over the b rows
            held = local_positions(n * sq, self.seq_group.rank(), n, self.layout)  # [s/N]
            pairs = document_pairs(doc_start, held)
            if self.training and not (is_checkpointing() and torch.is_grad_enabled()):
                self.kv_remote_needed += needed_remote_keys(doc_start, held)
                self.kv_remote_gathered += (n - 1) * sq
        self.count_flops(4 * h * d * pairs, 4 * h * d * full)
        return out
