"""What NVIDIA sequence parallelism (Megatron TP + sequence_parallel) cannot run, as messages.

Pure Python (no torch import) so the trainer can reject a configuration before any process group
is built. Tensor parallelism of degree N splits attention heads, key/value heads, the MLP and the
vocabulary N ways, and sequence parallelism splits the sequence N ways; LSS splits only the
sequence, so it has no head cap.
"""

from __future__ import annotations

_HINT = "(LSS splits only the sequence and has no such limit: try --mode lss)"


def problems(model, n: int) -> list[str]:
    p = []
    if n < 2:
        p.append(
            f"--mode nvidia-sp needs --seq-parallel N >= 2 (tensor parallelism of degree N), got "
            f"{n}: with N = 1 Megatron runs without sequence parallelism, which would silently be "
            "plain data parallelism; use --mode serial for that"
        )
        return p
    if model.num_heads % n:
        p.append(
            f"--mode nvidia-sp: --num-heads {model.num_heads} is not divisible by N = {n} {_HINT}"
        )
    if model.kv_heads % n:
        p.append(
            f"--mode nvidia-sp: --num-kv-heads {model.kv_heads} is not divisible by N = {n} {_HINT}"
        )
    if model.ffn_size % n:
        p.append(
            f"--mode nvidia-sp: --ffn-hidden-size {model.ffn_size} is not divisible by N = {n}"
        )
    if model.padded_vocab_size % n:
        p.append(
            f"--mode nvidia-sp: the model vocabulary {model.padded_vocab_size} (--vocab-size "
            f"{model.vocab_size}, --make-vocab-size-divisible-by "
            f"{model.make_vocab_size_divisible_by}) is not divisible by N = {n}: Megatron-Core "
            "splits it over tensor-parallel ranks; pad it with --make-vocab-size-divisible-by"
        )
    return p
