"""lss-megatron: LSS Transformer sequence parallelism for Megatron-Core.

Public API (imported lazily, so `import lss_megatron` stays light). For a Megatron-Core user:

* `get_lss_layer_spec(*, causal=True, layout="contiguous", kv_chunks=1)`: Megatron's local GPT
  layer spec with `LSSCoreAttention` as its core attention (layout and K/V chunking are spec
  parameters);
* `prepare_lss_model(model)`: once, on the built `GPTModel`, on every rank
  of the context-parallel group: checks the model and makes its positions exact for the layout
  (feed batches cut by that layout, with GLOBAL position ids; README "In Megatron-Core");
* on machines without CUDA, call `lss_megatron.compat.cpu.apply()` before building the model.

Also: `lss_attention(q, k, v, group=None, *, causal=True, softmax_scale=None, layout=...)` (the
operator), `partial_attention`, `LSSCoreAttention`, `get_serial_layer_spec`, and the trainer's
`build_model(model_cfg, grid, mode=..., seed=...)` and configs.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "lss_attention": ("lss_megatron.lss.operator", "lss_attention"),
    "partial_attention": ("lss_megatron.lss.kernel", "partial_attention"),
    "get_lss_layer_spec": ("lss_megatron.modes.lss", "get_lss_layer_spec"),
    "prepare_lss_model": ("lss_megatron.modes.lss", "prepare_lss_model"),
    "get_serial_layer_spec": ("lss_megatron.modes.serial", "get_serial_layer_spec"),
    "build_model": ("lss_megatron.model", "build_model"),
    "LSSCoreAttention": ("lss_megatron.lss.core_attention", "LSSCoreAttention"),
    "RunConfig": ("lss_megatron.config", "RunConfig"),
    "ModelConfig": ("lss_megatron.config", "ModelConfig"),
    "ParallelConfig": ("lss_megatron.config", "ParallelConfig"),
    "TrainConfig": ("lss_megatron.config", "TrainConfig"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lss_megatron' has no attribute {name!r}")
