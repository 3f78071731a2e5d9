"""The parallel modes, one file each, and their registry (`get_mode`).

* ``serial``: N = 1, Megatron's stock local spec (`DotProductAttention`): the reference;
* ``lss``: context-parallel group of size N with `LSSCoreAttention` and sequence-distributed
  positions;
* ``nvidia-sp``: tensor parallelism of degree N with ``sequence_parallel=True``;
* ``ulysses``: DeepSpeed-Ulysses (all-to-all over heads) as the core attention, on the same
  context-parallel group and positions as LSS.

The names, degrees and limits of the modes are `config.MODE_RULES` (torch-free); a new mode is one
rule there and one file here.
"""

from __future__ import annotations

from ..config import MODES
from . import lss, nvidia_sp, serial, ulysses
from .base import Mode

REGISTRY: dict[str, Mode] = {
    m.name: m for m in (serial.MODE, lss.MODE, nvidia_sp.MODE, ulysses.MODE)
}
if tuple(REGISTRY) != MODES:
    raise RuntimeError(f"modes {tuple(REGISTRY)} do not match config.MODE_RULES {MODES}")


def get_mode(name: str) -> Mode:
    if name not in REGISTRY:
        raise ValueError(f"unknown mode {name!r}; expected one of {MODES}")
    return REGISTRY[name]
