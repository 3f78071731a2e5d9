"""ulysses: DeepSpeed-Ulysses (Jacobs et al. 2023) as the core attention of the same Megatron GPT model.

Like LSS, rank n of a sequence group of N ranks (Megatron's context-parallel group, TP = 1)
holds the contiguous segment [n l/N, (n+1) l/N) of every sequence, with the same
sequence-distributed positions, data sharding and double gradient averaging. Only the core
attention differs (`ulysses_attention.UlyssesCoreAttention`, DeepSpeed's
`DistributedAttention`): q, k and v are all-to-all'ed from [l/N, b, heads, d] to
[l, b, heads/N, d], a local attention runs on them, and a fourth all-to-all brings the output
back to [l/N, b, h, d]; backward the same four in reverse. GQA is exact when N divides h and
h_kv (`problems`).

This module is torch-free at import (config checks and the cost model read it); the torch part is
`ulysses_attention`, imported when the first layer spec is built.
"""

from __future__ import annotations

import importlib.util

from lss_megatron.modes import serial
from lss_megatron.modes.base import Costs, Mode
from lss_megatron.modes.costs import (
    BOOL,
    Collective,
    all_to_all_bytes,
    forward_repeats,
    lse_bytes,
    probs_bytes,
)


def layer_spec(model, grid, kernel: str = "flash"):
    """Megatron's local GPT layer spec with `UlyssesCoreAttention` (running `kernel`) as its core
    attention."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from .ulysses_attention import UlyssesCoreAttention

    spec = serial.get_serial_layer_spec(model.causal)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=UlyssesCoreAttention, params={"kernel": kernel}
    )
    return spec


def post_build(model, grid) -> None:
    """Contiguous sequence-distributed positions (as LSS), and a guard that every layer really
    runs Ulysses on the N-rank sequence group with TP = 1."""
    import torch

    from lss_megatron.lss.positions import distribute_positions

    from .ulysses_attention import UlyssesCoreAttention

    if getattr(grid, "layout", "contiguous") != "contiguous":
        raise ValueError(f"ulysses needs contiguous segments, got layout {grid.layout!r}")
    distribute_positions(model, grid.seq_rank, grid.seq_size)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    cfg = model.config
    if (
        not all(isinstance(c, UlyssesCoreAttention) for c in cores)
        or any(torch.distributed.get_world_size(c.seq_group) != grid.seq_size for c in cores)
        or (cfg.context_parallel_size, cfg.tensor_model_parallel_size) != (grid.seq_size, 1)
    ):
        raise RuntimeError(
            f"ulysses: the model does not run UlyssesCoreAttention on a sequence group of "
            f"{grid.seq_size} ranks with TP = 1 (core attention {type(cores[0]).__name__}, "
            f"CP {cfg.context_parallel_size}, TP {cfg.tensor_model_parallel_size})"
        )


def problems(model, n: int) -> list[str]:
    """Ulysses turns a sequence segment of every head into the whole sequence of h/N heads with an
    all-to-all, so the N ranks must split the query and key/value heads evenly (DeepSpeed's own
    uneven-head path needs its global sequence-parallel groups and is not used here)."""
    hint = "(Ulysses splits heads over the sequence group; LSS has no head cap: try --mode lss)"
    if importlib.util.find_spec("deepspeed") is None:  # its DistributedAttention is the mode
        return [
            "--mode ulysses needs DeepSpeed (deepspeed.sequence.layer.DistributedAttention): "
            "pip install 'lss-megatron[deepspeed]' (deepspeed==0.19.8, DS_BUILD_OPS=0)"
        ]
    return [
        f"--mode ulysses: {flag} {value} is not divisible by N = {n} {hint}"
        for flag, value in (("--num-heads", model.num_heads), ("--num-kv-heads", model.kv_heads))
        if n >= 1 and value % n
    ]


def sp_bytes_per_layer(model, n: int, micro_batch: int, element_size: int = 4) -> int:
    """Bytes one rank sends in the four forward all-to-alls of one layer and micro-batch (the
    backward sends the same), by `parallel.comm`'s convention: (n-1)/n of the local tensor.
    q and the output hold (l/N) b h d elements on a rank, k and v (l/N) b h_kv d
    (`model`: a `config.ModelConfig`)."""
    head = (model.seq_length // n) * micro_batch * model.head_dim * element_size
    heads = (model.num_heads, model.kv_heads, model.kv_heads, model.num_heads)  # q, k, v, out
    return sum((n - 1) * h * head // n for h in heads)


# --- cost model --------------------------------------------------------------------------------
def sp_plan(s, lay) -> list[Collective]:
    """q, k, v and the output all-to-all'ed forward (again under recompute) and backward, in the
    compute dtype, on the N consecutive ranks of the sequence group."""
    n, b, seg, es = lay.n, lay.micro_batch, s.seq // lay.n, lay.attn_bytes
    q = seg * b * s.heads * s.head_dim * es
    k = seg * b * s.kv_heads * s.head_dim * es
    per_dir = s.layers * (forward_repeats(lay, comm_in_core=True) + 1)
    return [
        Collective("all_to_all", all_to_all_bytes(q, n), n, 2 * per_dir),  # q in, output back
        Collective("all_to_all", all_to_all_bytes(k, n), n, 2 * per_dir),  # k, v in
    ]


def attention_shape(s, lay) -> tuple[int, int, int, int]:
    """All l tokens of this rank's h/N heads after the all-to-all."""
    return s.heads // lay.n, max(1, s.kv_heads // lay.n), s.seq, s.seq


def attention_saved(s, lay) -> int:
    """q, k, v on [l, b, h/N, d] (dense: their copies), the projection's input; dense:
    probabilities and mask (the output is not saved), flash: output and log-sum-exp. q, k, v are
    cast to the compute dtype before the all-to-alls."""
    b, es, d, n, ll = lay.micro_batch, lay.attn_bytes, s.head_dim, lay.n, s.seq
    h, kv, _, _ = attention_shape(s, lay)
    core = ll * b * (h + 2 * kv) * d * es + ll // n * b * s.heads * d * es
    if lay.attention_kernel == "materialized":
        return core + probs_bytes(b, h, ll, ll, es) + (ll * ll * BOOL if s.causal else 0)
    return core + ll * b * h * d * es + lse_bytes(b, h, ll, es)


def estimate_attention(m, n: int, b: int, es: int, kernel: str) -> tuple[int, str]:
    """All l tokens of h/N heads after the all-to-all, and the segment's output."""
    ll, d, h, kv = m.seq_length, m.head_dim, m.num_heads, m.kv_heads
    saved = ll * b * (2 * h // n + 2 * max(1, kv // n)) * d * es + ll // n * b * h * d * es
    if kernel == "dense":
        saved += b * (h // n) * ll * ll * es + (ll * ll if m.causal else 0)
        return saved, "Ulysses dense attention (scores materialised)"
    return saved + b * (h // n) * ll * 4, "Ulysses flash attention"


MODE = Mode(
    name="ulysses",
    label="ulysses",
    colour="tab:purple",
    degree_group="context",
    layer_spec=layer_spec,
    post_build=post_build,
    problems=problems,
    documents=True,
    costs=Costs(
        sp_plan=sp_plan,
        attention_saved=attention_saved,
        attention_shape=attention_shape,
        comm_in_core=True,
    ),
    estimate_attention=estimate_attention,
)
