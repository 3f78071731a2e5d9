"""Validated, frozen configuration for one training run.

Three dataclasses, one per concern, and `RunConfig` that holds them:

* `ModelConfig`    the GPT model (identical for every mode, so runs are comparable);
* `ParallelConfig` the layout of the P = N x D ranks (N sequence segments, D data replicas);
* `TrainConfig`    batch, steps, optimizer, data and output.

`RunConfig.validate()` checks everything that can be checked without torch or a process group
and raises `ConfigError` naming every offending value at once. This module imports nothing
heavy, so a bad command line fails within a fraction of a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .data import DATASETS, LAYOUTS

MODES = ("serial", "lss", "nvidia-sp", "ulysses")
"""Modes the trainer knows. `serial` is plain data parallelism (N = 1) with Megatron's stock
attention; `lss` is LSS sequence parallelism over N segments; `nvidia-sp` is the baseline,
Megatron tensor parallelism of degree N with `sequence_parallel=True` (baselines/nvidia_sp.py);
`ulysses` is DeepSpeed-Ulysses, all-to-all over heads on the same N segments as LSS
(baselines/ulysses.py)."""

POSITION_EMBEDDINGS = ("learned", "rope")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("fp32", "bf16")
ATTENTION_KERNELS = ("flash", "dense")
"""`flash`: a memory-efficient kernel in every mode (nothing quadratic in l is saved); `dense`:
scores materialised and probabilities saved in every mode (Megatron's `DotProductAttention` for
serial and nvidia-sp). Same kernel family in every mode, so modes compare like for like."""
RECOMPUTE = ("none", "selective", "full")
"""Megatron's activation recompute (`TransformerConfig.recompute_granularity`): `selective`
recomputes the core attention in backward, `full` every transformer layer (uniform, 1 layer)."""
LR_SCHEDULES = ("constant", "cosine")
ZERO_STAGES = (0, 1, 2)


class ConfigError(ValueError):
    """A configuration that cannot run. The message names every offending value."""


@dataclass(frozen=True)
class ModelConfig:
    """The GPT model. Every field is the same for every mode and layout."""

    num_layers: int = 2
    """Transformer layers L."""
    hidden_size: int = 64
    """Hidden size E."""
    num_heads: int = 4
    """Attention (query) heads h; head dim d = E / h."""
    num_kv_heads: int | None = None
    """Key/value heads h_kv (GQA/MQA); defaults to `num_heads` (multi-head attention)."""
    ffn_hidden_size: int | None = None
    """MLP hidden size; defaults to 4 E."""
    seq_length: int = 256
    """Sequence length l (tokens per sequence, after the one-token label shift)."""
    vocab_size: int = 256
    """Vocabulary size V of the data (256 = bytes)."""
    make_vocab_size_divisible_by: int = 1
    """Pad the model's vocabulary (embedding rows, logits) up to a multiple of this; the padding
    rows never occur as tokens. Unlike Megatron-LM this does NOT scale with the tensor-parallel
    size, so every mode and layout builds the same model (e.g. 768 lets nvidia-sp run at N = 6
    with a 256-byte vocabulary)."""
    position_embedding: str = "learned"
    """`learned`: absolute table, sequence-distributed in LSS; `rope`: rotary, global positions."""
    causal: bool = True
    """Causal (decoder) attention; False attends to every token."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.make_vocab_size_divisible_by)
        return -(-self.vocab_size // m) * m

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def problems(self) -> list[str]:
        p = []
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "seq_length",
            "vocab_size",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            p.append(f"--num-kv-heads must be >= 1, got {self.num_kv_heads}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            p.append(f"--ffn-hidden-size must be >= 1, got {self.ffn_hidden_size}")
        if p:
            return p
        if self.hidden_size % self.num_heads:
            p.append(
                f"--hidden-size {self.hidden_size} is not divisible by --num-heads {self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            p.append(
                f"--num-heads {self.num_heads} is not divisible by --num-kv-heads {self.kv_heads}"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            p.append(
                f"--position-embedding {self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}"
            )
        return p


@dataclass(frozen=True)
class ParallelConfig:
    """The rank grid: P = N x D. Rank order follows Megatron (`tp-cp-ep-dp-pp`), so the N ranks
    of a sequence group are consecutive (inside a node) and the data groups are strided."""

    mode: str = "lss"
    """One of `MODES`."""
    world_size: int = 1
    """P, the number of processes (from the launcher)."""
    seq_parallel: int = 1
    """N: the sequence-parallel degree. LSS: segments per sequence = size of the sequence group
    (Megatron's context-parallel group). nvidia-sp: the tensor-parallel size."""
    data_parallel: int | None = None
    """D: data-parallel replicas; defaults to P / N."""
    lss_layout: str = "contiguous"
    """LSS segments: `contiguous` (rank n holds [n l/N, (n+1) l/N), as in the paper) or `zigzag`
    (2N chunks, rank n holds chunks n and 2N-1-n: equal causal attention work on every rank)."""
    kv_gather_chunks: int = 1
    """LSS: gather K/V in this many head chunks, double-buffered (the gather of chunk c+1 runs
    while chunk c is attended); bounds the transient K/V buffers. Same result and bytes."""
    dist_timeout_s: float = 300.0
    """Timeout of every collective (seconds). A hung collective raises instead of hanging."""

    @property
    def dp(self) -> int:
        if self.data_parallel is not None:
            return self.data_parallel
        return self.world_size // self.seq_parallel if self.seq_parallel > 0 else 0

    def problems(self) -> list[str]:
        p = []
        if self.mode not in MODES:
            p.append(f"--mode {self.mode!r} is not one of {MODES}")
        if self.seq_parallel < 1:
            p.append(f"--seq-parallel must be >= 1, got {self.seq_parallel}")
            return p
        if self.data_parallel is not None and self.data_parallel < 1:
            p.append(f"--data-parallel must be >= 1, got {self.data_parallel}")
            return p
        if self.mode == "serial" and self.seq_parallel != 1:
            p.append(
                f"--mode serial means no sequence parallelism (N = 1), got --seq-parallel "
                f"{self.seq_parallel}; use --mode lss for N > 1"
            )
        if self.seq_parallel * self.dp != self.world_size:
            p.append(
                f"P = {self.world_size} processes must equal --seq-parallel N x --data-parallel D = "
                f"{self.seq_parallel} x {self.dp} = {self.seq_parallel * self.dp}"
            )
        if self.lss_layout not in LAYOUTS:
            p.append(f"--lss-layout {self.lss_layout!r} is not one of {LAYOUTS}")
        elif self.lss_layout != "contiguous" and self.mode != "lss":
            p.append(f"--lss-layout {self.lss_layout} applies to --mode lss only, not {self.mode}")
        if self.kv_gather_chunks < 1:
            p.append(f"--kv-gather-chunks must be >= 1, got {self.kv_gather_chunks}")
        elif self.kv_gather_chunks > 1 and self.mode != "lss":
            p.append(f"--kv-gather-chunks applies to --mode lss only, not {self.mode}")
        if self.dist_timeout_s <= 0:
            p.append(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout_s}")
        return p


@dataclass(frozen=True)
class TrainConfig:
    """Batch, schedule, optimizer, data and output of a run."""

    global_batch_size: int = 8
    """G: sequences per optimizer step, the same for every mode and layout."""
    micro_batch_size: int | None = None
    """B: sequences per forward/backward on one rank; defaults to G / D (no accumulation)."""
    steps: int = 10
    """Optimizer steps."""
    optimizer: str = "adamw"
    lr: float = 1e-3
    seed: int = 1234
    """Seeds the initial weights and the synthetic data; nothing else does."""
    dtype: str = "fp32"
    """`fp32`, or `bf16`: Megatron's mixed precision (bf16 parameters and activations, fp32 master
    weights, optimizer state and gradient reduction; lss_megatron/precision.py)."""
    attention_kernel: str = "flash"
    """One of `ATTENTION_KERNELS`, the same in every mode."""
    recompute: str = "none"
    """One of `RECOMPUTE`: Megatron's own activation recompute, the same in every mode."""
    data: str = "synthetic"
    out: str = "runs/latest"
    """Output folder: metrics.jsonl and config.json."""
    log_interval: int = 1
    """Log a line every this many steps (rank 0)."""
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    """`constant` or `cosine` (decay from lr to min_lr at the last of `steps`), after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    min_lr: float | None = None
    """Final learning rate of the cosine schedule; defaults to lr / 10."""
    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm (every parameter counted once); 0 disables."""
    save: str | None = None
    """Checkpoint folder (layout-independent, atomic); None: no checkpoints."""
    save_interval: int = 0
    """Save every this many steps (and at the end) when `save` is set; 0: only at the end."""
    load: str | None = None
    """Resume from the newest checkpoint in this folder."""
    stop_after: int | None = None
    """End after this step as if interrupted there; schedules stay planned over `steps`."""
    skip_nonfinite: bool = False
    """On a non-finite loss, skip the step (counted in the metrics) instead of stopping."""
    data_path: str | None = None
    """The data file (enwik8)."""
    eval_interval: int = 0
    """Evaluate on the validation split every this many steps (and at the end); 0: never."""
    eval_steps: int = 2
    """Batches of G sequences per evaluation."""
    progress: str = "auto"
    """Progress bar on rank 0: `on`, `off`, or `auto` (on when stderr is a terminal)."""
    fault: str | None = None
    """Testing aid: `crash:RANK:STEP`, `hang:RANK:STEP` or `nan:RANK:STEP` injects that failure."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage over all ranks of the gradient group (lss_megatron/zero.py): 0 off
    (the trainer's own optimizer step), 1 optimizer state sharded, 2 also gradients. Needs
    DeepSpeed; no checkpoints (docs/zero.md)."""

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def _zero_problems(self) -> list[str]:
        if self.zero_stage == 0:
            return []
        if self.zero_stage not in ZERO_STAGES:
            return [f"--zero-stage {self.zero_stage} is not one of {ZERO_STAGES}"]
        p = [f"{flag} is not supported with --zero-stage {self.zero_stage}: DeepSpeed keeps "
             "optimizer state in flat per-rank partitions, not the canonical layout-independent "
             "checkpoint (docs/zero.md); use --zero-stage 0 to checkpoint"
             for flag, value in (("--save", self.save), ("--load", self.load)) if value]  # fmt: skip
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            p.append(f"--zero-stage {self.zero_stage} needs DeepSpeed: pip install "
                     "'lss-megatron[deepspeed]' (deepspeed==0.19.8, DS_BUILD_OPS=0)")  # fmt: skip
        return p

    def problems(self, dp: int) -> list[str]:
        p = []
        for name in ("global_batch_size", "steps"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            p.append(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.lr <= 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"--optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.dtype not in DTYPES:
            p.append(f"--dtype {self.dtype!r} is not one of {DTYPES}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            p.append(f"--attention-kernel {self.attention_kernel!r} is not one of "
                     f"{ATTENTION_KERNELS}")  # fmt: skip
        if self.recompute not in RECOMPUTE:
            p.append(f"--recompute {self.recompute!r} is not one of {RECOMPUTE}")
        if self.data not in DATASETS:
            p.append(f"--data {self.data!r} is not one of {DATASETS}")
        if self.lr_schedule not in LR_SCHEDULES:
            p.append(f"--lr-schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        for name in ("warmup_steps", "save_interval", "eval_interval", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                p.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.eval_steps < 1:
            p.append(f"--eval-steps must be >= 1, got {self.eval_steps}")
        if self.warmup_steps >= max(self.steps, 1) and self.warmup_steps > 0:
            p.append(f"--warmup-steps {self.warmup_steps} must be < --steps {self.steps}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            p.append(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            p.append(f"--stop-after {self.stop_after} must be in [1, --steps {self.steps}]")
        if self.save_interval and not self.save:
            p.append(f"--save-interval {self.save_interval} needs --save DIR")
        if self.progress not in ("auto", "on", "off"):
            p.append(f"--progress {self.progress!r} is not one of ('auto', 'on', 'off')")
        if self.fault is not None:
            parts = self.fault.split(":")
            if (
                len(parts) != 3
                or parts[0] not in ("crash", "hang", "nan")
                or not all(x.isdigit() for x in parts[1:])
            ):
                p.append(f"--fault {self.fault!r} must be KIND:RANK:STEP, KIND in crash|hang|nan")
        p += self._zero_problems()
        if p or dp < 1:
            return p
        if self.global_batch_size % dp:
            p.append(
                f"--global-batch-size {self.global_batch_size} is not divisible by the "
                f"data-parallel size D = {dp}"
            )
        elif (
            self.micro_batch_size is not None
            and (self.global_batch_size // dp) % self.micro_batch_size
        ):
            p.append(
                f"--micro-batch-size {self.micro_batch_size} does not divide the per-replica batch "
                f"G / D = {self.global_batch_size} / {dp} = {self.global_batch_size // dp}"
            )
        return p


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch_size or self.train.global_batch_size // self.parallel.dp

    @property
    def num_micro_batches(self) -> int:
        return self.train.global_batch_size // (self.parallel.dp * self.micro_batch)

    def validate(self) -> RunConfig:
        """Raise `ConfigError` listing every problem; return self when the run is possible."""
        p = self.model.problems() + self.parallel.problems()
        if not p:
            from .modes import mode_problems

            p += mode_problems(self.parallel.mode, self.model, self.parallel.seq_parallel)
        if not p:
            n = self.parallel.seq_parallel
            if self.model.seq_length % n:
                p.append(
                    f"--seq-length {self.model.seq_length} is not divisible by --seq-parallel {n}"
                )
            if self.model.kv_heads % self.parallel.kv_gather_chunks:
                p.append(
                    f"--kv-gather-chunks {self.parallel.kv_gather_chunks} does not divide the "
                    f"key/value heads {self.model.kv_heads}"
                )
            if (not self.model.seq_length % n and self.parallel.lss_layout == "zigzag"
                    and self.model.seq_length % (2 * n)):  # fmt: skip
                p.append(
                    f"--lss-layout zigzag needs --seq-length {self.model.seq_length} divisible by "
                    f"2N = {2 * n}"
                )
        p += self.train.problems(self.parallel.dp if not self.parallel.problems() else 0)
        if self.train.data in DATASETS:
            from .data import check_data_config

            p += check_data_config(self.train.data, self.train.data_path, self.model.vocab_size)
        if p:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))
        return self

    def to_dict(self) -> dict:
        """The effective configuration, with every derived value filled in."""
        d = dataclasses.asdict(self)
        d["model"].update(
            num_kv_heads=self.model.kv_heads,
            ffn_hidden_size=self.model.ffn_size,
            head_dim=self.model.head_dim,
            padded_vocab_size=self.model.padded_vocab_size,
        )
        d["parallel"]["data_parallel"] = self.parallel.dp
        d["train"]["micro_batch_size"] = self.micro_batch
        d["train"]["num_micro_batches"] = self.num_micro_batches
        d["derived"] = {
            "segment_length": self.model.seq_length // self.parallel.seq_parallel,
            "tokens_per_step": self.train.global_batch_size * self.model.seq_length,
        }
        return d
