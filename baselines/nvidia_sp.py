"""nvidia-sp: NVIDIA sequence parallelism (Korthikanti et al. 2022) as configuration of Megatron-Core.

Tensor parallelism of degree N (`ColumnParallelLinear` / `RowParallelLinear`, vocabulary-parallel
embedding, output layer and cross-entropy) with ``sequence_parallel=True``: LayerNorm, dropout and
residual regions hold l/N tokens, and Megatron's own mappings all-gather the sequence before each
tensor-parallel region and reduce-scatter after it. Nothing here reimplements Megatron: the mode
is its local GPT layer spec with a LayerNorm that accepts sequence parallelism when apex is absent
(`lss_megatron.modes.sp_norms`), plus a guard that the model really runs with TP = N and
``sequence_parallel=True``. Its limits: heads, MLP and vocabulary divisible by N (`problems`).

Same seed -> same master weights as serial and LSS (`use_cpu_initialization=True` draws the full
weight and keeps this rank's shard), same data and loss, so losses agree step by step.
"""

from __future__ import annotations

from lss_megatron.modes import serial
from lss_megatron.modes.base import Costs, Mode, tensor_parallel_problems
from lss_megatron.modes.costs import forward_repeats, megatron_sp_plan


def layer_spec(model, grid, kernel: str = "flash"):
    """Megatron's local GPT layer spec with sequence-parallel-capable LayerNorms; core attention
    per `kernel` (flash: `FlashCoreAttention` on this rank's h/N heads; dense: Megatron's
    `DotProductAttention`)."""
    from lss_megatron.modes.sp_norms import with_sequence_parallel_norms

    spec = serial.get_serial_layer_spec(model.causal, kernel)
    return with_sequence_parallel_norms(spec, model.num_layers)


def verify_sequence_parallel(model, grid) -> None:
    """Refuse to run if Megatron would run something other than TP = N with sequence_parallel."""
    cfg = model.config
    if (
        not cfg.sequence_parallel
        or cfg.tensor_model_parallel_size != grid.tp_size
        or grid.tp_size < 2
    ):
        raise RuntimeError(
            "nvidia-sp asked for tensor parallelism with sequence_parallel=True but the model "
            f"was built with tensor_model_parallel_size={cfg.tensor_model_parallel_size}, "
            f"sequence_parallel={cfg.sequence_parallel} (grid TP = {grid.tp_size})"
        )


def problems(model, n: int) -> list[str]:
    """Tensor parallelism of degree N splits attention heads, key/value heads, the MLP and the
    vocabulary N ways, and sequence parallelism splits the sequence N ways."""
    if n < 2:
        return [
            f"--mode nvidia-sp needs --seq-parallel N >= 2 (tensor parallelism of degree N), got "
            f"{n}: with N = 1 Megatron runs without sequence parallelism, which would silently be "
            "plain data parallelism; use --mode serial for that"
        ]
    hint = " (LSS splits only the sequence and has no such limit: try --mode lss)"
    return tensor_parallel_problems(model, n, "--mode nvidia-sp", "N", hint)


def sp_plan(s, lay) -> list:
    """Megatron's TP + sequence_parallel collectives on all l tokens, on the N = T ranks."""
    fwd = forward_repeats(lay, comm_in_core=False)
    return megatron_sp_plan(s, s.seq, lay.micro_batch, lay.n, lay.act_bytes, fwd)


def estimate_attention(m, n: int, b: int, es: int, kernel: str) -> tuple[int, str]:
    return serial.estimate_whole_sequence(m, n, b, es, kernel)


MODE = Mode(
    name="nvidia-sp",
    label="nvidia-sp",
    colour="tab:red",
    degree_group="tensor",
    sequence_parallel=True,
    layer_spec=layer_spec,
    post_build=verify_sequence_parallel,
    megatron_attention=True,
    problems=problems,
    documents=True,
    costs=Costs(
        sp_plan=sp_plan,
        attention_saved=serial.attention_saved,
        attention_shape=serial.attention_shape,
        default_kernel="materialized",
    ),
    estimate_attention=estimate_attention,
)
