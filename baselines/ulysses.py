"""DeepSpeed-Ulysses (Jacobs et al. 2023) as the core attention of the same Megatron GPT model.

Like LSS, rank n of a sequence group of N ranks (Megatron's context-parallel group, TP = 1)
holds the contiguous segment [n l/N, (n+1) l/N) of every sequence, with the same
sequence-distributed positions (`positions.distribute_positions`), data sharding and double
gradient averaging. Only the core attention differs: DeepSpeed's own
`deepspeed.sequence.layer.DistributedAttention` all-to-alls q, k and v from
[l/N, b, heads, d] to [l, b, heads/N, d] (the whole sequence, this rank's heads), a local attention
runs on them (`local_attention.attend` with q_offset = 0 and the run's kernel, causal), and a
fourth all-to-all brings the output back to [l/N, b, h, d]. Backward: the same four all-to-alls
in reverse. Per layer and micro-batch a rank sends, in each direction,
``(N-1)/N * (l/N) * b * d * es * (2 h + 2 h_kv)`` bytes (q and out: h heads, k and v: h_kv).

Query head i of rank r is global head r h/N + i and its key/value head is r h_kv/N + i // (h/h_kv),
which is Megatron's GQA grouping, so GQA is exact when N divides h and h_kv (the limits,
`ulysses_limits.py`).

DeepSpeed's collectives go through `deepspeed.comm`, which dispatches to a process-wide backend.
When none is set, `_deepspeed_backend()` installs DeepSpeed's `TorchBackend` on the existing
torch.distributed groups without its CPU shared-memory op (a JIT C++ build that only serves
inference all-reduce) and with `all_to_all_single` passing its tensors positionally, so
`lss_megatron.comm.record()` sees every all-to-all with its bytes (category ``sp``: the sequence
group is tagged). `deepspeed` is imported only when the first Ulysses layer is built.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from megatron.core.transformer.enums import AttnMaskType

from lss_megatron.local_attention import CoreAttentionBase, attend
from lss_megatron.modes import Mode

from .ulysses_limits import problems

_BATCH_DIM = 1  # Megatron's sbhd layout: [s, b, h, d]


def _deepspeed_backend():
    """`deepspeed.comm`'s backend, installing DeepSpeed's TorchBackend (see module doc) if unset."""
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.comm")
    if ds_comm.cdb is not None:
        return ds_comm.cdb
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    class TorchBackendNoShm(ds_torch.TorchBackend):
        """DeepSpeed's torch.distributed backend, minus the shared-memory op build; the
        all-to-all passes its tensors positionally (DeepSpeed's passes keywords), which is how
        `lss_megatron.comm.record()` reads their sizes."""

        def all_to_all_single(self, output, input, output_split_sizes=None,
                              input_split_sizes=None, group=None, async_op=False):  # fmt: skip
            return torch.distributed.all_to_all_single(
                output, input, output_split_sizes, input_split_sizes, group=group,
                async_op=async_op,
            )  # fmt: skip

    build_shm_op = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:  # torch.distributed is initialised: TorchBackend only wraps it
        ds_comm.cdb = TorchBackendNoShm(
            torch.distributed.get_backend(), timedelta(minutes=30), None
        )
    finally:
        ds_torch.build_shm_op = build_shm_op
    return ds_comm.cdb


class _FullSequenceAttention(torch.nn.Module):
    """The local attention inside DistributedAttention: every query of the sequence against every
    key, on this rank's heads, with the run's kernel (`local_attention.attend`: flash or dense).
    q [l, b, h/N, d], k/v [l, b, h_kv/N, d] -> [l, b, h/N, d]."""

    def __init__(self, softmax_scale: float, kernel: str):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.kernel = kernel

    def forward(self, q, k, v, causal: bool):
        return attend(q, k, v, kernel=self.kernel, q_offset=0, causal=causal,
                      softmax_scale=self.softmax_scale)  # fmt: skip


class UlyssesCoreAttention(CoreAttentionBase):
    """DeepSpeed-Ulysses over the context-parallel (sequence) group, as Megatron's
    `core_attention`: (q [l/N, b, h, d], k/v [l/N, b, h_kv, d], mask None) -> [l/N, b, h*d].
    Constructor and checks: `local_attention.CoreAttentionBase` (``kernel``: flash or dense)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, **kwargs)
        from deepspeed.sequence.layer import DistributedAttention

        _deepspeed_backend()
        self.ulysses = DistributedAttention(
            _FullSequenceAttention(self.softmax_scale, self.kernel), self.seq_group,
            scatter_idx=2, gather_idx=0,
        )  # fmt: skip

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
        self.check_inputs(attention_mask, attention_bias, packed_seq_params)
        out = self.ulysses(
            query, key, value, _BATCH_DIM, None, causal=self.is_causal(attn_mask_type)
        )  # [l/N, b, h, d]
        sq, b, h, d = out.shape
        return out.reshape(sq, b, h * d)


def layer_spec(model, kernel: str = "flash"):
    """Megatron's local GPT layer spec with `UlyssesCoreAttention` (running `kernel`) as its core
    attention."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from lss_megatron.model import get_serial_layer_spec

    spec = get_serial_layer_spec(model.causal)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=UlyssesCoreAttention, params={"kernel": kernel}
    )
    return spec


def post_build(model, grid) -> None:
    """Contiguous sequence-distributed positions (as LSS), and a guard that every layer really
    runs Ulysses on the N-rank sequence group with TP = 1."""
    from lss_megatron.positions import distribute_positions

    if getattr(grid, "layout", "contiguous") != "contiguous":
        raise ValueError(f"ulysses needs contiguous segments, got layout {grid.layout!r}")
    distribute_positions(model, grid.seq_rank, grid.seq_size)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    cfg = model.config
    if (
        not all(isinstance(c, UlyssesCoreAttention) for c in cores)
        or any(torch.distributed.get_world_size(c.seq_group) != grid.seq_size for c in cores)
        or (cfg.context_parallel_size, cfg.tensor_model_parallel_size) != (grid.seq_size, 1)
    ):
        raise RuntimeError(
            f"ulysses: the model does not run UlyssesCoreAttention on a sequence group of "
            f"{grid.seq_size} ranks with TP = 1 (core attention {type(cores[0]).__name__}, "
            f"CP {cfg.context_parallel_size}, TP {cfg.tensor_model_parallel_size})"
        )


def sp_bytes_per_layer(model, n: int, micro_batch: int, element_size: int = 4) -> int:
    """Bytes one rank sends in the four forward all-to-alls of one layer and micro-batch (the
    backward sends the same), by `lss_megatron.comm`'s convention: (n-1)/n of the local tensor.
    q and the output hold (l/N) b h d elements on a rank, k and v (l/N) b h_kv d."""
    head = (model.seq_length // n) * micro_batch * model.head_dim * element_size
    heads = (model.num_heads, model.kv_heads, model.kv_heads, model.num_heads)  # q, k, v, out
    return sum((n - 1) * h * head // n for h in heads)


MODE = Mode(
    name="ulysses",
    tensor_parallel=lambda n: 1,
    context_parallel=lambda n: n,
    layer_spec=layer_spec,
    post_build=post_build,
    problems=problems,
)
