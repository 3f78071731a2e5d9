"""Modes the cost model prices that the trainer does not run: none at present.

Each would be a `lss_megatron.modes.base.Mode` like the trainer's, with its cost-model terms
declared and no model (its `layer_spec` refusing). Ring attention was one until it became the
trainer's ``ring`` mode (``baselines/ring.py``, one registry line).
"""

from __future__ import annotations

from lss_megatron.modes.base import Mode

PEERS: dict[str, Mode] = {}
