"""Per-rank memory estimate of a run, checked against the memory available before anything starts.

`estimate(cfg)` counts, for one rank of the layout:

* parameters: Megatron's local GPT layer (biases on, untied embeddings) as this rank holds it:
  tensor-parallel shards (nvidia-sp, t = N), sequence-distributed learned positions (lss,
  ulysses: l/N rows); under ``--dtype bf16`` the bf16 model plus its fp32 master weights
  (ZeRO: DeepSpeed's fp32 partitions, a 1/P share);
* gradients: one fp32 gradient per parameter (ZeRO stage 2: a 1/P share);
* optimizer state: AdamW's exp_avg and exp_avg_sq plus a 4-byte step per tensor, none for SGD
  (ZeRO stage 1 and 2: a 1/P share);
* activations: what autograd saves for backward in one micro-batch, for the run's attention
  kernel (``--attention-kernel``) and ``--recompute``: the dense kernel materialises the softmax
  probabilities (serial, nvidia-sp: Megatron's DotProductAttention, [b, h/t, l, l], and the
  causal mask; LSS [b, h, l/N, l]; Ulysses [b, h/N, l, l]), the flash kernel keeps a
  log-sum-exp instead; LSS keeps the gathered [K|V] of the whole sequence, Ulysses all l tokens
  of h/N heads after its all-to-all. Selective recompute keeps only the core attention's inputs,
  full recompute each layer's input.

What the attention saves is each mode's own (`Mode.estimate_attention`). These are the tensors that must coexist at the peak; temporary buffers, the framework's own memory
and allocator slack come on top, so the estimate is a lower bound and a run it refuses cannot fit.
The exact per-tensor enumeration is the cost model's (analysis/costmodel/counts.py, kept apart on
purpose); tests/unit/test_faults_upfront.py holds this estimate against it, and
tests/e2e/test_faults_upfront.py against measured bytes.
Import-light: no torch unless `available_memory` asks CUDA (only where a GPU device exists).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .modes import get_mode

GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    params: int
    grads: int
    optimizer: int
    activations: int
    kernel: str

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
        return (
            f"{g(self.total)} GiB (parameters {g(self.params)}, gradients {g(self.grads)}, "
            f"optimizer state {g(self.optimizer)}, activations {g(self.activations)} for one "
            f"micro-batch with {self.kernel})"
        )


def _degrees(mode: str, n: int) -> tuple[int, bool]:
    """(tensor-parallel size, whether the sequence group splits tokens), from the mode's rules."""
    declared = get_mode(mode)
    return declared.tensor_parallel(n), declared.context_parallel(n) > 1


def parameter_count(m, mode: str, n: int) -> tuple[int, int]:
    """(elements, tensors) of this rank's parameters (`m`: ModelConfig, `n`: the degree N)."""
    t, split = _degrees(mode, n)
    e, d, f, v = m.hidden_size, m.head_dim, m.ffn_size, m.padded_vocab_size
    qkv = (m.num_heads + 2 * m.kv_heads) * d
    layer = 4 * e + e * m.num_heads * d // t + e + qkv // t * e + qkv // t
    layer += f // t * e + f // t + e * f // t + e
    count = 2 * (v // t) * e + m.num_layers * layer + 2 * e
    tensors = 3 + 12 * m.num_layers
    if m.position_embedding == "learned":
        count += (m.seq_length // n if split else m.seq_length) * e
        tensors += 2
    else:
        tensors += 1
    return count, tensors


def activation_bytes(
    m,
    mode: str,
    n: int,
    micro_batch: int,
    dtype: str,
    kernel: str = "flash",
    recompute: str = "none",
) -> tuple[int, str]:
    """(bytes saved for backward in one micro-batch's forward, the attention kernel)."""
    es = 2 if dtype in ("bf16", "fp16") else 4
    t, split = _degrees(mode, n)
    b, e = micro_batch, m.hidden_size
    local = m.seq_length // n  # norm / residual regions (serial: N = 1)
    tp_tokens = m.seq_length // n if split else m.seq_length  # QKV, MLP and loss regions
    attention, name = get_mode(mode).estimate_attention(m, n, b, es, kernel)
    if recompute == "selective":  # the checkpoint keeps q, k, v (the fused QKV output), context
        attention = tp_tokens * b * (2 * m.num_heads + 2 * m.kv_heads) // t * m.head_dim * es
    layer = 4 * local * b * e * es + 2 * tp_tokens * b * (m.ffn_size // t) * es + attention
    if recompute == "full":  # each layer's input only
        layer = local * b * e * es
    head = 2 * local * b * e * es + tp_tokens * b * (m.padded_vocab_size // t) * es
    suffix = "" if recompute == "none" else f", {recompute} recompute"
    return m.num_layers * layer + head, name + suffix


def estimate(cfg) -> Estimate:
    """This rank's memory for `cfg` (a validated RunConfig)."""
    mode, n = cfg.parallel.mode, cfg.parallel.seq_parallel
    count, tensors = parameter_count(cfg.model, mode, n)
    t = cfg.train
    params = grads = 4 * count
    optimizer = 8 * count + 4 * tensors if t.optimizer == "adamw" else 0
    world = cfg.parallel.world_size
    if t.dtype in (
        "bf16",
        "fp16",
    ):  # a 16-bit model plus fp32 masters (ZeRO: DeepSpeed's partitions)
        params = 2 * count + (-(-4 * count // world) if t.zero_stage else 4 * count)
    if t.zero_stage >= 1:
        optimizer = -(-optimizer // world)
    if t.zero_stage >= 2:
        grads = -(-grads // world)
    acts, kernel = activation_bytes(
        cfg.model, mode, n, cfg.micro_batch, t.dtype, t.attention_kernel, t.recompute
    )
    return Estimate(params, grads, optimizer, acts, kernel)


def available_memory(local_rank: int, local_ranks: int) -> tuple[int, str]:
    """(bytes this rank may use, where that number comes from)."""
    import glob
    import sys

    import psutil

    # importing torch takes seconds: only where a GPU may be (or torch is loaded anyway)
    gpu = "torch" in sys.modules or glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
    if gpu:
        import torch

        if torch.cuda.is_available():
            dev = local_rank % torch.cuda.device_count()
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free), f"free on cuda:{dev}"
    avail = psutil.virtual_memory().available
    return avail // max(1, local_ranks), (
        f"host memory available ({avail / GIB:.1f} GiB) shared by {local_ranks} local rank(s)"
    )


def memory_problems(
    cfg, local_rank: int, local_ranks: int, available: int | None = None
) -> list[str]:
    """One problem naming the estimate when it exceeds the memory available to this rank."""
    est = estimate(cfg)
    where = "given"
    if available is None:
        available, where = available_memory(local_rank, local_ranks)
    if est.total <= available:
        return []
    return [
        f"per-rank memory estimate {est.describe()} exceeds the {available / GIB:.2f} GiB "
        f"available ({where}); use a smaller model or batch, more ranks, or "
        "--no-memory-check to start anyway"
    ]
