"""The small interface every parallel mode provides, and the registry of modes.

A mode says how big Megatron's tensor- and context-parallel groups are for a given degree N,
which layer spec the GPT model is built from, what to change on the built model, and which
configurations it cannot run (checked before any process group exists). Everything else (data,
loss, gradient averaging, optimizer, metrics) is shared, so modes compare on equal terms.

* ``serial``: N = 1, Megatron's stock local spec (`DotProductAttention` for the dense kernel,
  `local_attention.FlashCoreAttention` for flash): the reference;
* ``lss``: context-parallel group of size N with `LSSCoreAttention` and sequence-distributed
  positions (lss_megatron.model);
* ``nvidia-sp``: tensor parallelism of degree N with ``sequence_parallel=True``
  (baselines/nvidia_sp.py);
* ``ulysses``: DeepSpeed-Ulysses (all-to-all over heads) as the core attention, on the same
  context-parallel group and positions as LSS (baselines/ulysses.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import ModelConfig


def _no_problems(model: ModelConfig, n: int) -> list[str]:
    return []


def _noop(model, grid) -> None:
    return None


@dataclass(frozen=True)
class Mode:
    name: str
    tensor_parallel: Callable[[int], int]
    """N -> Megatron tensor-parallel size."""
    context_parallel: Callable[[int], int]
    """N -> Megatron context-parallel size (the LSS sequence group)."""
    layer_spec: Callable[[ModelConfig, str], object]
    """(model config, attention kernel) -> the `transformer_layer_spec` handed to `GPTModel` (a
    ModuleSpec or block submodules)."""
    sequence_parallel: bool = False
    """Megatron's `sequence_parallel` flag (Korthikanti et al.)."""
    post_build: Callable[[object, object], None] = field(default=_noop)
    """(model, grid) -> None: in-place changes after `GPTModel` is built."""
    problems: Callable[[ModelConfig, int], list[str]] = field(default=_no_problems)
    """(model config, N) -> messages for configurations this mode cannot run."""


def _serial() -> Mode:
    from .model import get_serial_layer_spec

    return Mode(
        name="serial",
        tensor_parallel=lambda n: 1,
        context_parallel=lambda n: 1,
        layer_spec=lambda m, kernel: get_serial_layer_spec(m.causal, kernel),
    )


def _lss_post_build(model, grid) -> None:
    """Sequence-distributed positions, and the segment layout on every LSS core attention."""
    from .core_attention import LSSCoreAttention
    from .positions import distribute_positions

    distribute_positions(model, grid.seq_rank, grid.seq_size, grid.layout)
    for module in model.modules():
        if isinstance(module, LSSCoreAttention):
            module.layout = grid.layout
            module.kv_chunks = grid.kv_gather_chunks


def _lss() -> Mode:
    from .model import get_lss_layer_spec

    return Mode(
        name="lss",
        tensor_parallel=lambda n: 1,
        context_parallel=lambda n: n,
        layer_spec=lambda m, kernel: get_lss_layer_spec(m.causal, kernel),
        post_build=_lss_post_build,
    )


def _nvidia_sp() -> Mode:
    from baselines import nvidia_sp

    return nvidia_sp.MODE


def _ulysses() -> Mode:
    from baselines import ulysses

    return ulysses.MODE


_FACTORIES = {"serial": _serial, "lss": _lss, "nvidia-sp": _nvidia_sp, "ulysses": _ulysses}


def get_mode(name: str) -> Mode:
    if name not in _FACTORIES:
        raise ValueError(f"unknown mode {name!r}; expected one of {tuple(_FACTORIES)}")
    return _FACTORIES[name]()


def mode_problems(name: str, model: ModelConfig, n: int) -> list[str]:
    """Mode-specific configuration problems, without importing torch (see baselines/*)."""
    if name == "nvidia-sp":
        from baselines.nvidia_sp_limits import problems

        return problems(model, n)
    if name == "ulysses":
        from baselines.ulysses_limits import problems

        return problems(model, n)
    return []
