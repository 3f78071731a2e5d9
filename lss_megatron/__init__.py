"""lss-megatron: LSS Transformer sequence parallelism for Megatron-Core.

Public API (imported lazily, so `import lss_megatron` stays light):

* `lss_attention(q, k, v, group=None, *, causal=True, softmax_scale=None)`: the operator;
* `get_lss_layer_spec(causal=True)`: Megatron's local GPT layer spec with LSS core attention;
* `build_model(model_cfg, grid, mode=..., seed=...)`: a Megatron-Core `GPTModel` in that mode;
* `LSSCoreAttention`: the `core_attention` module itself.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "lss_attention": ("lss_megatron.lss.operator", "lss_attention"),
    "partial_attention": ("lss_megatron.lss.kernel", "partial_attention"),
    "get_lss_layer_spec": ("lss_megatron.modes.lss", "get_lss_layer_spec"),
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
