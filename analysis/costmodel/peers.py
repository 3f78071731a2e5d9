"""Modes the cost model prices that the trainer does not run yet: ring attention.

Each is a `lss_megatron.modes.base.Mode` like the trainer's, with its cost-model terms declared and
no model (its `layer_spec` refuses). When a peer becomes a trainer mode, its declaration moves to
its own mode module (``baselines/ring.py``) with one registry line, and its entry here goes.
"""

from __future__ import annotations

from lss_megatron.modes.base import Costs, Mode
from lss_megatron.modes.costs import FP32, Collective


def _not_a_trainer_mode(*_args, **_kwargs):
    raise NotImplementedError("ring is a cost-model peer: the trainer does not run it")


def ring_sp_plan(s, lay) -> list[Collective]:
    """Forward: this rank's K/V block passes to the ring neighbour n-1 times; backward the K/V
    blocks and their dK/dV, n-1 times each (in the activations' dtype)."""
    n, b, seg = lay.n, lay.micro_batch, s.seq // lay.n
    kv = seg * b * 2 * (s.kv_heads // lay.t) * s.head_dim * lay.act_bytes
    return [Collective("p2p", kv, n, s.layers * 3 * (n - 1))]


def ring_attention_shape(s, lay) -> tuple[int, int, int, int]:
    """Local queries (l/N) against all l keys, block by block."""
    return s.heads // lay.t, s.kv_heads // lay.t, s.seq // lay.n, s.seq


def ring_attention_saved(s, lay) -> int:
    """q, the local k, v, the output and the log-sum-exp (blocks of other ranks are received,
    not saved)."""
    b, es, d, seg = lay.micro_batch, lay.act_bytes, s.head_dim, s.seq // lay.n
    return seg * b * (2 * s.heads + 2 * s.kv_heads) * d * es + b * s.heads * seg * FP32


RING = Mode(
    name="ring",
    label="ring",
    colour="tab:orange",
    degree_group="context",
    layer_spec=_not_a_trainer_mode,
    estimate_attention=_not_a_trainer_mode,
    costs=Costs(
        sp_plan=ring_sp_plan,
        attention_saved=ring_attention_saved,
        attention_shape=ring_attention_shape,
        comm_in_core=True,
        local_queries=True,
        overlap="overlap_ring",
    ),
)

PEERS: dict[str, Mode] = {RING.name: RING}
