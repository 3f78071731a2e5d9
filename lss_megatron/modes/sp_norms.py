"""The LayerNorm Megatron's sequence parallelism needs, without apex (nvidia-sp, and LSS x TP).

Under ``sequence_parallel=True`` each tensor-parallel rank's LayerNorms see only its l/T tokens,
so their parameters must carry Megatron's ``sequence_parallel`` tag (their gradients are summed
over the tensor-parallel group); Megatron's `WrappedTorchNorm` refuses sequence parallelism, and
apex's `FusedLayerNorm` is an optional GPU extra. Imported only when such a spec is built.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


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
