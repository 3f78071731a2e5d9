"""NVIDIA sequence parallelism (Megatron TP + sequence_parallel): `lss_megatron.modes.nvidia_sp`."""

from lss_megatron.modes.nvidia_sp import (
    MODE,
    TorchNormSP,
    layer_spec,
    sequence_parallel_norm,
    verify_sequence_parallel,
)

__all__ = [
    "MODE",
    "TorchNormSP",
    "layer_spec",
    "sequence_parallel_norm",
    "verify_sequence_parallel",
]
