"""In-run measurement: bytes saved for backward, memory, model FLOPs, step-time summaries.

* ``activation_bytes``: the bytes autograd saves for backward during one micro-batch's forward
  (the largest micro-batch of the step), counted exactly with saved-tensor hooks over UNIQUE
  storages (views of one buffer count once) and excluding parameters. Platform-independent.
* ``param_bytes``, ``grad_bytes``, ``optimizer_state_bytes``: this rank's tensors.
* ``peak_mem_bytes``: peak resident set size of the process on CPU (``ru_maxrss``), peak
  allocated device memory on GPU (``max_memory_allocated``).
* ``transient_peak_bytes`` (first step only, CPU): the peak growth of the heap in use during the
  step's forward + backward, glibc's ``mallinfo2`` sampled after every torch operation through a
  `TorchDispatchMode` (`heap_peak_mode`); unlike RSS it shows transient buffers (e.g. what
  chunked K/V gathers save). On GPU: growth of ``max_memory_allocated`` over the step.
* ``model_flops_per_step``: analytic FLOPs of one optimizer step of the whole model over the
  global batch (forward x 3 for forward + backward, no recomputation), the same for every mode;
* ``attention_flops_per_rank``, ``attention_imbalance``: the causal load balance of LSS, analytic
  (4 b h d x the (query, key) pairs each training forward attends, summed by the LSS core
  attention modules; evaluation and Megatron's recompute add nothing), not timed;
* ``runtime`` (config.json): what really ran, read back from the built model.

Storage bytes are counted in one way everywhere (`unique_storage_bytes`, `saved_storages`): a
tensor's storage once, however many views of it there are.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import statistics
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ModelConfig
from ..lss.core_attention import SequenceCoreAttention
from ..parallel import comm


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage behind `t`: views of one buffer share it."""
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def unique_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once; None and
    empty tensors are skipped)."""
    return sum(dict(_storage(t) for t in tensors if torch.is_tensor(t) and t.numel()).values())


@contextlib.contextmanager
def saved_storages() -> Iterator[dict[int, int]]:
    """Inside the block, the storages autograd saves for backward: {address: bytes}."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        storages[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def count_saved_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Bytes of the unique storages that autograd saves for backward while running fn."""
    with saved_storages() as storages:
        fn(*args, **kwargs)
    return sum(storages.values())


class SavedBytes:
    """Measures what autograd saves for backward inside `measure()` blocks, parameters excluded;
    keeps the maximum."""

    def __init__(self, model: torch.nn.Module):
        self.param_storages = {_storage(p)[0] for p in model.parameters()}
        self.peak = 0

    @contextlib.contextmanager
    def measure(self):
        with saved_storages() as storages:
            yield
        saved = sum(n for ptr, n in storages.items() if ptr not in self.param_storages)
        self.peak = max(self.peak, saved)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def memory_stats(model: torch.nn.Module, optimizer, trainable=None) -> dict:
    """The model's parameter bytes; gradient and optimizer-state bytes of what the optimizer
    steps (`trainable`: the model, or `optim.MasterWeights` under bf16, whose fp32 master
    weights are then ``master_param_bytes``)."""
    params = list(model.parameters())
    stepped = list((trainable or model).parameters())
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    out = {
        "param_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(p.grad for p in stepped),
        "optimizer_state_bytes": tensor_bytes(state),
    }
    if trainable is not None and trainable is not model:
        out["master_param_bytes"] = tensor_bytes(stepped)
    return out


def peak_mem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def machine_description(device: torch.device, backend: str) -> str:
    """What a run ran on, for figure titles: the GPU's name, or the CPU model and core count; and
    the collective backend. E.g. ``NVIDIA H200 (CUDA, nccl)``, ``CPU Intel Xeon ..., 2 cores
    (gloo)``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA, {backend})"
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), model
            )
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores ({backend})"


def attention_pairs(seq_length: int, causal: bool) -> int:
    """(query, key) pairs one sequence attends over."""
    return seq_length * (seq_length + 1) // 2 if causal else seq_length * seq_length


def model_flops_per_step(m: ModelConfig, global_batch: int) -> int:
    """Analytic FLOPs of one training step (forward + backward = 3 x forward) over G sequences.

    Per token and layer: QKV 2E(h d + 2 h_kv d), projection 2 h d E, MLP 4 E F; logits 2 E V;
    attention per sequence and layer: 4 h d x (attended pairs). Embedding lookups are free.
    """
    d, kv = m.head_dim, m.kv_heads
    per_token = (
        m.num_layers
        * (
            2 * m.hidden_size * (m.num_heads * d + 2 * kv * d)
            + 2 * m.num_heads * d * m.hidden_size
            + 4 * m.hidden_size * m.ffn_size
        )
        + 2 * m.hidden_size * m.vocab_size
    )
    attention = m.num_layers * 4 * m.num_heads * d * attention_pairs(m.seq_length, m.causal)
    forward = global_batch * (m.seq_length * per_token + attention)
    return 3 * forward


def step_time_summary(step_times: list[float], warmup: int = 1) -> dict:
    """Median step time after the first `warmup` steps (all steps if there are too few)."""
    steady = step_times[warmup:] if len(step_times) > warmup else step_times
    return {
        "step_time_s": statistics.median(steady) if steady else float("nan"),
        "warmup_steps_excluded": len(step_times) - len(steady),
    }


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc, mmap'd blocks included), or None
    where glibc's `mallinfo2` is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def heap_peak_mode():
    """A TorchDispatchMode recording ``peak`` of `heap_in_use()` after every torch op (and
    ``base``, at entry). Slows every op down a little: use it for measurement steps only."""

    class HeapPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.base = heap_in_use() or 0
            self.peak = self.base

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            now = heap_in_use()
            if now is not None and now > self.peak:
                self.peak = now
            return out

    return HeapPeak()


class TransientPeak:
    """Context manager: ``bytes`` = peak growth of memory in use inside the block (CPU: glibc heap
    sampled after every torch op, see `heap_peak_mode`; GPU: ``max_memory_allocated``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self._mode = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif heap_in_use() is not None:
            self._mode = heap_peak_mode()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self.bytes = int(self._mode.peak - self._mode.base)
        return False


def attention_balance(model, grid, device) -> dict:
    """Per-rank attention FLOPs of this step (forward + backward = 3 x forward) across the
    sequence group, and max/mean: the causal load imbalance (1.0 = balanced). Analytic: the
    sequence core attention modules (LSS, Ulysses, the flash kernel of serial / nvidia-sp) add
    4 b h d x the pairs each training forward attends. With document masks
    (``--reset-attention-mask``) also ``attention_flops_vs_causal``: this step's attention FLOPs
    over the sequence group against the same step without document masks (the work the document
    tiles skip), and for LSS ``kv_needed_fraction``: of the other ranks' keys the K/V all-gather
    brought to the sequence group, the fraction some local query sees (a gather of only those
    would move this fraction of the K/V bytes). Empty for Megatron's own `DotProductAttention`."""
    modules = [m for m in model.modules() if isinstance(m, SequenceCoreAttention)]
    if not modules:
        return {}
    counts = [
        3 * sum(m.attention_flops for m in modules),
        3 * sum(m.causal_flops for m in modules),
        sum(getattr(m, "kv_remote_needed", 0) for m in modules),
        sum(getattr(m, "kv_remote_gathered", 0) for m in modules),
    ]
    for m in modules:
        m.attention_flops = m.causal_flops = 0
        if hasattr(m, "kv_remote_needed"):
            m.kv_remote_needed = m.kv_remote_gathered = 0
    mine = torch.tensor(counts, dtype=torch.int64, device=device)
    rows = comm.all_gather_dim0(mine, grid.seq_group, category="other").view(-1, 4).tolist()
    per_rank = [r[0] for r in rows]
    mean = sum(per_rank) / len(per_rank)
    out = {
        "attention_flops_per_rank": per_rank,
        "attention_imbalance": max(per_rank) / mean if mean else 1.0,
    }
    causal = sum(r[1] for r in rows)
    if causal and causal != sum(per_rank):
        out["attention_flops_vs_causal"] = sum(per_rank) / causal
    gathered = sum(r[3] for r in rows)
    if gathered:  # LSS with document masks: what a gather of only the needed K/V would move
        out["kv_needed_fraction"] = sum(r[2] for r in rows) / gathered
    return out


def runtime_info(model, grid, start: int, load: str | None) -> dict:
    """What really runs, read back from the built model."""
    try:
        mcore = version("megatron-core")
    except PackageNotFoundError:  # metadata missing in odd installs
        mcore = "unknown"
    return {
        "grid": repr(grid),
        "backend": dist.get_backend(),
        "core_attention": type(model.decoder.layers[0].self_attention.core_attention).__name__,
        "tensor_parallel": model.config.tensor_model_parallel_size,
        "sequence_parallel": bool(model.config.sequence_parallel),
        "context_parallel": model.config.context_parallel_size,
        "parameters_per_rank": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "resumed_from_step": start,
        "resumed_from": load,
        "torch": torch.__version__,
        "megatron_core": mcore,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "high": TF32 (CUDA)
        "machine": machine_description(next(model.parameters()).device, dist.get_backend()),
    }
