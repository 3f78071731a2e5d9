"""The small interface every parallel mode provides (a leaf: it imports only the config).

A mode is the torch side of a `config.ModeRules`: which layer spec the GPT model is built from
and what to change on the built model. How big Megatron's groups are for a degree N and which
models a mode cannot run are torch-free rules in config.py, checked before any process group
exists. Everything else (data, loss, gradient averaging, optimizer, metrics) is shared, so modes
compare on equal terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import MODE_RULES, ModeRules


def _noop(model, grid) -> None:
    return None


@dataclass(frozen=True)
class Mode:
    name: str
    """One of `config.MODES`."""
    layer_spec: Callable[..., object]
    """(model config, grid, attention kernel) -> the `transformer_layer_spec` handed to `GPTModel` (a ModuleSpec
    or block submodules)."""
    post_build: Callable[[object, object], None] = field(default=_noop)
    """(model, grid) -> None: in-place changes after `GPTModel` is built."""

    @property
    def rules(self) -> ModeRules:
        """The mode's degrees, sequence_parallel flag and limits (config.py)."""
        return MODE_RULES[self.name]
