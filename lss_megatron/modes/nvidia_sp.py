"""nvidia-sp: NVIDIA sequence parallelism (Korthikanti et al. 2022) as configuration of Megatron-Core.

Tensor parallelism of degree N (`ColumnParallelLinear` / `RowParallelLinear`, vocabulary-parallel
embedding, output layer and cross-entropy) with ``sequence_parallel=True``: LayerNorm, dropout and
residual regions hold l/N tokens, and Megatron's own mappings all-gather the sequence before each
tensor-parallel region and reduce-scatter after it. Nothing here reimplements Megatron: the mode
is its local GPT layer spec with a LayerNorm that accepts sequence parallelism when apex is absent
(`sequence_parallel_norm`), plus a guard that the model really runs with TP = N and
``sequence_parallel=True``. Its limits (heads, MLP and vocabulary divisible by N) are
`config.MODE_RULES["nvidia-sp"]`.

Same seed -> same master weights as serial and LSS (`use_cpu_initialization=True` draws the full
weight and keeps this rank's shard), same data and loss, so losses agree step by step.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from .base import Mode
from .serial import get_serial_layer_spec


class TorchNormSP(torch.nn.Module):
    """A torch LayerNorm/RMSNorm built like Megatron's norms (`config, hidden_size, eps`) whose
    parameters carry ``sequence_parallel`` (= ``config.sequence_parallel``): each tensor-parallel
    rank sees only its l/N tokens, so their gradients are summed over the tensor-parallel group
    (`parallel.params.grad_is_tp_partial`). Megatron's `WrappedTorchNorm` refuses sequence
    parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        module = norm_cls(hidden_size, eps=eps)
        for p in module.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return module


def sequence_parallel_norm():
    """The LayerNorm class to use under ``sequence_parallel=True``: apex's if present, else ours."""
    try:  # apex is an optional GPU extra
        import apex  # noqa: F401
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    except ImportError:
        return TorchNormSP


def with_sequence_parallel_norms(spec, num_layers: int) -> TransformerBlockSubmodules:
    """A layer spec with sequence-parallel-capable LayerNorms, wrapped as block submodules so
    the final LayerNorm is one as well (nvidia-sp, and LSS x TP)."""
    norm = sequence_parallel_norm()
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm)


def layer_spec(model, grid, kernel: str = "flash"):
    """Megatron's local GPT layer spec with sequence-parallel-capable LayerNorms; core attention
    per `kernel` (flash: `FlashCoreAttention` on this rank's h/N heads; dense: Megatron's
    `DotProductAttention`)."""
    spec = get_serial_layer_spec(model.causal, kernel)
    return with_sequence_parallel_norms(spec, model.num_layers)


def verify_sequence_parallel(model, grid) -> None:
    """Refuse to run if Megatron would run something other than TP = N with sequence_parallel."""
    cfg = model.config
    if (
        not cfg.sequence_parallel
        or cfg.tensor_model_parallel_size != grid.tp_size
        or grid.tp_size < 2
    ):
        raise RuntimeError(
            "nvidia-sp asked for tensor parallelism with sequence_parallel=True but the model "
            f"was built with tensor_model_parallel_size={cfg.tensor_model_parallel_size}, "
            f"sequence_parallel={cfg.sequence_parallel} (grid TP = {grid.tp_size})"
        )


MODE = Mode(name="nvidia-sp", layer_spec=layer_spec, post_build=verify_sequence_parallel)
