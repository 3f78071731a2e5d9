"""Named assumption sets for the paper's claims (``--assumptions``), and the Summit layouts they
are applied to. Every default names where it comes from (`SOURCES`, docs/costmodel.md).

Both sets use the same layouts on the same machine (`v100-summit`), so they differ only in what
a 2023 implementation and a current one would run:

* ``paper-2023``: fp16 mixed precision (V100 tensor cores; V100 has no bf16) and materialised
  scores on BOTH sides (FlashAttention had no V100 support in 2023; Megatron's
  DotProductAttention for the baseline, a dense partial attention for LSS);
* ``modern``: bf16 mixed precision and a flash (memory-efficient) kernel on both sides. V100
  has no bf16 tensor-core path: the model treats the two 2-byte types alike (same bytes, the
  tensor-core rate), so this set isolates the kernel change on the paper's machine.

Layouts (both sets): 144 GPUs = 24 Summit nodes; LSS spreads one sequence over all 144
(N = 144, D = 1, one sequence per step); NVIDIA SP's degree t is capped by the 12 heads, so
t = 6 (inside the 6-GPU node) or t = 12 (across two nodes), with D = 144 / t replicas.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from lss_megatron.resources import presets_dir

from .configs import config_from_preset

DEVICE = "v100-summit"
RANKS = 144
LSS_DEGREE = 144
SP_DEGREES = (6, 12)
EQUAL_RANKS_LSS = (6, 24, 144)
SEQ_144 = 6912
SEQ_3456, N_3456, D_3456 = 50112, 144, 24
LEGAL_SP_DEGREES = (1, 2, 3, 4, 6, 12)
"""t dividing the 12 heads, the 3,072 FFN and the 768 padded vocabulary of the 144-GPU model."""
PRESET_144 = presets_dir() / "paper-enwik8-144gpu.yaml"
PRESET_3456 = presets_dir() / "paper-enwik8-3456gpu.yaml"


@dataclass(frozen=True)
class AssumptionSet:
    name: str
    dtype: str  # make_config's dtype: fp16 (a what-if twin of fp32) or bf16
    attention_kernel: str  # the costmodel section's kernel, the same on both sides
    about: str


ASSUMPTION_SETS = {
    "paper-2023": AssumptionSet(
        "paper-2023",
        "fp16",
        "materialized",
        "V100, fp16 mixed precision, materialised scores on both sides",
    ),
    "modern": AssumptionSet(
        "modern", "bf16", "flash", "V100, bf16 mixed precision, flash kernels on both sides"
    ),
}

SOURCES = (
    (
        "device",
        "V100 SXM2 16 GB, 125 TFLOP/s fp16 tensor, 900 GB/s; Summit node of 6",
        "docs/hardware.md (datasheets; the paper names V100 and 144 / 3,456 GPUs)",
    ),
    (
        "paper-2023 precision",
        "fp16 mixed precision (fp32 master weights, AdamW state)",
        "V100 has no bf16; Megatron-LM's --fp16 was the V100 practice (the paper's is unknown)",
    ),
    (
        "paper-2023 kernel",
        "materialised scores on both sides",
        "FlashAttention v1/v2 did not support V100 (sm70) in 2023; docs/hardware.md",
    ),
    (
        "modern",
        "bf16 and flash kernels on both sides",
        "today's Megatron-Core default path (TransformerEngine / flash attention, bf16)",
    ),
    (
        "baseline degree t",
        "6 or 12",
        "t must divide the 12 heads (Megatron TP); 6 = one "
        "Summit node, 12 = two nodes (docs/hardware.md)",
    ),
    (
        "LSS degree N",
        "144 (D = 1)",
        "LSS has no head limit; one sequence over all 144 GPUs is "
        "the layout the claim contrasts (issue 13)",
    ),
    (
        "sequences per step",
        "1 per model replica (per iteration), or equal tokens",
        "the paper's batch is unknown: both readings are printed",
    ),
    (
        "l at 144 GPUs",
        f"{SEQ_144:,}",
        "the smallest multiple of 144 x 16 (16-token tensor-core "
        "tiles per GPU) above the preset's 6,144; the paper's is unknown",
    ),
    (
        "model",
        "12 layers, E 768, 12 heads, FFN 3,072, vocab 256 padded to 768 (144 GPUs); "
        "12 layers, E 512, 8 heads, FFN 2,048, N 144 x D 24 (3,456 GPUs)",
        "launch/presets/paper-enwik8-*.yaml (documented guesses)",
    ),
    (
        "efficiencies",
        "GEMM 0.7, flash attention 0.5 of peak; 15 HBM passes over scores",
        "steptime.Assumptions defaults, not fitted to the claims",
    ),
    (
        "network",
        "NVLink 50 GB/s in a socket, X-Bus 32 GB/s, EDR 23 GB/s per node; 5 / 10 us",
        "hw.SUMMIT (docs/hardware.md)",
    ),
    (
        "K/V-gather overlap",
        "off (--overlap-kv-gather)",
        "the trainer's LSS gathers synchronously (lss_megatron/lss)",
    ),
    (
        "baseline recompute",
        "none (--baseline-recompute selective)",
        "Megatron-Core's default recompute_granularity=None; Korthikanti et al. pair SP with "
        "selective recompute",
    ),
    (
        "memory that fits",
        "weights + master + grads + AdamW + saved activations + one layer's "
        "attention-backward transient <= 16 GB",
        "counts.transient_bytes (an estimate)",
    ),
    (
        "FLOPs",
        "causal pairs l(l+1)/2 (the trainer's), and the full l^2 square a dense kernel executes",
        "counts.model_flops_per_step; both printed",
    ),
)
"""(assumption, value, source) of every default, as docs/costmodel.md tabulates them."""


def get_set(name: str) -> AssumptionSet:
    if name not in ASSUMPTION_SETS:
        raise ValueError(
            f"unknown assumption set {name!r}; expected one of {sorted(ASSUMPTION_SETS)}"
        )
    return ASSUMPTION_SETS[name]


def head_capped_degree(ranks: int) -> int:
    """NVIDIA SP's degree on `ranks` GPUs: the largest legal t that divides them."""
    return max(t for t in LEGAL_SP_DEGREES if ranks % t == 0)


def setup_144(
    aset: AssumptionSet,
    mode: str,
    degree: int,
    ranks: int = RANKS,
    seq_length: int = SEQ_144,
    global_batch: int | None = None,
    recompute: str = "none",
    **flags,
) -> dict:
    """The 144-GPU model on `ranks` GPUs: `mode` at sequence (lss) or tensor (nvidia-sp) degree
    `degree`, D = ranks / degree, one sequence per replica unless `global_batch`; `flags`: any
    other trainer flag in `make_config`'s names (``lss_save_kv="local"``, ``zero_stage=1``)."""
    d = ranks // degree
    return config_from_preset(
        PRESET_144,
        mode=mode,
        seq_parallel=degree,
        data_parallel=d,
        global_batch_size=global_batch or d,
        micro_batch_size=1,
        seq_length=seq_length,
        dtype=aset.dtype,
        attention_kernel=aset.attention_kernel,
        recompute=recompute,
        **flags,
    )


def setup_3456(
    aset: AssumptionSet,
    seq_parallel: int = N_3456,
    data_parallel: int = D_3456,
    seq_length: int = SEQ_3456,
    global_batch: int | None = None,
) -> dict:
    """The 3,456-GPU model (LSS) on an N x D grid, one sequence per replica unless given."""
    return config_from_preset(
        PRESET_3456,
        seq_parallel=seq_parallel,
        data_parallel=data_parallel,
        global_batch_size=global_batch or data_parallel,
        micro_batch_size=1,
        seq_length=seq_length,
        dtype=aset.dtype,
        attention_kernel=aset.attention_kernel,
    )


def at_length(config: dict, seq_length: int) -> dict:
    """`config` at another sequence length (a multiple of its degrees: the caller's step)."""
    out = copy.deepcopy(config)
    out["model"]["seq_length"] = seq_length
    return out


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)
