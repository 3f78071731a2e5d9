"""The registry of parallel modes: one line per mode, naming the module that declares it.

Each module holds one `base.Mode` named ``MODE`` (config rules, layer spec and post-build hook,
cost-model terms, memory estimate, display name and colour). The registry names modules by
dotted path, as Megatron's `ModuleSpec` can name a module, and imports one only when its mode is
asked for (`get_mode`), so `lss_megatron` never imports the baselines, and a mode module that
needs torch imports it inside its functions (config checks and the cost model stay torch-free).

* ``serial``: N = 1, Megatron's stock local spec: the reference;
* ``lss``: the LSS Transformer on a context-parallel (sequence) group of N ranks;
* ``nvidia-sp``: Megatron tensor parallelism of degree N with ``sequence_parallel=True``;
* ``ulysses``: DeepSpeed-Ulysses on the same sequence group and positions as LSS;
* ``ring``: ring attention (context parallelism's p2p algorithm), likewise.

A new mode is one module and one line here (docs/design.md, "Adding a mode").
"""

from __future__ import annotations

import importlib
from functools import cache

from .base import Mode

REGISTRY: dict[str, str] = {
    "serial": "lss_megatron.modes.serial",
    "lss": "lss_megatron.modes.lss",
    "nvidia-sp": "lss_megatron.baselines.nvidia_sp",
    "ulysses": "lss_megatron.baselines.ulysses",
    "ring": "lss_megatron.baselines.ring",
}
MODES = tuple(REGISTRY)
REFERENCE = "serial"
"""The one-process reference every mode is checked and scaled against (N = 1)."""
METHOD = "lss"
"""The method this project brings; tables give the other modes' ratios to it."""
BASELINE = "nvidia-sp"
"""The baseline the paper compares LSS with (``speedup_vs_nvidia_sp``)."""


@cache
def get_mode(name: str) -> Mode:
    """The mode's declaration (imports its module on first use); ValueError for an unknown name."""
    if name not in REGISTRY:
        raise ValueError(f"unknown mode {name!r}; expected one of {MODES}")
    mode = importlib.import_module(REGISTRY[name]).MODE
    if mode.name != name:
        raise RuntimeError(f"{REGISTRY[name]} declares mode {mode.name!r}, registered as {name!r}")
    return mode


def find_mode(name: str) -> Mode | None:
    """The mode's declaration, None for a name the registry does not hold."""
    return get_mode(name) if name in REGISTRY else None


def modes_accepting(option: str) -> tuple[str, ...]:
    """The modes that accept a mode-specific `ParallelConfig` option (e.g. ``lss_layout``)."""
    return tuple(m for m in MODES if option in get_mode(m).options)
