"""Comparison presets: the runs `python -m analysis.compare --preset NAME` makes, and their order.

A preset is a grid of sequence-parallel degrees N, data-parallel sizes D and sequence lengths l,
one model, one training recipe and the attention kernels and recompute settings to run (default:
flash, no recompute, the trainer's defaults, for every mode). For every grid point (N, D, l) it runs each of its
**variants** on P = N x D ranks (and, with ``serial_at_scale``, ``serial`` = plain data
parallelism on the same P ranks), plus the **serial reference** the efficiencies need:

* strong scaling (``scaling="strong"``, fixed l): serial on ONE rank at every length l;
* weak scaling (``scaling="weak"``, l = l0 x N for base lengths l0): serial with N = 1 and the
  same D (P = D; one rank when D = 1) at every base length l0.

A variant (`VARIANTS`) is a label for a trainer mode plus extra flags: the plain modes ``lss``,
``nvidia-sp``, ``ulysses`` and ``serial`` are their own labels; ``lss-zigzag`` (``--lss-layout
zigzag``), ``lss-kv2`` / ``lss-kv4`` (``--kv-gather-chunks``), ``lss-zero1`` / ``lss-zero2`` and
``ulysses-zero1`` / ``ulysses-zero2`` (``--zero-stage``) add the options beyond the paper. The label
names the run (``lss-zigzag_N4_D1_l512_r0``) and the table's ``variant`` column. A variant whose
flag this trainer lacks is skipped with that reason, like any run the trainer would reject.

A preset with explicit ``layouts`` ((label, N, D) triples) runs exactly those layouts at every
length instead of the degrees x data-parallel grid: an equal-ranks series, where each mode
runs at its own legal degrees on the same P ranks.

Runs are interleaved so that machine noise hits the configurations alike: with K repeats, every
configuration runs once per round, K rounds, the order within each round shuffled by a seed that
plan.json records (`make_plan`; docs/measurement.md says why). A run the trainer would
reject (e.g. nvidia-sp needs heads, key/value heads, FFN and vocabulary divisible by N) is left
out of the plan and listed in `Plan.skipped`, with the trainer's own message.

Presets (`PRESETS`):

========================  ================================================================
``smoke``                 2 layers, E 64, l in {128, 256}, N in {2, 4}: 10 runs of 3 steps,
                          at most 4 processes, ~2-3 min on 2 CPU cores (the test's preset)
``cpu-strong``            4 layers, E 128, l in {512, 1024}, N in {2, 4}, lss, nvidia-sp and
                          ulysses, serial also as data parallelism on P ranks, 2 repeats: 36 runs
``cpu-weak``              same model, l = l0 x N for l0 in {128, 256}, N in {2, 4}, lss,
                          nvidia-sp and ulysses, 2 repeats: 28 runs, ~12-17 min
``cpu-options``           the options beyond the paper against plain LSS: 2 layers, E 256, GQA,
                          RoPE, l = 1024, N = 4: lss, lss-zigzag, lss-kv4, ulysses, nvidia-sp,
                          lss-zero1, lss-zero2 and the serial reference, 3 steps: 8 runs,
                          ~2.5 min on 2 CPU cores
``cpu-kernels``           like for like: serial, lss, nvidia-sp and ulysses x attention kernel
                          {flash, dense} x recompute {none, selective}, MHA, N = 4, l = 1024:
                          16 runs (the kernel effect and the scheme effect side by side)
``cpu-kernels-gqa``       the same with GQA 4:1 at N = 2: 16 runs
``paper-enwik8-144gpu``   cluster: the paper's 144-GPU comparison with NVIDIA SP, strong
                          scaling of N = 6 x D in {1, 4, 24} at l in {3072, 6144, 12288}
``paper-enwik8-144gpu-``  cluster: the equal-ranks series on 144 GPUs, l 6,912: LSS at
``equal-ranks``           N in {6, 24, 144} against NVIDIA SP at its head-capped t in {6, 12}
                          (D = 144 / N), flash and dense kernels
``paper-enwik8-3456gpu``  cluster: weak scaling, 348 tokens per GPU, D = 24, N up to 144:
                          l = 50,112 on 3,456 GPUs
========================  ================================================================

Cluster presets (``cluster=True``) use the enwik8 data (``--data enwik8 --data-path``) with the
models and recipes of launch/presets/paper-enwik8-*.yaml (every flag given explicitly, so no
checkpoints are written); `compare` only prints their commands (``--dry-run``) and builds the
table from their finished run folders (``--collect``). Tests never run them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from lss_megatron.config import ConfigError
from lss_megatron.resources import source_root

from .trainer_config import argv, problems, run_config, trainer_flags

REPO = source_root()
"""The repository root (launches run there), or None from an installed wheel (launches run in
the current folder, the trainer imported from the installation)."""
PARALLEL_MODES = ("lss", "nvidia-sp")
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Variant:
    """A trainer mode plus extra flags (without dashes), run under one label."""

    mode: str
    flags: Mapping[str, object] = field(default_factory=dict)
    about: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))


VARIANTS: Mapping[str, Variant] = MappingProxyType(
    {
        "serial": Variant("serial", about="Megatron's stock attention, plain data parallelism"),
        "lss": Variant("lss", about="LSS as in the paper: contiguous segments, one fused gather"),
        "nvidia-sp": Variant(
            "nvidia-sp", about="Megatron TP + sequence_parallel (the paper's baseline)"
        ),
        "ulysses": Variant("ulysses", about="DeepSpeed-Ulysses: all-to-all over heads"),
        "lss-zigzag": Variant("lss", {"lss-layout": "zigzag"}, "zigzag segments: causal balance"),
        "lss-kv2": Variant("lss", {"kv-gather-chunks": 2}, "K/V gathered in 2 head chunks"),
        "lss-kv4": Variant("lss", {"kv-gather-chunks": 4}, "K/V gathered in 4 head chunks"),
        "lss-zero1": Variant("lss", {"zero-stage": 1}, "ZeRO-1 over all P ranks"),
        "lss-zero2": Variant("lss", {"zero-stage": 2}, "ZeRO-2 over all P ranks"),
        "ulysses-zero1": Variant("ulysses", {"zero-stage": 1}, "Ulysses with ZeRO-1"),
        "ulysses-zero2": Variant("ulysses", {"zero-stage": 2}, "Ulysses with ZeRO-2"),
    }
)
"""Every variant label a preset may list. Plain modes are their own labels."""


def get_variant(label: str) -> Variant:
    if label not in VARIANTS:
        raise KeyError(f"unknown variant {label!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[label]


@dataclass(frozen=True)
class Preset:
    """A comparison grid: one model and recipe, many layouts and lengths."""

    name: str
    summary: str
    scaling: str
    """``strong`` (fixed lengths) or ``weak`` (l = base length x N)."""
    degrees: tuple[int, ...]
    """Sequence-parallel degrees N of the lss / nvidia-sp runs."""
    seq_lengths: tuple[int, ...]
    """strong: the lengths l; weak: the base lengths l0 (tokens per sequence-parallel rank)."""
    model: Mapping[str, object]
    """Trainer flags of the model (without dashes), the same for every run."""
    train: Mapping[str, object]
    """Trainer flags of the recipe (batch, steps, optimizer, data, ...), the same for every run."""
    data_parallel: tuple[int, ...] = (1,)
    """Data-parallel sizes D of the grid (P = N x D)."""
    ranks: int | None = None
    """Equal ranks: every grid run uses exactly this many ranks P, at each degree N of `degrees`
    that divides it (D = P / N; `data_parallel` is then unused), so that each mode runs at every
    layout the trainer allows it on P ranks and the best layout per mode can be compared."""
    modes: tuple[str, ...] = PARALLEL_MODES
    """Variant labels (`VARIANTS`; plain modes are their own labels) run at every grid point."""
    serial_at_scale: bool = False
    """Also run `serial` (plain data parallelism, N = 1, D = P) at every grid point's P."""
    kernels: tuple[str, ...] = ("flash",)
    """``--attention-kernel`` values: every variant and reference runs with each."""
    recomputes: tuple[str, ...] = ("none",)
    """``--recompute`` values: every variant and reference runs with each."""
    repeats: int = 1
    timeout_s: float = 120.0
    """Hard limit per run (launch, imports and all steps)."""
    memory_budget_bytes: int = 1 * GiB
    """Per-rank budget of the longest-trainable-sequence figure."""
    cluster: bool = False
    """Needs a cluster: `compare` prints commands (--dry-run) and collects results (--collect)."""
    gpus_per_node: int = 6
    """Cluster presets: GPUs (tasks) per node of the printed sbatch commands."""
    notes: str = ""
    layouts: tuple[tuple[str, int, int], ...] = ()
    """Explicit (variant label, N, D) layouts, each run at every length of `seq_lengths` (strong
    scaling) instead of the `degrees` x `data_parallel` grid: how an equal-ranks series gives
    each mode its own legal degrees on the same P = N x D ranks."""

    def __post_init__(self) -> None:
        if self.scaling not in ("strong", "weak"):
            raise ValueError(f"preset {self.name}: scaling must be strong or weak")
        if self.layouts and self.scaling != "strong":
            raise ValueError(f"preset {self.name}: explicit layouts need strong scaling")
        for label in (*self.modes, *(x[0] for x in self.layouts)):
            get_variant(label)
        object.__setattr__(self, "model", MappingProxyType(dict(self.model)))
        object.__setattr__(self, "train", MappingProxyType(dict(self.train)))


@dataclass(frozen=True)
class RunSpec:
    """One trainer launch of a plan."""

    mode: str
    seq_parallel: int
    data_parallel: int
    seq_length: int
    repeat: int
    role: str
    """``grid`` (a mode at a grid point) or ``reference`` (the serial run efficiencies use)."""
    flags: Mapping[str, object] = field(default_factory=dict)
    """Every trainer flag (without dashes) except --out and --progress."""
    variant: str = ""
    """The variant label (`VARIANTS`); empty means the plain mode."""

    @property
    def label(self) -> str:
        return self.variant or self.mode

    @property
    def world_size(self) -> int:
        return self.seq_parallel * self.data_parallel

    @property
    def setting(self) -> str:
        """``_dense``, ``_selective``, ``_dense_selective``; empty for flash without recompute."""
        kernel = self.flags.get("attention-kernel", "flash")
        recompute = self.flags.get("recompute", "none")
        return (f"_{kernel}" if kernel != "flash" else "") + (
            f"_{recompute}" if recompute != "none" else ""
        )

    @property
    def config_id(self) -> str:
        """The configuration (every repeat of it shares this id): ``lss_N4_D1_l1024_dense``."""
        return (
            f"{self.label}_N{self.seq_parallel}_D{self.data_parallel}_l{self.seq_length}"
            f"{self.setting}"
        )

    @property
    def run_id(self) -> str:
        return f"{self.config_id}_r{self.repeat}"

    def trainer_args(self, out: Path | str) -> list[str]:
        """The trainer's command-line arguments, writing into `out`."""
        return argv(self.flags) + ["--out", str(out), "--progress", "off"]


@dataclass(frozen=True)
class Plan:
    preset: Preset
    runs: tuple[RunSpec, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    """(configuration id, the trainer's reason) for grid runs the trainer would reject."""
    seed: int = 0
    """The seed of the order within each round (`make_plan`)."""
    repeats: int = 1
    """Rounds: every configuration runs this many times, once per round."""
    configs: tuple[str, ...] = ()
    """The configuration ids in grid order (references first), how summary.csv lists them."""


_SMALL_TRAIN = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "seed": 1234,
    "dtype": "fp32",
    "data": "synthetic",
    "dist-timeout": 120,
}
_PAPER_TRAIN = {
    "global-batch-size": 24,
    "micro-batch-size": 1,
    "optimizer": "adamw",
    "lr": 2.5e-4,
    "lr-schedule": "cosine",
    "warmup-steps": 5,
    "weight-decay": 0.0,
    "clip-grad": 0.25,
    "seed": 1234,
    "dtype": "fp32",
    "data": "enwik8",
    "data-path": "data/enwik8.zip",
}
_PAPER_144_MODEL = {
    "num-layers": 12,
    "hidden-size": 768,
    "num-heads": 12,
    "ffn-hidden-size": 3072,
    "vocab-size": 256,
    "make-vocab-size-divisible-by": 768,
    "position-embedding": "learned",
}
_OPTION_VARIANTS = (
    "lss",
    "lss-zigzag",
    "lss-kv4",
    "ulysses",
    "nvidia-sp",
    "lss-zero1",
    "lss-zero2",
)
_KERNELS_MODEL = {
    "num-layers": 2,
    "hidden-size": 256,
    "num-heads": 8,
    "ffn-hidden-size": 512,
    "vocab-size": 256,
    "position-embedding": "learned",
}
_CPU_MODEL = {
    "num-layers": 4,
    "hidden-size": 128,
    "num-heads": 8,
    "num-kv-heads": 4,
    "ffn-hidden-size": 512,
    "vocab-size": 256,
    "position-embedding": "learned",
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smoke",
            summary="CI smoke test: 10 short runs, at most 4 processes, < 5 min on 2 CPU cores",
            scaling="strong",
            degrees=(2, 4),
            seq_lengths=(128, 256),
            model={
                "num-layers": 2,
                "hidden-size": 64,
                "num-heads": 8,
                "num-kv-heads": 4,
                "ffn-hidden-size": 256,
                "vocab-size": 256,
                "position-embedding": "learned",
            },
            train={**_SMALL_TRAIN, "global-batch-size": 2, "micro-batch-size": 1, "steps": 3},
            timeout_s=100.0,
            memory_budget_bytes=64 * MiB,
            notes="2 micro-batches per step, GQA (8 heads, 4 key/value heads).",
        ),
        Preset(
            name="cpu-strong",
            summary="strong scaling on CPU: fixed lengths 512 and 1024, P = 1, 2, 4",
            scaling="strong",
            degrees=(2, 4),
            seq_lengths=(512, 1024),
            model=_CPU_MODEL,
            train={
                **_SMALL_TRAIN,
                "global-batch-size": 4,
                "micro-batch-size": 1,
                "steps": 6,
                "dist-timeout": 300,
            },
            modes=("lss", "nvidia-sp", "ulysses"),
            serial_at_scale=True,
            repeats=2,
            timeout_s=300.0,
            memory_budget_bytes=1 * GiB,
        ),
        Preset(
            name="cpu-weak",
            summary="weak scaling on CPU: l = l0 x N, l0 in {128, 256}, P = 1, 2, 4",
            scaling="weak",
            degrees=(2, 4),
            seq_lengths=(128, 256),
            model=_CPU_MODEL,
            train={
                **_SMALL_TRAIN,
                "global-batch-size": 4,
                "micro-batch-size": 1,
                "steps": 6,
                "dist-timeout": 300,
            },
            modes=("lss", "nvidia-sp", "ulysses"),
            repeats=2,
            timeout_s=300.0,
            memory_budget_bytes=1 * GiB,
        ),
        Preset(
            name="cpu-options",
            summary="options beyond the paper vs plain LSS: zigzag, chunked gathers, Ulysses, "
            "ZeRO-1/2; N = 4, l = 1024, ~2.5 min on 2 CPU cores",
            scaling="strong",
            degrees=(4,),
            seq_lengths=(1024,),
            model={
                "num-layers": 2,
                "hidden-size": 256,
                "num-heads": 8,
                "num-kv-heads": 4,
                "ffn-hidden-size": 256,
                "vocab-size": 256,
                "position-embedding": "rope",
            },
            train={**_SMALL_TRAIN, "global-batch-size": 2, "micro-batch-size": 1, "steps": 3},
            modes=_OPTION_VARIANTS,
            timeout_s=120.0,
            memory_budget_bytes=64 * MiB,
            notes="Causal GQA (8 heads, 4 key/value heads: N = 4 divides both, as Ulysses and "
            "nvidia-sp need), RoPE so that ZeRO's optimizer state is exactly comparable with "
            "plain LSS (a learned table is replicated whole under ZeRO, docs/zero.md), "
            "2 micro-batches per step. The gathered K/V (l h_kv d = 1024 x 128) is large enough "
            "that chunking it lowers the step's transient peak; at E 64, l 512 it did not. "
            "Every variant is exact against the serial reference.",
        ),
        Preset(
            name="cpu-kernels",
            summary="like for like: serial, lss, nvidia-sp, ulysses x {flash, dense} x recompute "
            "{none, selective}; MHA, N = 4, l = 1024: 16 runs",
            scaling="strong",
            degrees=(4,),
            seq_lengths=(1024,),
            model={**_KERNELS_MODEL, "num-kv-heads": 8},
            train={**_SMALL_TRAIN, "global-batch-size": 2, "micro-batch-size": 1, "steps": 3},
            modes=("lss", "nvidia-sp", "ulysses"),
            kernels=("flash", "dense"),
            recomputes=("none", "selective"),
            timeout_s=300.0,
            memory_budget_bytes=256 * MiB,
            notes="The same attention kernel, recompute and precision in every mode, so the "
            "table separates the kernel effect (flash vs dense, in each mode) from the parallel "
            "scheme (modes at one setting). Multi-head attention (8 heads, 8 key/value heads), "
            "causal, learned positions, fp32, 2 micro-batches per step. Ratios and efficiencies "
            "only between runs of the same setting.",
        ),
        Preset(
            name="cpu-kernels-gqa",
            summary="cpu-kernels with GQA 4:1 (8 heads, 2 key/value heads) at N = 2: 16 runs",
            scaling="strong",
            degrees=(2,),
            seq_lengths=(1024,),
            model={**_KERNELS_MODEL, "num-kv-heads": 2},
            train={**_SMALL_TRAIN, "global-batch-size": 2, "micro-batch-size": 1, "steps": 3},
            modes=("lss", "nvidia-sp", "ulysses"),
            kernels=("flash", "dense"),
            recomputes=("none", "selective"),
            timeout_s=300.0,
            memory_budget_bytes=256 * MiB,
            notes="As cpu-kernels, with grouped-query attention 4:1, where LSS gathers a quarter "
            "of the K/V heads; N = 2 so that nvidia-sp and Ulysses can split the 2 key/value "
            "heads.",
        ),
        Preset(
            name="cpu-equal-ranks",
            summary="the paper's mechanism on P = 4 ranks: a 2-head model caps nvidia-sp at t = 2, "
            "LSS spreads one sequence over all 4; every mode at every legal layout: 6 runs",
            scaling="strong",
            degrees=(2, 4),
            ranks=4,
            seq_lengths=(2048,),
            model={
                "num-layers": 2,
                "hidden-size": 128,
                "num-heads": 2,
                "ffn-hidden-size": 512,
                "vocab-size": 256,
                "position-embedding": "learned",
            },
            train={
                **_SMALL_TRAIN,
                "global-batch-size": 4,
                "micro-batch-size": 1,
                "steps": 5,
                "dist-timeout": 300,
            },
            modes=("lss", "nvidia-sp", "ulysses"),
            serial_at_scale=True,
            timeout_s=300.0,
            memory_budget_bytes=256 * MiB,
            notes="Equal ranks, not equal degree: the same P = 4, global batch (4 sequences), "
            "l, model, flash kernel, no recompute and fp32 for every run; each mode at each "
            "layout the trainer accepts (lss N = 4 x D = 1 and N = 2 x D = 2; nvidia-sp "
            "t = 2 x D = 2, its t = 4 refused as 4 does not divide the 2 heads; ulysses "
            "N = 2 x D = 2; serial D = 4). best_layouts.csv names each mode's fastest layout and "
            "its step time, tokens/s and saved bytes per rank against nvidia-sp's best.",
        ),
        Preset(
            name="paper-enwik8-144gpu",
            summary="cluster: LSS vs NVIDIA SP on up to 144 GPUs (24 Summit nodes), enwik8",
            scaling="strong",
            degrees=(6,),
            data_parallel=(1, 4, 24),
            seq_lengths=(3072, 6144, 12288),
            model=_PAPER_144_MODEL,
            train={**_PAPER_TRAIN, "steps": 50, "dist-timeout": 1800},
            timeout_s=3600.0,
            memory_budget_bytes=16 * GiB,
            cluster=True,
            notes="N = 6 (one sequence group per 6-GPU node) x D = 1, 4, 24: P = 6, 24, 144. "
            "The vocabulary is padded to 768 so nvidia-sp can split it 6 ways (same model in "
            "every mode). Peak bytes per GPU in the cost model (fp32; weights, gradients, AdamW, "
            "saved activations and one layer's attention-backward transient, `analysis."
            "costmodel.paper.summit_layout(...)['peak_bytes']`) at l = 3,072 / 6,144 / 12,288: "
            "with this preset's flash kernel nvidia-sp 0.6 / 0.9 / 1.6 GB and the 1-GPU serial "
            "references 3.3 / 5.2 / 9.0 GB, so every run fits a 16 GB V100. With "
            "--attention-kernel dense (probabilities [h/N, l, l] and the causal mask [l, l] "
            "saved per layer: 0.34 GB for nvidia-sp at 6,144) nvidia-sp needs 1.8 / 5.6 / 20.4 "
            "GB and serial 9.7 / 31 / 112 GB: the serial references beyond 3,072 and nvidia-sp "
            "at 12,288 run out of memory, which is itself the memory result. The equal-ranks "
            "series is its own preset, paper-enwik8-144gpu-equal-ranks.",
        ),
        Preset(
            name="paper-enwik8-144gpu-equal-ranks",
            summary="cluster: equal ranks on 144 GPUs: LSS N in {6, 24, 144} vs NVIDIA SP "
            "t in {6, 12}, l 6,912, flash and dense",
            scaling="strong",
            degrees=(),
            seq_lengths=(6912,),
            model=_PAPER_144_MODEL,
            train={**_PAPER_TRAIN, "steps": 50, "dist-timeout": 1800},
            modes=PARALLEL_MODES,
            layouts=(
                ("lss", 6, 24),
                ("lss", 24, 6),
                ("lss", 144, 1),
                ("nvidia-sp", 6, 24),
                ("nvidia-sp", 12, 12),
            ),
            kernels=("flash", "dense"),
            timeout_s=3600.0,
            memory_budget_bytes=16 * GiB,
            cluster=True,
            notes="The mechanism behind the paper's 144-GPU claim (issue 13): NVIDIA SP's "
            "degree is capped by the 12 heads (t = 6 inside a Summit node, 12 across two), LSS "
            "spreads a sequence over up to all 144 GPUs. P = 144 for every layout, D = 144 / N; "
            "l = 6,912 = 144 x 48 (N = 144 must divide it); 24 sequences per step in every "
            "layout (equal tokens per step; LSS at N = 144 runs them as 24 micro-batches, so "
            "its time per micro-batch is the one-sequence-per-iteration reading). Flash and "
            "dense kernels, the same in every mode (the modern and paper-2023 assumption sets "
            "of `python -m analysis.costmodel --preset summit-paper`; the trainer has no fp16, "
            "so fp32 here). Cost-model peak bytes per GPU (fp32, flash / dense): lss N 6 2.6 / "
            "8.0 GB, N 24 2.1 / 3.5, N 144 2.0 / 2.2; nvidia-sp t 6 1.0 / 6.9, t 12 0.6 / 3.8: "
            "all fit 16 GB. The 1-GPU serial reference needs 5.7 GB (flash) and 38 GB (dense: "
            "out of memory).",
        ),
        Preset(
            name="paper-enwik8-3456gpu",
            summary="cluster: weak scaling to l = 50,112 on 3,456 GPUs (348 tokens per GPU)",
            scaling="weak",
            degrees=(2, 4, 8, 24, 72, 144),
            data_parallel=(24,),
            seq_lengths=(348,),
            model={
                "num-layers": 12,
                "hidden-size": 512,
                "num-heads": 8,
                "ffn-hidden-size": 2048,
                "vocab-size": 256,
                "position-embedding": "learned",
            },
            train={**_PAPER_TRAIN, "steps": 30, "dist-timeout": 3600},
            timeout_s=7200.0,
            memory_budget_bytes=16 * GiB,
            cluster=True,
            notes="D = 24 data replicas; N = 2 ... 144 gives P = 48 ... 3,456 and "
            "l = 696 ... 50,112. The reference is serial with D = 24 at l0 = 348 (24 GPUs). "
            "nvidia-sp runs only where N divides the 8 heads (N = 2, 4, 8).",
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def _flags(
    preset: Preset,
    label: str,
    n: int,
    d: int,
    length: int,
    setting: tuple[str, str] = ("flash", "none"),
) -> dict[str, object]:
    variant = get_variant(label)
    flags: dict[str, object] = dict(
        mode=variant.mode, **{"seq-parallel": n, "data-parallel": d, "seq-length": length}
    )
    flags.update(preset.model)
    flags.update(preset.train)
    flags.update(variant.flags)
    kernel, recompute = setting
    if (kernel, recompute) != ("flash", "none"):  # the trainer's defaults stay implicit
        flags.update({"attention-kernel": kernel, "recompute": recompute})
    return flags


def _run(
    preset: Preset,
    label: str,
    n: int,
    d: int,
    length: int,
    repeat: int,
    role: str,
    setting: tuple[str, str] = ("flash", "none"),
):
    variant = get_variant(label)
    return RunSpec(
        variant.mode,
        n,
        d,
        length,
        repeat,
        role,
        _flags(preset, label, n, d, length, setting),
        "" if label == variant.mode else label,
    )


def trainer_problem(run: RunSpec, data_elsewhere: bool = False) -> str | None:
    """The trainer's own verdict on `run` (None when it would start), without launching it.

    `data_elsewhere`: the data file lives on a cluster, so problems with ``--data-path`` here
    (typically: no such file) are not the run's.
    """
    known = trainer_flags()
    missing = [f"--{k}" for k in run.flags if f"--{k}" not in known]
    if missing:
        return f"this trainer has no {', '.join(missing)} (variant {run.label})"
    try:
        cfg = run_config(run.trainer_args("unused"), run.world_size)
    except ConfigError as e:
        return str(e)
    return "; ".join(problems(cfg, data_elsewhere)) or None


def grid_points(preset: Preset) -> list[tuple[str, int, int, int]]:
    """(role, N, D, l) in run order: each reference before the grid points that use it."""
    points: list[tuple[str, int, int, int]] = []
    if preset.layouts:
        for length in preset.seq_lengths:
            points.append(("reference", 1, 1, length))
            for n, d in dict.fromkeys((n, d) for _, n, d in preset.layouts):
                points.append(("grid", n, d, length))
        return points
    if preset.ranks is not None:  # equal ranks: P fixed, every N x D = P
        for length in preset.seq_lengths:
            points.append(("reference", 1, 1, length))
            points += [
                ("grid", n, preset.ranks // n, length)
                for n in preset.degrees
                if preset.ranks % n == 0
            ]
        return points
    for l0 in preset.seq_lengths:
        for d in preset.data_parallel:
            if preset.scaling == "weak":
                points.append(("reference", 1, d, l0))
                points += [("grid", n, d, l0 * n) for n in preset.degrees]
            else:
                ref = ("reference", 1, 1, l0)
                if ref not in points:
                    points.append(ref)
                points += [("grid", n, d, l0) for n in preset.degrees]
    return points


def make_plan(preset: Preset, repeats: int | None = None, seed: int = 0) -> Plan:
    """Every run of `preset`, in launch order: `repeats` rounds (default the preset's own), each
    round every configuration once, in an order shuffled by ``random.Random(f"{seed}:{round}")``
    (so a plan is reproducible from its seed, which plan.json records). A run the trainer would
    reject is left out and listed in `Plan.skipped`."""
    repeats = preset.repeats if repeats is None else repeats
    skipped: list[tuple[str, str]] = []
    settings = [(k, r) for k in preset.kernels for r in preset.recomputes]
    planned: set[tuple] = set()
    configs: list[tuple] = []
    for role, n, d, length in grid_points(preset):
        if role == "reference":
            specs = [("serial", 1, d)]
        else:
            specs = [
                (m, n, d) for m in preset.modes if not preset.layouts or (m, n, d) in preset.layouts
            ]
            if preset.serial_at_scale:
                specs.append(("serial", 1, n * d))
        specs = [(*spec, setting) for setting in settings for spec in specs]
        specs = [s for s in specs if (s, length) not in planned]  # serial at P: once per l
        planned.update((s, length) for s in specs)
        for label, sn, sd, setting in specs:
            spec = _run(preset, label, sn, sd, length, 0, role, setting)
            problem = trainer_problem(spec, data_elsewhere=preset.cluster)
            if problem is None:
                configs.append((label, sn, sd, length, role, setting))
            else:
                skipped.append((spec.config_id, problem))
    runs: list[RunSpec] = []
    for r in range(repeats):
        order = list(configs)
        random.Random(f"{seed}:{r}").shuffle(order)
        for label, sn, sd, length, role, setting in order:
            runs.append(_run(preset, label, sn, sd, length, r, role, setting))
    ids = tuple(_run(preset, c[0], c[1], c[2], c[3], 0, c[4], c[5]).config_id for c in configs)
    return Plan(preset, tuple(runs), tuple(skipped), seed, repeats, ids)
