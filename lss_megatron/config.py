"""Validated, frozen configuration for one training run, and every rule a run must obey.

Three dataclasses, one per concern, and `RunConfig` that holds them:

* `ModelConfig`    the GPT model (identical for every mode, so runs are comparable);
* `ParallelConfig` the layout of the P = N x D ranks (N sequence segments, D data replicas);
* `TrainConfig`    batch, steps, optimizer, data and output.

Each field carries its command-line flag in its metadata (`_opt`: help, choices, flag name), so
the trainer's CLI is derived from these classes (train.py) and each option is described once.

What differs between the parallel modes (which Megatron group has the degree N, which models and
options a mode refuses) each mode declares in its own module (`lss_megatron.modes`, the
registry); this module asks it. `RunConfig.validate()` checks everything that can be
checked without torch or a process group and raises `ConfigError` naming every offending value
at once. This module imports nothing heavy, so a bad command line fails within a fraction of a
second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .data import DATASETS, check_data_config
from .layout import LAYOUTS
from .modes import MODES, find_mode, get_mode, modes_accepting
from .modes.base import Mode, tensor_parallel_problems

__all__ = ["MODES", "tensor_parallel_problems"]  # the registry's, re-exported for callers

POSITION_EMBEDDINGS = ("learned", "rope")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("fp32", "bf16", "fp16")
LOSS_SCALE_FIELDS = (
    "loss_scale",
    "initial_loss_scale",
    "min_loss_scale",
    "loss_scale_window",
    "hysteresis",
)
"""--fp16's loss-scaling options (Megatron-LM's names and defaults)."""
ATTENTION_KERNELS = ("flash", "dense")
"""`flash`: a memory-efficient kernel in every mode (nothing quadratic in l is saved); `dense`:
scores materialised and probabilities saved in every mode (Megatron's `DotProductAttention` for
serial and nvidia-sp). Same kernel family in every mode, so modes compare like for like."""
SAVE_KV = ("gathered", "local")
"""LSS: what autograd keeps of K/V (`lss.kv_gather.SAVE_KV`, the same names)."""
KV_GATHERS = ("fused", "separate")
"""LSS: [K|V] in one collective each way (the paper) or K and V in two (Megatron's all_gather CP)."""
RECOMPUTE = ("none", "selective", "full")
"""Megatron's activation recompute (`TransformerConfig.recompute_granularity`): `selective`
recomputes the core attention in backward, `full` every transformer layer (uniform, 1 layer)."""
LR_SCHEDULES = ("constant", "cosine")
ZERO_STAGES = (0, 1, 2)
PROGRESS = ("auto", "on", "off")
FAULT_KINDS = ("crash", "hang", "nan")
MAX_SEED = 2**32 - 1
"""Seeds feed numpy's and torch's generators; numpy's take 32-bit values."""
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
MAX_STEPS, MAX_EVAL_STEPS, MAX_MICRO_BATCHES = 10**9, 10**6, 2**16
"""Upper bounds that only a typo reaches: a run that would never finish is refused up front."""
MIN_DIST_TIMEOUT_S = 1.0
"""A collective timeout under a second fails the first all-reduce of any real run."""


class ConfigError(ValueError):
    """A configuration that cannot run. The message names every offending value."""


def output_dir_problems(flag: str, path: str) -> list[str]:
    """Why folder `path` cannot be created or written (empty when it can): it, or the nearest
    part of it that exists, must be a writable folder."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return [f"{flag} {path}: {here} is not a folder"]
    if not os.access(here, os.W_OK | os.X_OK):
        return [f"{flag} {path}: {here} is not writable"]
    return []


def _opt(
    default,
    help: str,
    *,
    flag: str | None = None,
    choices=None,
    metavar=None,
    section: str | None = None,
    cli_default=dataclasses.MISSING,
    hidden: bool = False,
    aliases: tuple[str, ...] = (),
):
    """A config field that is also a command-line option (train.py builds the parser from it).

    `flag` defaults to ``--field-name``; a bool field is a switch (``--no-x`` for a field that
    defaults to True); `cli_default` is the option's default when it differs from the field's
    (None: derived when the configuration is made); `hidden` keeps a testing aid out of --help;
    `aliases` are further flags of the same meaning and values (Megatron-LM's or DeepSpeed's
    names, megatron_args.py)."""
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "metavar": metavar,
        "section": section,
        "cli_default": cli_default,
        "hidden": hidden,
        "aliases": aliases,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """The GPT model. Every field is the same for every mode and layout."""

    num_layers: int = _opt(2, "transformer layers L")
    hidden_size: int = _opt(64, "hidden size E")
    num_heads: int = _opt(
        4, "attention (query) heads h; head dim d = E / h", aliases=("--num-attention-heads",)
    )
    num_kv_heads: int | None = _opt(
        None,
        "key/value heads h_kv (GQA/MQA); default: --num-heads (multi-head attention)",
        aliases=("--num-query-groups",),
    )
    ffn_hidden_size: int | None = _opt(None, "MLP hidden size; default 4 E")
    seq_length: int = _opt(
        256, "sequence length l (tokens per sequence, after the one-token label shift)"
    )
    vocab_size: int = _opt(256, "vocabulary size V of the data (256 = bytes)")
    make_vocab_size_divisible_by: int = _opt(
        1,
        "pad the model vocabulary (embedding rows, logits) to a multiple of this, the same in "
        "every mode; the padding rows never occur as tokens. Unlike Megatron-LM this does not "
        "scale with the tensor-parallel size, so every mode and layout builds the same model "
        "(e.g. 768 lets nvidia-sp run at N = 6 with a 256-byte vocabulary)",
    )
    position_embedding: str = _opt(
        "learned",
        "learned: absolute table, sequence-distributed in LSS; rope: rotary, global positions",
        choices=POSITION_EMBEDDINGS,
    )
    causal: bool = _opt(True, "bidirectional attention (attend to every token)", flag="--no-causal")

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
        elif self.position_embedding == "rope" and self.head_dim % 2:
            p.append(
                f"--position-embedding rope needs an even head dimension (rotary embeddings turn "
                f"pairs of channels), got d = --hidden-size {self.hidden_size} / --num-heads "
                f"{self.num_heads} = {self.head_dim}"
            )
        return p


def parse_fault(spec: str) -> tuple[str, int, int] | None:
    """``KIND:RANK:STEP`` -> (kind, rank, step); None when `spec` is not of that form."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in FAULT_KINDS or not all(x.isdigit() for x in parts[1:]):
        return None
    return parts[0], int(parts[1]), int(parts[2])


@dataclass(frozen=True)
class ParallelConfig:
    """The rank grid: P = N x T x D (T = 1 unless ``--tensor-parallel``). Rank order follows
    Megatron (`tp-cp-ep-dp-pp`), so the T ranks of a tensor-parallel group are consecutive, then
    the N x T ranks of a sequence group (inside a node), and the data groups are strided."""

    mode: str = _opt("lss", "parallel mode (see docs/modes.md)", choices=MODES)
    world_size: int = 1
    """P, the number of processes (from the launcher; not an option)."""
    seq_parallel: int = _opt(
        1,
        "N: the sequence-parallel size (default: P, 1 for serial). LSS and Ulysses: the ranks "
        "one sequence is split over = the size of the sequence group (Megatron's "
        "context-parallel size); nvidia-sp: the tensor-parallel size",
        cli_default=None,
    )
    tensor_parallel: int = _opt(
        1,
        "T (--mode lss): Megatron tensor parallelism with sequence_parallel inside each sequence "
        "rank, P = N x T x D; T must divide the heads, key/value heads, MLP and padded vocabulary",
        metavar="T",
    )
    data_parallel: int | None = _opt(None, "D: data-parallel replicas (default: P / (N T))")
    lss_layout: str = _opt(
        "contiguous",
        "LSS segments: contiguous (rank n holds [n l/N, (n+1) l/N), as in the paper) or zigzag "
        "(2N chunks, rank n holds chunks n and 2N-1-n: causal load balance)",
        choices=LAYOUTS,
    )
    kv_gather_chunks: int = _opt(
        1,
        "LSS: gather K/V in C double-buffered head chunks (the gather of chunk c+1 runs while "
        "chunk c is attended): bounded transient K/V buffers, same result and bytes",
        metavar="C",
    )
    lss_save_kv: str = _opt(
        "gathered",
        "LSS: what autograd keeps of K/V for backward: gathered (the paper: the whole gathered "
        "K/V of every layer) or local (this rank's segment; backward re-gathers it: one more "
        "gather per layer, Megatron's all_gather CP and Llama 3's choice; flash kernel only)",
        choices=SAVE_KV,
    )
    lss_overlap: bool = _opt(
        False,
        "LSS: attend the local blocks while the K/V gather is in flight and merge the remote "
        "ones exactly through the log-sum-exp; in backward, reduce-scatter (and re-gather) "
        "behind compute. Same result and bytes; flash kernel only",
    )
    lss_kv_gather: str = _opt(
        "fused",
        "LSS: fused (one collective of [K|V] each way, the paper) or separate (K and V in two "
        "calls each way, Megatron-Core's all_gather CP): the same bytes",
        choices=KV_GATHERS,
    )
    dist_timeout_s: float = _opt(
        300.0, "seconds before a hung collective fails the job", flag="--dist-timeout"
    )

    @property
    def dp(self) -> int:
        if self.data_parallel is not None:
            return self.data_parallel
        model_parallel = self.seq_parallel * self.tensor_parallel
        return self.world_size // model_parallel if model_parallel > 0 else 0

    @property
    def rules(self) -> Mode:
        """The mode's declaration (`lss_megatron.modes.get_mode`): degrees, limits, options."""
        return get_mode(self.mode)

    @property
    def tensor_parallel_size(self) -> int:
        return self.rules.tensor_parallel(self.seq_parallel, self.tensor_parallel)

    @property
    def sequence_parallel(self) -> bool:
        """Megatron's `sequence_parallel` flag: the mode's, and on with any tensor parallelism."""
        return self.rules.sequence_parallel or self.tensor_parallel_size > 1

    @property
    def context_parallel_size(self) -> int:
        return self.rules.context_parallel(self.seq_parallel)

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
        if self.tensor_parallel < 1:
            p.append(f"--tensor-parallel must be >= 1, got {self.tensor_parallel}")
            return p
        mode = find_mode(self.mode)  # None: unknown, named above
        if mode is not None and self.tensor_parallel > 1 and not mode.composes_with_tp:
            composing = " / ".join(m for m in MODES if get_mode(m).composes_with_tp)
            p.append(
                f"--tensor-parallel {self.tensor_parallel} applies to --mode {composing} only, "
                f"not {self.mode}"
                + (
                    " (its tensor-parallel degree is --seq-parallel N)"
                    if mode.degree_group == "tensor"
                    else ""
                )
            )
        p += mode.degree_problems(self.seq_parallel) if mode is not None else []
        n, t, d = self.seq_parallel, self.tensor_parallel, self.dp
        if n * t * d != self.world_size and t > 1:
            p.append(
                f"P = {self.world_size} processes must equal --seq-parallel N x --tensor-parallel "
                f"T x --data-parallel D = {n} x {t} x {d} = {n * t * d}"
            )
        elif n * d != self.world_size and t == 1:
            p.append(
                f"P = {self.world_size} processes must equal --seq-parallel N x --data-parallel D = "
                f"{self.seq_parallel} x {self.dp} = {self.seq_parallel * self.dp}"
            )
        if self.lss_layout not in LAYOUTS:
            p.append(f"--lss-layout {self.lss_layout!r} is not one of {LAYOUTS}")
        elif self.lss_layout != "contiguous" and mode and "lss_layout" not in mode.options:
            p.append(
                f"--lss-layout {self.lss_layout} applies to --mode "
                f"{' / '.join(modes_accepting('lss_layout'))} only, not {self.mode}"
            )
        if self.kv_gather_chunks < 1:
            p.append(f"--kv-gather-chunks must be >= 1, got {self.kv_gather_chunks}")
        elif self.kv_gather_chunks > 1 and mode and "kv_gather_chunks" not in mode.options:
            p.append(
                f"--kv-gather-chunks applies to --mode "
                f"{' / '.join(modes_accepting('kv_gather_chunks'))} only, not {self.mode}"
            )
        for name, flag, value, choices, default in (
            ("lss_save_kv", "--lss-save-kv", self.lss_save_kv, SAVE_KV, "gathered"),
            ("lss_kv_gather", "--lss-kv-gather", self.lss_kv_gather, KV_GATHERS, "fused"),
            ("lss_overlap", "--lss-overlap", self.lss_overlap, (False, True), False),
        ):
            if value not in choices:
                p.append(f"{flag} {value!r} is not one of {choices}")
            elif value != default and mode and name not in mode.options:
                shown = "" if isinstance(value, bool) else f" {value}"
                p.append(
                    f"{flag}{shown} applies to --mode "
                    f"{' / '.join(modes_accepting(name))} only, not {self.mode}"
                )
        if not MIN_DIST_TIMEOUT_S <= self.dist_timeout_s <= MAX_DIST_TIMEOUT_S:  # NaN fails too
            p.append(
                f"--dist-timeout must be in [{MIN_DIST_TIMEOUT_S:g}, {MAX_DIST_TIMEOUT_S:g}] "
                f"seconds (one week), got {self.dist_timeout_s}"
            )
        return p


_DATA, _OUT = "data", "checkpoints and output"


@dataclass(frozen=True)
class TrainConfig:
    """Batch, schedule, optimizer, data and output of a run."""

    global_batch_size: int = _opt(
        8, "G: sequences per optimizer step, the same for every mode and layout"
    )
    micro_batch_size: int | None = _opt(
        None, "B: sequences per forward/backward on one rank (default: G / D, no accumulation)"
    )
    steps: int = _opt(10, "optimizer steps", aliases=("--train-iters",))
    optimizer: str = _opt("adamw", "the optimizer", choices=OPTIMIZERS)
    lr: float = _opt(1e-3, "peak learning rate")
    seed: int = _opt(1234, "seeds the initial weights and the synthetic data; nothing else does")
    dtype: str = _opt(
        "fp32",
        "bf16: Megatron mixed precision (bf16 parameters and activations, fp32 master "
        "weights, optimizer state and gradient reduction; training/optim.py MasterWeights); "
        "fp16: the same in fp16 with Megatron's loss scaling (dynamic unless --loss-scale; an "
        "overflowing step is skipped on every rank and logged)",
        choices=DTYPES,
    )
    loss_scale: float | None = _opt(
        None,
        "--fp16: a static loss scale (Megatron-LM's --loss-scale); default: dynamic scaling",
    )
    initial_loss_scale: float = _opt(
        2.0**32, "--fp16, dynamic: the first loss scale (Megatron-LM's default 2**32)"
    )
    min_loss_scale: float = _opt(1.0, "--fp16, dynamic: the scale never falls below this")
    loss_scale_window: int = _opt(
        1000, "--fp16, dynamic: double the scale after this many steps without overflow"
    )
    hysteresis: int = _opt(
        2, "--fp16, dynamic: overflowing steps tolerated before the scale is halved"
    )
    attention_kernel: str = _opt(
        "flash",
        "flash: memory-efficient attention in every mode (nothing quadratic saved); "
        "dense: scores materialised and probabilities saved in every mode",
        choices=ATTENTION_KERNELS,
    )
    recompute: str = _opt(
        "none",
        "Megatron activation recompute: selective (core attention) or full (every layer)",
        choices=RECOMPUTE,
    )
    data: str = _opt("synthetic", "the dataset", choices=DATASETS, section=_DATA)
    out: str = _opt(
        "runs/latest",
        "output folder: metrics.jsonl, config.json, summary.json (default: a fresh "
        "runs/<launch date-time>-<mode>, named at the start and the end of the run)",
        cli_default=None,
        metavar="DIR",
        section=_OUT,
    )
    log_interval: int = _opt(1, "log a line every this many steps (rank 0)", section=_OUT)
    weight_decay: float = _opt(0.0, "decoupled weight decay")
    lr_schedule: str = _opt(
        "cosine",
        "constant, or cosine (decay from lr to --min-lr at the last of --steps), after warmup",
        choices=LR_SCHEDULES,
        aliases=("--lr-decay-style",),
    )
    warmup_steps: int = _opt(
        0, "linear warmup from 0 to lr over this many steps", aliases=("--lr-warmup-iters",)
    )
    min_lr: float | None = _opt(None, "final learning rate of the cosine (default lr/10)")
    clip_grad: float = _opt(
        1.0, "clip to this global gradient norm (every parameter counted once); 0 disables"
    )
    save: str | None = _opt(
        None, "checkpoint folder (layout-independent, atomic)", metavar="DIR", section=_OUT
    )
    save_interval: int = _opt(
        0,
        "save every K steps (and at the end) with --save; 0: only at the end",
        metavar="K",
        section=_OUT,
    )
    keep_last: int = _opt(
        0,
        "with --save: after each save keep this run's newest K checkpoints (never the one "
        "'latest' names); 0 keeps all",
        metavar="K",
        section=_OUT,
    )
    load: str | None = _opt(
        None,
        "resume from the newest checkpoint in DIR, or from DIR/step_K itself (any layout or mode)",
        metavar="DIR",
        section=_OUT,
    )
    stop_after: int | None = _opt(
        None,
        "end after step K as if interrupted; schedules still span --steps",
        metavar="K",
        section=_OUT,
    )
    skip_nonfinite: bool = _opt(
        False, "skip a step whose loss is not finite (counted in the metrics) instead of stopping"
    )
    data_path: str | None = _opt(
        None,
        "the data: enwik8: the raw file or .zip; megatron: PREFIX of PREFIX.bin and "
        "PREFIX.idx (python -m lss_megatron.data.make_indexed builds one)",
        section=_DATA,
    )
    reset_position_ids: bool = _opt(
        False,
        "Megatron-LM's: position ids restart at 0 after every --eod-token (learned positions; "
        "Megatron's RoPE ignores position ids)",
        section=_DATA,
    )
    reset_attention_mask: bool = _opt(
        False,
        "Megatron-LM's: attention stays inside each document (no key before the last "
        "--eod-token), exact in every mode (docs/packed.md)",
        section=_DATA,
    )
    eod_mask_loss: bool = _opt(
        False,
        "Megatron-LM's: no loss where the input token is --eod-token (the prediction across a "
        "document boundary)",
        section=_DATA,
    )
    eod_token: int = _opt(
        256,
        "the end-of-document id of the three flags above (make_indexed --append-eod writes 256 "
        "after the 256 byte ids: --vocab-size >= 257)",
        section=_DATA,
    )
    split: str | None = _opt(
        None,
        "Megatron-LM's: train,valid,test weights of the --data megatron documents, e.g. "
        "969,30,1, cut in file order with Megatron-Core's rounding (default: 90,5,5)",
        metavar="W,W,W",
        section=_DATA,
    )
    eval_interval: int = _opt(0, "validate every K steps and at the end (0: never)", section=_DATA)
    eval_steps: int = _opt(
        2,
        "validation batches (of G sequences) per evaluation",
        section=_DATA,
        aliases=("--eval-iters",),
    )
    progress: str = _opt(
        "auto",
        "progress bar on rank 0 (auto: when stderr is a terminal)",
        choices=PROGRESS,
        section=_OUT,
    )
    fault: str | None = _opt(
        None,
        "testing aid: KIND:RANK:STEP (KIND crash, hang or nan) injects that failure",
        hidden=True,
    )
    zero_stage: int = _opt(
        0,
        "DeepSpeed ZeRO over all ranks of the gradient group (training/zero.py): 0 off, 1 shards "
        "optimizer state, 2 also gradients. Needs DeepSpeed; checkpoints reshard to and from "
        "plain runs (docs/zero.md)",
        choices=ZERO_STAGES,
    )
    deepspeed: bool = _opt(
        False,
        "DeepSpeed's switch: the optimizer step runs under deepspeed.initialize (ZeRO stage 1 or "
        "2, from --deepspeed_config's zero_optimization.stage or --zero-stage; docs/zero.md)",
    )
    deepspeed_config: str | None = _opt(
        None,
        "a DeepSpeed config (JSON), read as DeepSpeed reads it: its batch keys are sequences "
        "per step over the data ranks (the sequence group is not counted), its ZeRO stage, "
        "gradient_clipping, optimizer (Adam/AdamW/SGD) and bf16 set the matching options; "
        "sections the trainer cannot run exactly are refused; the rest is merged over the "
        "trainer's ZeRO defaults (docs/zero.md; the effective one is in config.json)",
        metavar="FILE.json",
        aliases=("--deepspeed_config",),
    )
    tensorboard_dir: str | None = _opt(
        None,
        "also write TensorBoard event files (the metrics.jsonl scalars) here (rank 0)",
        metavar="DIR",
        section=_OUT,
    )
    max_consecutive_skips: int = _opt(
        3, "with --skip-nonfinite: stop (exit 3) after K skipped steps in a row", metavar="K"
    )
    overwrite: bool = _opt(
        False,
        "replace another run's outputs in --out and its checkpoints in --save (runs.py)",
        section=_OUT,
    )
    memory_check: bool = _opt(
        True,
        "start even when the per-rank memory estimate exceeds the memory available (estimate.py)",
        flag="--no-memory-check",
        section=_OUT,
    )

    @property
    def packed(self) -> bool:
        """Any of Megatron-LM's document flags (reset positions / attention mask, EOD loss)."""
        return self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss

    @property
    def fractions(self) -> tuple[float, float, float] | None:
        """``--split`` as normalised train, valid, test fractions (None: the default 90/5/5)."""
        if self.split is None:
            return None
        from .data.megatron_indexed import parse_split

        return parse_split(self.split)

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def _zero_problems(self) -> list[str]:
        if self.zero_stage == 0:
            if self.deepspeed_config or self.deepspeed:
                flag = (
                    f"--deepspeed-config {self.deepspeed_config}"
                    if self.deepspeed_config
                    else "--deepspeed"
                )
                return [
                    f"{flag} needs ZeRO stage 1 or 2 (zero_optimization.stage in the DeepSpeed "
                    "config, or --zero-stage): DeepSpeed runs only the ZeRO optimizer step here, "
                    "and stage 0 is the plain trainer's step (drop the DeepSpeed flags)"
                ]
            return []
        if self.zero_stage not in ZERO_STAGES:
            return [f"--zero-stage {self.zero_stage} is not one of {ZERO_STAGES}"]
        p = []
        if importlib.util.find_spec("deepspeed") is None:
            p.append(
                f"--zero-stage {self.zero_stage} needs DeepSpeed: pip install "
                "'lss-megatron[deepspeed]' (deepspeed==0.19.8, DS_BUILD_OPS=0)"
            )
        return p

    def _value_problems(self) -> list[str]:
        p = []
        for name in ("global_batch_size", "steps"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            p.append(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            p.append(f"--lr must be a finite number > 0, got {self.lr}")
        finite = ("weight_decay", "clip_grad") + (("min_lr",) if self.min_lr is not None else ())
        for name in finite:
            if not math.isfinite(getattr(self, name)):
                p.append(f"--{name.replace('_', '-')} must be finite, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            p.append(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        for name in ("log_interval", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for flag, value, allowed in (
            ("--optimizer", self.optimizer, OPTIMIZERS),
            ("--dtype", self.dtype, DTYPES),
            ("--attention-kernel", self.attention_kernel, ATTENTION_KERNELS),
            ("--recompute", self.recompute, RECOMPUTE),
            ("--data", self.data, DATASETS),
            ("--lr-schedule", self.lr_schedule, LR_SCHEDULES),
        ):
            if value not in allowed:
                p.append(f"{flag} {value!r} is not one of {allowed}")
        for name in ("warmup_steps", "save_interval", "eval_interval", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                p.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.eval_steps < 1:
            p.append(f"--eval-steps must be >= 1, got {self.eval_steps}")
        for name, top in (("steps", MAX_STEPS), ("eval_steps", MAX_EVAL_STEPS)):
            if getattr(self, name) > top:  # a typo that would never finish, not a run
                p.append(
                    f"--{name.replace('_', '-')} must be <= {top:,}, got {getattr(self, name):,}"
                )
        return p + self._loss_scale_problems()

    def _loss_scale_problems(self) -> list[str]:
        p = []
        scales = {
            "initial_loss_scale": self.initial_loss_scale,
            "min_loss_scale": self.min_loss_scale,
        }
        if self.loss_scale is not None:
            scales["loss_scale"] = self.loss_scale
        for name, value in scales.items():
            if not (math.isfinite(value) and value > 0):
                p.append(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if not p and self.min_loss_scale > self.initial_loss_scale:
            p.append(
                f"--min-loss-scale {self.min_loss_scale} exceeds --initial-loss-scale "
                f"{self.initial_loss_scale}"
            )
        for name in ("loss_scale_window", "hysteresis"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype != "fp16":
            given = [
                f.name
                for f in dataclasses.fields(self)
                if f.name in LOSS_SCALE_FIELDS and getattr(self, f.name) != f.default
            ]
            if given:
                flags = ", ".join("--" + g.replace("_", "-") for g in given)
                p.append(f"{flags}: loss scaling applies to --dtype fp16 only, not {self.dtype}")
        elif self.zero_stage:
            p.append(
                f"--dtype fp16 with --zero-stage {self.zero_stage} is not supported yet "
                "(DeepSpeed's fp16 optimizer is not wired); use --dtype bf16 or the plain stepper"
            )
        return p

    def problems(self, dp: int) -> list[str]:
        p = self._value_problems()
        if self.warmup_steps >= max(self.steps, 1) and self.warmup_steps > 0:
            p.append(f"--warmup-steps {self.warmup_steps} must be < --steps {self.steps}")
        if (
            self.min_lr is not None
            and math.isfinite(self.min_lr)
            and not (0 <= self.min_lr <= self.lr)
        ):
            p.append(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            p.append(f"--stop-after {self.stop_after} must be in [1, --steps {self.steps}]")
        if self.keep_last < 0:
            p.append(f"--keep-last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        elif self.keep_last and not self.save:
            p.append(f"--keep-last {self.keep_last} needs --save DIR")
        if self.save_interval and not self.save:
            p.append(f"--save-interval {self.save_interval} needs --save DIR")
        if self.progress not in PROGRESS:
            p.append(f"--progress {self.progress!r} is not one of {PROGRESS}")
        if self.fault is not None and parse_fault(self.fault) is None:
            p.append(f"--fault {self.fault!r} must be KIND:RANK:STEP, KIND in crash|hang|nan")
        p += self._zero_problems()
        if self.tensorboard_dir is not None:
            p += output_dir_problems("--tensorboard-dir", self.tensorboard_dir)
            if importlib.util.find_spec("tensorboard") is None:
                p.append(
                    f"--tensorboard-dir {self.tensorboard_dir} needs TensorBoard: pip install "
                    "'lss-megatron[tensorboard]'"
                )
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
        elif (self.global_batch_size // dp) // (self.micro_batch_size or 1) > MAX_MICRO_BATCHES:
            p.append(
                f"--global-batch-size {self.global_batch_size} with --micro-batch-size "
                f"{self.micro_batch_size} is {(self.global_batch_size // dp) // self.micro_batch_size:,} "
                f"micro-batches per step and replica, more than {MAX_MICRO_BATCHES:,}"
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

    def _layout_problems(self) -> list[str]:
        """How the mode and the segments fit the model (once model and layout are valid)."""
        n, m, par = self.parallel.seq_parallel, self.model, self.parallel
        p = par.rules.problems(m, n)
        if par.tensor_parallel > 1:
            p += tensor_parallel_problems(m, par.tensor_parallel, "--tensor-parallel", "T")
        if p:
            return p
        if m.seq_length % n:
            p.append(f"--seq-length {m.seq_length} is not divisible by --seq-parallel {n}")
        local_kv = m.kv_heads // par.tensor_parallel  # each rank's K/V heads
        if local_kv % par.kv_gather_chunks:
            per_rank = f" / T = {local_kv} per rank" if par.tensor_parallel > 1 else ""
            p.append(
                f"--kv-gather-chunks {par.kv_gather_chunks} does not divide the key/value heads "
                f"{m.kv_heads}{per_rank}"
            )
        if not m.seq_length % n and par.lss_layout == "zigzag" and m.seq_length % (2 * n):
            p.append(
                f"--lss-layout zigzag needs --seq-length {m.seq_length} divisible by 2N = {2 * n}"
            )
        return p

    def validate(self) -> RunConfig:
        """Raise `ConfigError` listing every problem; return self when the run is possible."""
        parallel_problems = self.parallel.problems()
        p = self.model.problems() + parallel_problems
        if not p:
            p += self._layout_problems()
        p += self.train.problems(self.parallel.dp if not parallel_problems else 0)
        p += self._fault_problems()
        if self.train.dtype != "fp32" and self.parallel.tensor_parallel > 1:
            p.append(
                f"--dtype {self.train.dtype} with --tensor-parallel > 1 is not supported: LSS x TP "
                "has not been "
                "tested with Megatron's bf16 model yet; use fp32"
            )
        if self.parallel.lss_save_kv == "local" and self.train.attention_kernel == "dense":
            p.append(
                "--lss-save-kv local needs --attention-kernel flash (the dense kernel saves its "
                "own copies of the gathered K/V, so keeping them local would save nothing)"
            )
        if self.parallel.lss_overlap and self.train.attention_kernel == "dense":
            p.append("--lss-overlap needs --attention-kernel flash (it merges flash blocks)")
        if self.train.zero_stage and self.parallel.tensor_parallel > 1:
            p.append(
                f"--zero-stage {self.train.zero_stage} with --tensor-parallel "
                f"{self.parallel.tensor_parallel} is not supported (untested); use --zero-stage 0"
            )
        p += self._document_problems()
        split, split_problems = self._split()
        p += split_problems
        if self.train.data in DATASETS and not split_problems:
            p += check_data_config(
                self.train.data,
                self.train.data_path,
                self.model.vocab_size,
                self.model.seq_length,
                evaluates=self.train.eval_interval > 0,
                split=split,
            )
        if self.train.deepspeed_config and self.train.zero_stage in (1, 2):
            p += self._deepspeed_file_problems(batch_known=not p)
        if p:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))
        return self

    def _split(self) -> tuple[tuple[float, ...] | None, list[str]]:
        """``--split``'s fractions, and why it cannot be used (megatron data only)."""
        t = self.train
        if t.split is None:
            return None, []
        try:
            fractions = t.fractions
        except ValueError as e:
            return None, [f"--split {t.split!r}: {e}"]
        if t.data != "megatron":
            return None, [
                f"--split {t.split} applies to --data megatron only (--data {t.data} has its own "
                "fixed 90/5/5 split)"
            ]
        return fractions, []

    def _fault_problems(self) -> list[str]:
        """A ``--fault`` that cannot fire (a rank or step outside the run) never passes silently."""
        fault = parse_fault(self.train.fault) if self.train.fault else None
        if fault is None:
            return []
        kind, rank, step = fault
        last = self.train.stop_after or self.train.steps
        p = []
        if rank >= self.parallel.world_size:
            p.append(
                f"--fault {self.train.fault}: rank {rank} is not in this run of P = "
                f"{self.parallel.world_size} ranks (0..{self.parallel.world_size - 1})"
            )
        if not 1 <= step <= last:
            p.append(
                f"--fault {self.train.fault}: step {step} is outside this run's steps 1..{last}"
            )
        return p

    def _document_problems(self) -> list[str]:
        """Megatron-LM's document flags: documents to find, an EOD the vocabulary holds, and a
        mode and model that can honour a document mask."""
        t, flags = self.train, []
        for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
            if getattr(t, name):
                flags.append("--" + name.replace("_", "-"))
        if not flags:
            return []
        p = []
        if t.data != "megatron":
            p.append(
                f"{flags[0]} needs --data megatron (documents ending in --eod-token), got "
                f"--data {t.data}"
            )
        if not 0 <= t.eod_token < self.model.vocab_size:
            p.append(
                f"--eod-token {t.eod_token} is outside --vocab-size {self.model.vocab_size} (ids "
                f"0..{self.model.vocab_size - 1}): byte documents with EOD (make_indexed "
                f"--append-eod) need --vocab-size >= {max(t.eod_token, 0) + 1}"
            )
        if t.reset_attention_mask:
            if not self.model.causal:
                p.append("--reset-attention-mask needs causal attention (drop --no-causal)")
            declared = find_mode(self.parallel.mode)
            if declared is not None and not declared.documents:
                p.append(
                    f"--reset-attention-mask: --mode {self.parallel.mode} cannot honour document "
                    "masks"
                )
        return p

    def _deepspeed_file_problems(self, batch_known: bool) -> list[str]:
        """`zero_config.file_problems`: the file against this run's options (the batch only when
        the layout and batch are valid). DeepSpeed's data ranks are the D data replicas: the
        sequence group is given to DeepSpeed as its sequence-parallel group, not as data ranks
        (training/zero.py's MegatronMPU)."""
        from .zero_config import file_problems

        par, t = self.parallel, self.train
        run: dict = {
            "clip_grad": t.clip_grad,
            "zero_stage": t.zero_stage,
            "dtype": t.dtype,
            "optimizer": t.optimizer,
            "lr": t.lr,
            "weight_decay": t.weight_decay,
        }
        if batch_known:
            run.update(global_batch_size=t.global_batch_size, micro_batch_size=self.micro_batch)
        return file_problems(
            t.deepspeed_config,
            run,
            data_ranks=max(par.dp, 1),
            seq_ranks=par.context_parallel_size if find_mode(par.mode) else 1,
        )

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
