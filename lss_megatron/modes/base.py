"""What a parallel mode declares about itself (torch-free: a leaf, it imports nothing heavy).

A mode is one module holding one `Mode` named ``MODE``; the registry (`modes/__init__.py`) names
that module by its dotted path and imports it only when the mode is asked for. Everything that
differs between modes is here, declared by the mode:

* config rules: which Megatron group has the degree N (`degree_group`), Megatron's
  `sequence_parallel` flag, whether Megatron TP composes with it, which mode-specific options it
  accepts, and `problems` / `degree_problems`: the models and degrees it refuses, and why;
* the model: `layer_spec` and `post_build` (they import torch / Megatron inside their bodies);
* the cost model: `costs` (`Costs`: activation collectives, bytes saved for backward, the shape of
  its attention kernel call, LSS-only indicators);
* the memory estimate: `estimate_attention` (`lss_megatron.estimate`);
* display: `label` and `colour` (tables and figures).

Everything else (data, loss, gradient averaging, optimizer, metrics) is shared, so modes compare
on equal terms. docs/design.md, "Adding a mode", says how a new mode is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

DEGREE_GROUPS = ("context", "tensor", None)


def _noop(model, grid) -> None:
    return None


def _no_problems(model, n: int) -> list[str]:
    return []


def _no_degree_problems(n: int) -> list[str]:
    return []


def _none(s, lay) -> None:
    return None


def tensor_parallel_problems(model, t: int, who: str, degree: str, hint: str = "") -> list[str]:
    """Megatron's tensor parallelism of degree `t` splits attention heads, key/value heads, the
    MLP and the (padded) vocabulary `t` ways (`model`: a `config.ModelConfig`). `who` and
    `degree` name the flags in messages."""
    p = [
        f"{who}: {flag} {value} is not divisible by {degree} = {t}{hint}"
        for flag, value in (("--num-heads", model.num_heads), ("--num-kv-heads", model.kv_heads))
        if value % t
    ]
    if model.ffn_size % t:
        p.append(f"{who}: --ffn-hidden-size {model.ffn_size} is not divisible by {degree} = {t}")
    if model.padded_vocab_size % t:
        p.append(
            f"{who}: the model vocabulary {model.padded_vocab_size} (--vocab-size "
            f"{model.vocab_size}, --make-vocab-size-divisible-by "
            f"{model.make_vocab_size_divisible_by}) is not divisible by {degree} = {t}: "
            "Megatron-Core splits it over tensor-parallel ranks; pad it with "
            "--make-vocab-size-divisible-by"
        )
    return p


@dataclass(frozen=True)
class Costs:
    """A mode's terms in the cost model (`analysis.costmodel`), as functions of the model
    (`counts.Shape`: s) and the layout (`counts.Layout`: lay); pieces in `modes.costs`."""

    sp_plan: Callable[[object, object], list]
    """(s, lay) -> [`costs.Collective`]: the activation traffic (category sp) of one
    micro-batch, forward and backward, on this rank."""
    attention_saved: Callable[[object, object], int]
    """(s, lay) -> bytes the attention block saves for backward in one layer and micro-batch
    (RoPE tables and selective recompute are the cost model's, the same for every mode)."""
    attention_shape: Callable[[object, object], tuple[int, int, int, int]]
    """(s, lay) -> (query heads, key/value heads, queries, keys) of one attention kernel call on
    this rank: its FLOPs, transients and the efficiency measured at its length follow from it."""
    local_queries: bool = False
    """Its kernel call is this rank's l/N queries against all l keys (LSS, ring), so causal
    segments load ranks unevenly; otherwise all l queries of this rank's heads."""
    default_kernel: str = "flash"
    """The cost model's ``auto`` kernel: ``materialized`` (Megatron's DotProductAttention) or
    ``flash`` (as in the paper's comparison)."""
    comm_in_core: bool = False
    """Its activation collectives sit inside the core attention, so selective recompute repeats
    them (LSS, Ulysses, ring); Megatron's own sit around the linear layers (full recompute only)."""
    overlap: str | None = None
    """The `steptime.Assumptions` flag under which its activation traffic hides behind the
    attention compute (``overlap_ring``, ``overlap_kv_gather``), None: never."""
    kv_transient: Callable[[object, object], int | None] = _none
    """(s, lay) -> the full-length [dK | dV] buffer that exists transiently per gather (LSS),
    None: the generic dq, dK, dV of its kernel call."""
    imbalance: Callable[[object, object], float | None] = _none
    """(s, lay) -> max / mean attended pairs over the sequence group (the trainer's
    ``attention_imbalance``; LSS), None where the trainer does not report it."""


@dataclass(frozen=True)
class Mode:
    name: str
    """The ``--mode`` value; the registry's key."""
    label: str
    """Display name in tables and figures."""
    colour: str
    """Its one colour in every figure (a matplotlib colour)."""
    degree_group: str | None
    """The Megatron group of size N: ``context`` (the sequence group), ``tensor``, or None
    (N = 1)."""
    layer_spec: Callable[..., object]
    """(model config, grid, attention kernel) -> the `transformer_layer_spec` handed to
    `GPTModel` (a ModuleSpec or block submodules)."""
    costs: Costs
    estimate_attention: Callable[..., tuple[int, str]]
    """(model config, N, micro-batch, element size, kernel) -> (bytes the attention saves per
    layer, the kernel's name): `lss_megatron.estimate`'s lower bound."""
    post_build: Callable[[object, object], None] = field(default=_noop)
    """(model, grid) -> None: in-place changes after `GPTModel` is built."""
    sequence_parallel: bool = False
    """Megatron's `sequence_parallel` flag (Korthikanti et al.)."""
    composes_with_tp: bool = False
    """Runs with ``--tensor-parallel T > 1``: Megatron TP (with sequence_parallel) inside each
    rank of its sequence group."""
    options: tuple[str, ...] = ()
    """The mode-specific `ParallelConfig` fields it accepts (``lss_layout``,
    ``kv_gather_chunks``); every other mode refuses a non-default value of them."""
    problems: Callable[[object, int], list[str]] = _no_problems
    """(model config, N) -> messages for the models this mode cannot run at degree N."""
    degree_problems: Callable[[int], list[str]] = _no_degree_problems
    """(N) -> messages for the degrees it refuses whatever the model."""
    megatron_attention: bool = False
    """Under ``--attention-kernel dense`` its core attention is Megatron's own
    `DotProductAttention` (which takes Megatron's [b, 1, l, l] masks)."""
    documents: bool = False
    """Honours ``--reset-attention-mask`` (attention within packed documents,
    lss/documents.py)."""

    def __post_init__(self):
        if self.degree_group not in DEGREE_GROUPS:
            raise ValueError(f"mode {self.name}: degree_group {self.degree_group!r}")

    @property
    def splits_sequence(self) -> bool:
        """Its sequence group splits every sequence into N segments (TP = 1 inside, unless it
        composes with TP): sequence-distributed positions, double gradient averaging."""
        return self.degree_group == "context"

    def tensor_parallel(self, n: int, t: int = 1) -> int:
        """Megatron's tensor-parallel size at degree N and ``--tensor-parallel`` T."""
        return n if self.degree_group == "tensor" else t

    def context_parallel(self, n: int) -> int:
        return n if self.degree_group == "context" else 1
