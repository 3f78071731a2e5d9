"""ZeRO stage 1 / 2 over the whole sequence x data grid, through `deepspeed.initialize`.

``--zero-stage {1,2}`` runs the same Megatron model, data and loss as the plain trainer, but the
optimizer step belongs to DeepSpeed: optimizer state (stage 1) and also gradients (stage 2) are
partitioned over DeepSpeed's data-parallel group, which here is Megatron's data-parallel group
*with* the context-parallel (sequence) ranks (`grid.grad_group`): all P = N x D ranks in LSS,
Ulysses and serial, the D data replicas in nvidia-sp (whose tensor-parallel group is DeepSpeed's
model-parallel group). How it keeps the plain trainer's semantics:

* **Positions.** The LSS position slices are different parameters on different sequence ranks,
  so DeepSpeed must not average or partition them as one tensor. Under ZeRO the learned position
  table is replicated whole, ``[l, E]``, on every rank (`replicate_positions`, stitched from the
  slices, so bitwise the one-process table). A rank's gradient is non-zero only on its own rows;
  DeepSpeed's mean over the P ranks is then exactly the gradient of the global mean loss, the
  norm counts every row once, and every rank applies the same update. RoPE has no parameter.
* **Gradients.** DeepSpeed averages every gradient over its data-parallel group, which is the
  trainer's double gradient averaging for replicated weights. Megatron's ``sequence_parallel``
  parameters (nvidia-sp LayerNorms) are first summed over the tensor-parallel group by a gradient
  hook (what `grad_sync.GradientAverager` does for the plain trainer).
* **Micro-batches.** Each micro-batch loss is already divided by the step's local token count
  (`step.forward_backward`), so `engine.backward(loss, scale_wrt_gas=False)` and DeepSpeed's
  ``managed_gradient_accumulation = false``: backward only accumulates, and the single
  `engine.step()` per optimizer step reduces (stage 1) or finalises the reduced partitions
  (stage 2) and updates. ``train_batch_size = micro x accumulation x P`` (DeepSpeed counts the
  sequence ranks as data ranks).
* **Clipping, norm, lr.** ``gradient_clipping = --clip-grad``; DeepSpeed's norm over its
  partitions (each element once) is the global norm, logged as ``grad_norm``; its clip factor
  is the trainer's, ``clip / (norm + 1e-6)`` when ``norm + 1e-6 > clip``. The learning rate is
  written into the client optimizer's param groups every step (`lr_at`); DeepSpeed has no
  scheduler.
* **Non-finite loss.** A skipped step goes through DeepSpeed's own overflow path (gradients and
  partitions cleared, no update, ``engine.skipped_steps`` counts it), forced on every rank alike.
* **bf16.** ``--dtype bf16``: the model is Megatron's bf16 model (`model.build_model`) and
  DeepSpeed's bf16 mode keeps the fp32 master partitions and optimizer state; gradients are
  reduced in fp32 (``communication_data_type``), as the plain trainer's `optim.MasterWeights`.
* **No compilation.** A client `torch.optim` optimizer (never a ds-config one, which JIT-builds
  ``fused_adam``) and no shared-memory comm op (`_no_shm_op`), so nothing is compiled.

Memory (`ZeroEngine.memory_stats`): ``optimizer_state_bytes`` is the client optimizer's state on
this rank's partition (about 1/P of the plain run, plus alignment padding), ``grad_bytes`` the
gradients kept for the step, measured before `engine.step()` (stage 1: full; stage 2: the
parameters overlapping this rank's partition), ``zero_master_bytes`` DeepSpeed's fp32 copy of the
partition's weights and ``zero_bucket_bytes`` its reduction buffer (min(`BUCKET_BYTES`, model)).

Checkpoints are refused with ZeRO (config.py): see docs/zero.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging

import torch

from . import comm
from .config import RunConfig
from .grid import Grid
from .optim import build_optimizer
from .positions import ROWS_ATTR, SegmentPositionEmbedding

BUCKET_BYTES = 25 * 1024 * 1024
"""DeepSpeed's reduce and all-gather bucket size in bytes (the plain trainer's bucket size)."""


def available() -> bool:
    """Whether DeepSpeed is installed (checked without importing it)."""
    return importlib.util.find_spec("deepspeed") is not None


class MegatronMPU:
    """DeepSpeed's ``mpu`` protocol over this run's grid: model parallel = Megatron's tensor
    parallel group; data parallel = the gradient group (data-parallel with context-parallel), so
    the sequence ranks, which see different tokens of replicated weights, are data ranks."""

    def __init__(self, grid: Grid):
        import torch.distributed as dist

        self.grid = grid
        self._dist = dist

    def get_model_parallel_group(self):
        return self.grid.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.grid.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.grid.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._dist.get_global_rank(self.grid.tp_group, 0)

    def get_data_parallel_group(self):
        return self.grid.grad_group

    def get_data_parallel_rank(self) -> int:
        return self._dist.get_rank(self.grid.grad_group)

    def get_data_parallel_world_size(self) -> int:
        return self._dist.get_world_size(self.grid.grad_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def replicate_positions(model, grid: Grid) -> bool:
    """Replace a sequence-distributed learned position table (`SegmentPositionEmbedding`) by the
    full table, stitched from the sequence group's slices by global row (any layout), as a plain
    `torch.nn.Embedding`. Collective over the sequence group; True if a table was replaced."""
    emb = getattr(model, "embedding", None)
    seg = getattr(emb, "position_embeddings", None)
    if not isinstance(seg, SegmentPositionEmbedding):
        return False
    local = seg.weight.detach()  # [l/N, E]
    rows = getattr(seg.weight, ROWS_ATTR).to(local.device)  # [l/N]
    gathered = comm.all_gather_dim0(local, grid.seq_group, category="other")  # [l, E]
    all_rows = comm.all_gather_dim0(rows, grid.seq_group, category="other")  # [l]
    full = torch.empty_like(gathered)
    full[all_rows] = gathered  # [l, E], global row order
    table = torch.nn.Embedding(full.shape[0], full.shape[1], device=full.device, dtype=full.dtype)
    with torch.no_grad():
        table.weight.copy_(full)
    emb.position_embeddings = table
    return True


def _tp_sum_hooks(model, grid: Grid) -> list:
    """Sum the gradients of Megatron ``sequence_parallel`` parameters over the tensor-parallel
    group as they are produced (before DeepSpeed accumulates and reduces them)."""
    if grid.tp_size == 1:
        return []

    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        return comm.all_reduce_(g, grid.tp_group, category="grad")

    return [p.register_hook(hook) for p in model.parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]  # fmt: skip


@contextlib.contextmanager
def _no_shm_op():
    """DeepSpeed's TorchBackend JIT-builds a shared-memory C++ op (inference all-reduce only)
    when it is created: skip it. (`import deepspeed.comm.torch as m` would bind torch itself.)"""
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def ds_config(cfg: RunConfig, dp_world: int, bucket_elements: int) -> dict:
    """The DeepSpeed config of a ZeRO run (no ds-config optimizer, no scheduler; a bf16 engine
    with fp32 gradient reduction under ``--dtype bf16``, else fp32)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.num_micro_batches,
        "train_batch_size": cfg.micro_batch * cfg.num_micro_batches * dp_world,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {
            "stage": t.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,  # CPU/gloo: no streams to overlap on
            "reduce_scatter": True,
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.dtype == "bf16"},
        **({"communication_data_type": "fp32"} if t.dtype == "bf16" else {}),
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class ZeroEngine:
    """The model under `deepspeed.initialize` with ZeRO ``cfg.train.zero_stage`` (see module doc).

    Use: `optimizer` (param groups for the lr), `forward_backward(micro, saved)` per step, then
    `step(skip)` once, which returns DeepSpeed's global gradient norm; `memory_stats()`.
    """

    def __init__(self, model, cfg: RunConfig, grid: Grid):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.grid = grid
        self.stage = cfg.train.zero_stage
        self.replicated_positions = replicate_positions(model, grid)
        self._hooks = _tp_sum_hooks(model, grid)
        params = [p for p in model.parameters() if p.requires_grad]
        client = build_optimizer(params, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
        mpu = MegatronMPU(grid)
        elem = params[0].element_size()
        # DeepSpeed allocates the whole bucket: never more than this rank's parameters
        self.bucket_elements = min(BUCKET_BYTES // elem, sum(p.numel() for p in params))
        config = ds_config(cfg, mpu.get_data_parallel_world_size(), self.bucket_elements)
        with _no_shm_op():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=client, config=config, mpu=mpu, dist_init_required=False
            )
        self.model = model
        self.grad_bytes = 0
        self.bucket_bytes = self.bucket_elements * elem

    def describe(self) -> dict:
        """What DeepSpeed runs (for config.json)."""
        import deepspeed

        return {
            "stage": self.stage,
            "optimizer": type(self.optimizer).__name__,
            "data_parallel_size": self.engine.dp_world_size,
            "replicated_position_table": self.replicated_positions,
            "bucket_elements": self.bucket_elements,
            "deepspeed": deepspeed.__version__,
        }

    def forward_backward(self, micro_batches, *, saved=None) -> torch.Tensor:
        """`step.forward_backward` through the engine: forward by `engine(...)`, backward by
        `engine.backward(loss, scale_wrt_gas=False)`. Returns the local mean loss (float64)."""
        n_tokens = sum(tok.numel() for tok, _, _ in micro_batches)
        total = torch.zeros((), dtype=torch.float64, device=micro_batches[0][0].device)
        for tokens, labels, positions in micro_batches:
            with saved.measure() if saved is not None else contextlib.nullcontext():
                per_token = self.engine(tokens, positions, None, labels=labels)  # [B, l/N]
            loss = per_token.float().sum() / n_tokens
            self.engine.backward(loss, scale_wrt_gas=False)
            total += loss.detach().double()
        return total

    def _held_grad_bytes(self) -> int:
        """Gradient bytes this rank holds between backward and the step: `.grad` of parameters
        (stage 1: all of them) and ZeRO's accumulated partition gradients (stage 2: the whole
        gradients of the parameters that overlap this rank's partition)."""
        opt = self.optimizer
        held = [p.grad for p in self.model.parameters()]
        held.append(getattr(opt, "grads_in_partition", None))
        for store in (getattr(opt, "all_grad_tensors", {}), getattr(opt, "averaged_gradients", {})):
            for group in store.values():
                held.extend(group or [])
        return _unique_bytes(held)

    def step(self, skip: bool = False) -> float:
        """The optimizer step (collective): reduce/finalise gradients, clip, update, gather
        weights. `skip`: discard this step's gradients without an update (all ranks alike).
        Returns the global gradient norm before clipping (nan when skipped)."""
        self.grad_bytes = self._held_grad_bytes()
        if not skip:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        opt = self.optimizer
        saved = opt.check_grad_overflow
        opt.check_grad_overflow = True
        opt.check_overflow = lambda partition_gradients=True: setattr(opt, "overflow", True)
        try:
            self.engine.step()  # DeepSpeed's overflow path: clear gradients, no update
        finally:
            opt.check_grad_overflow = saved
            del opt.check_overflow
        return float("nan")

    def memory_stats(self) -> dict:
        """This rank's parameter, gradient and optimizer bytes (see module doc)."""
        opt = self.optimizer
        state = [v for st in opt.optimizer.state.values() for v in st.values()
                 if torch.is_tensor(v)]  # fmt: skip
        return {
            "param_bytes": _unique_bytes(self.model.parameters()),
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": _unique_bytes(state),
            "zero_master_bytes": _unique_bytes(opt.single_partition_of_fp32_groups),
            "zero_bucket_bytes": self.bucket_bytes,
            "zero_stage": self.stage,
        }
