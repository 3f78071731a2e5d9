"""ZeRO stage 1 / 2 over the whole sequence x data grid, through `deepspeed.initialize`.

``--zero-stage {1,2}`` runs the same Megatron model, data and loss as the plain trainer, but the
optimizer step belongs to DeepSpeed: optimizer state (stage 1) and also gradients (stage 2) are
partitioned over DeepSpeed's sequence x data-parallel group, which here is Megatron's
data-parallel group *with* the context-parallel (sequence) ranks (`grid.grad_group`): all
P = N x D ranks in LSS, Ulysses and serial, the D data replicas in nvidia-sp (whose
tensor-parallel group is DeepSpeed's model-parallel group). DeepSpeed is told the sequence group
as its sequence-parallel group and the D replicas as its data-parallel group (`MegatronMPU`, the
protocol of Megatron-DeepSpeed's Ulysses), so its batch keys count sequences over D. How it keeps
the plain trainer's semantics:

* **Positions.** The LSS position slices are different parameters on different sequence ranks,
  so DeepSpeed must not average or partition them as one tensor. Under ZeRO the learned position
  table is replicated whole, ``[l, E]``, on every rank (`replicate_positions`, stitched from the
  slices, so bitwise the one-process table). A rank's gradient is non-zero only on its own rows;
  DeepSpeed's mean over the P ranks is then exactly the gradient of the global mean loss, the
  norm counts every row once, and every rank applies the same update. RoPE has no parameter.
* **Gradients.** DeepSpeed averages every gradient over its data-parallel group, which is the
  trainer's double gradient averaging for replicated weights. Megatron's ``sequence_parallel``
  parameters (nvidia-sp LayerNorms) are first summed over the tensor-parallel group by a gradient
  hook (what `lss.grad_sync.GradientAverager` does for the plain trainer).
* **Micro-batches.** Each micro-batch loss is already divided by the step's local token count
  (`micro_batches.forward_backward`), so `engine.backward(loss / N, scale_wrt_gas=False)` and
  DeepSpeed's ``managed_gradient_accumulation = false``: backward only accumulates, and the
  single `engine.step()` per optimizer step reduces (stage 1) or finalises the reduced
  partitions (stage 2) and updates. DeepSpeed divides the gradient sum over the N x D ranks by
  D (its data ranks), so each rank back-propagates its share of the sequence's loss, the local
  mean over N: the result is the mean over P, the plain trainer's. ``train_batch_size = micro x
  accumulation x D``: sequences per step, as DeepSpeed users read it.
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
  ``fused_adam``) and no shared-memory comm op (`compat.deepspeed.no_shm_op`), so nothing is
  compiled.

Memory (`ZeroEngine.memory_stats`): ``optimizer_state_bytes`` is the client optimizer's state on
this rank's partition (about 1/P of the plain run, plus alignment padding), ``grad_bytes`` the
gradients kept for the step, measured before `engine.step()` (stage 1: full; stage 2: the
parameters overlapping this rank's partition), ``zero_master_bytes`` DeepSpeed's fp32 copy of the
partition's weights and ``zero_bucket_bytes`` its reduction buffer (min(`BUCKET_BYTES`, model)).

The DeepSpeed config is zero_config.defaults with ``--deepspeed-config FILE`` merged over it
(zero_config.py says which keys the trainer owns); the effective one is in config.json
(``runtime.zero.ds_config``), with why ``overlap_comm`` is on (CUDA) or off (CPU/gloo).

Checkpoints (`ZeroSharding`): the same sharded, canonical checkpoint as the plain trainer. Each rank
saves, per parameter, the boxes its flat fp32 partition covers (DeepSpeed's ``_hp_mapping``
fragments: master weights as ``model/<name>``, Adam's moments as ``optim/<name>/<key>``), so a
ZeRO checkpoint loads into a plain run and a plain one into ZeRO, at any P (docs/zero.md).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..compat.deepspeed import no_shm_op
from ..config import RunConfig
from ..lss.positions import SegmentPositionEmbedding
from ..parallel import comm
from ..parallel.grid import Grid
from ..parallel.params import full_shape, grad_is_tp_partial, local_pieces, to_full
from ..zero_config import defaults, for_deepspeed, merge, overlap_comm_default, read_file
from .checkpoint import check_parameters, check_shape, optimizer_keys
from .metrics import unique_storage_bytes
from .micro_batches import forward_backward
from .optim import build_optimizer
from .sharded import fragment_pieces
from .stepper import Stepper

BUCKET_BYTES = 25 * 1024 * 1024
"""DeepSpeed's reduce and all-gather bucket size in bytes (the plain trainer's bucket size)."""


class MegatronMPU:
    """DeepSpeed's ``mpu`` protocol over this run's grid, with the sequence group given as such
    (the protocol Megatron-DeepSpeed's Ulysses uses; deepspeed/utils/groups.py):

    * model parallel: Megatron's tensor-parallel group (nvidia-sp's degree N);
    * data parallel: Megatron's data-parallel group, the D replicas. DeepSpeedConfig counts these
      as its world size, so ``train_batch_size = micro x accumulation x D`` sequences per step;
    * sequence parallel: Megatron's context-parallel group, the N sequence ranks (LSS, Ulysses,
      ring; 1 for nvidia-sp and serial);
    * sequence x data parallel: the gradient group (data-parallel with context-parallel), N x D
      ranks. ZeRO partitions and reduces over it and divides the sum by D = (N x D) / N: each
      sequence rank is expected to back-propagate its share of the sequence's loss (local token
      sum over the tokens of the whole sequence), so `ZeroEngine` scales its local mean by 1/N.
    """

    def __init__(self, grid: Grid):
        self.grid = grid

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
        return dist.get_global_rank(self.grid.tp_group, 0)

    def get_data_parallel_group(self):
        return self.grid.data_group

    def get_data_parallel_rank(self) -> int:
        return self.grid.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.grid.data_size

    def get_sequence_parallel_group(self):
        return self.grid.seq_group

    def get_sequence_parallel_rank(self) -> int:
        return self.grid.seq_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.grid.seq_size

    def get_sequence_data_parallel_group(self):
        return self.grid.grad_group

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self.grid.grad_group)

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.grid.grad_group)

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
    full = to_full(seg.weight, seg.weight, grid)  # [l, E], global row order
    table = torch.nn.Embedding(full.shape[0], full.shape[1], device=full.device, dtype=full.dtype)
    with torch.no_grad():
        table.weight.copy_(full)
    emb.position_embeddings = table
    return True


def _tp_sum_hooks(model, grid: Grid) -> list:
    """Sum the gradients of Megatron ``sequence_parallel`` parameters over the tensor-parallel
    group as they are produced (before DeepSpeed accumulates and reduces them)."""

    def hook(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        return comm.all_reduce_(g, grid.tp_group, category="grad")

    return [
        p.register_hook(hook)
        for p in model.parameters()
        if p.requires_grad and grad_is_tp_partial(p, grid.tp_size)
    ]


def ds_config(
    cfg: RunConfig, dp_world: int, bucket_elements: int, cuda: bool = False
) -> tuple[dict, str]:
    """The DeepSpeed config of a ZeRO run: the trainer's defaults (zero_config.defaults) with
    ``--deepspeed-config`` merged over them; and why ``overlap_comm`` is what it is."""
    overlap, why = overlap_comm_default(cuda)
    t = cfg.train
    base = defaults(
        micro=cfg.micro_batch,
        accumulation=cfg.num_micro_batches,
        data_ranks=dp_world,
        clip=t.clip_grad,
        stage=t.zero_stage,
        bucket_elements=bucket_elements,
        overlap_comm=overlap,
        bf16=t.dtype == "bf16",
    )
    if not t.deepspeed_config:
        return base, why
    config = merge(base, read_file(t.deepspeed_config))
    if config["zero_optimization"]["overlap_comm"] != overlap:
        why = f"set by --deepspeed-config {t.deepspeed_config} (the default here: {why})"
    return config, why


def deepspeed_args(device: torch.device):
    """`deepspeed.initialize`'s ``args``: only ``device_rank``, the CUDA index the trainer chose
    (`training.loop.select_cuda_device`), which DeepSpeed's engine then uses. Without it DeepSpeed calls
    ``set_device(LOCAL_RANK)``, wrong where each task sees only its own GPU (LOCAL_RANK > 0, one
    visible device). On the CPU the index is 0 (DeepSpeed's CPU accelerator ignores it)."""
    import argparse

    index = device.index if device.type == "cuda" and device.index is not None else 0
    return argparse.Namespace(device_rank=index)


class ZeroEngine(Stepper):
    """The model under `deepspeed.initialize` with ZeRO ``cfg.train.zero_stage`` (see module doc),
    as the run's `Stepper`: `optimizer` (param groups for the lr), `forward_backward(micro,
    saved=)` per step, then `step(skip)` once, which returns DeepSpeed's global gradient norm;
    DeepSpeed clears and reduces the gradients itself (no `zero_grad`, no `sync_gradients`)."""

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
        config, self.overlap_why = ds_config(
            cfg, mpu.get_data_parallel_world_size(), self.bucket_elements, torch.cuda.is_available()
        )
        self.config = config
        # a --deepspeed-config may set the bucket size: report what DeepSpeed was given
        self.bucket_elements = int(config["zero_optimization"]["reduce_bucket_size"])
        with no_shm_op():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                args=deepspeed_args(params[0].device),
                model=model,
                optimizer=client,
                config=for_deepspeed(config),
                mpu=mpu,
                dist_init_required=False,
            )
        self.model = model
        self.loss_share = 1.0 / grid.seq_size
        self.grad_bytes = 0
        self.bucket_bytes = self.bucket_elements * elem

    def describe(self) -> dict:
        """What DeepSpeed runs (for config.json)."""
        import deepspeed

        return {
            "stage": self.stage,
            "optimizer": type(self.optimizer).__name__,
            "data_parallel_size": self.engine.dp_world_size,
            "sequence_parallel_size": self.engine.sequence_parallel_size,
            "sequence_data_parallel_size": self.engine.seq_dp_world_size,
            "train_batch_size": self.engine.train_batch_size(),
            "replicated_position_table": self.replicated_positions,
            "bucket_elements": self.bucket_elements,
            "overlap_comm": bool(self.config["zero_optimization"]["overlap_comm"]),
            "overlap_comm_why": self.overlap_why,
            "ds_config": self.config,
            "deepspeed": deepspeed.__version__,
        }

    def zero_grad(self) -> None:
        """Nothing: DeepSpeed clears the gradients in its step."""

    def sync_gradients(self) -> None:
        """Nothing: DeepSpeed reduces the gradients in backward (stage 2) or in its step."""

    def forward_backward(self, micro_batches, *, saved=None) -> torch.Tensor:
        """`step.forward_backward` through the engine: forward by `engine(...)`, backward by
        `engine.backward(loss, scale_wrt_gas=False)`. Returns the local mean loss (float64)."""
        total, _ = forward_backward(
            self.engine, micro_batches, saved=saved, backward=self._backward
        )
        return total

    def _backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides the sum over the N x D ranks by D (MegatronMPU): this rank's share
        # of its sequence's loss is its local mean over N
        self.engine.backward(loss * self.loss_share, scale_wrt_gas=False)

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
        return unique_storage_bytes(held)

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

    def checkpoint_sharding(self) -> ZeroSharding:
        return ZeroSharding(self)

    def memory_stats(self) -> dict:
        """This rank's parameter, gradient and optimizer bytes (see module doc)."""
        opt = self.optimizer
        state = [
            v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)
        ]
        return {
            "param_bytes": unique_storage_bytes(self.model.parameters()),
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": unique_storage_bytes(state),
            "zero_master_bytes": unique_storage_bytes(opt.single_partition_of_fp32_groups),
            "zero_bucket_bytes": self.bucket_bytes,
            "zero_stage": self.stage,
        }


class ZeroSharding:
    """What a ZeRO rank holds for a checkpoint (`checkpoint.PlainSharding`'s counterpart). A
    parameter's ``_hp_mapping`` (DeepSpeed's tensor fragment) says which flat range
    [start, start + numel) of the parameter (this rank's TP shard in nvidia-sp) lies in this
    rank's fp32 partition: those elements of the master weights and of each optimizer state
    tensor are saved as the boxes they cover (`sharded.fragment_pieces`), at global offsets.
    Loading reads the same boxes into the partition and the model's weights whole, so the
    model and DeepSpeed's masters agree."""

    def __init__(self, engine: ZeroEngine):
        self.model, self.grid, self.opt = engine.model, engine.grid, engine.optimizer
        self._state: dict = {}

    def _params(self):
        """(name, parameter, its fragment or None, offsets of its local shard in the full one)."""
        for name, p in self.model.named_parameters():
            base = local_pieces(p, p, self.grid)[0][0]  # replicated or a TP shard: one box
            yield name, p, getattr(p, "_hp_mapping", None), base

    def _pieces(self, flat_fragment: torch.Tensor, p, m, base) -> list:
        return fragment_pieces(flat_fragment, tuple(p.shape), m.lp_fragment_address.start, base)

    def _partition(self, m):
        """The flat fp32 partition holding fragment `m`, and `m`'s range in it."""
        flat = self.opt.single_partition_of_fp32_groups[m.param_group_index]
        return flat, m.hp_fragment_address.start, m.hp_fragment_address.numel

    def entries(self) -> dict:
        out = {}
        for name, p, m, base in self._params():
            shape = full_shape(p, self.grid)
            if m is None:  # no element of it in this rank's partition
                out[f"model/{name}"] = (shape, [])
                continue
            out[f"model/{name}"] = (shape, self._pieces(m.hp_fragment, p, m, base))
            flat, start, n = self._partition(m)
            for k, v in sorted(self.opt.optimizer.state.get(flat, {}).items()):
                if torch.is_tensor(v) and v.shape == flat.shape:
                    fragment = v.narrow(0, start, n)  # [numel] of this parameter
                    out[f"optim/{name}/{k}"] = (shape, self._pieces(fragment, p, m, base))
                else:  # a scalar (Adam's step): the same for every parameter
                    v = v.detach() if torch.is_tensor(v) else torch.tensor(v)
                    out[f"optim/{name}/{k}"] = (tuple(v.shape), [((0,) * v.dim(), v)])
        return out

    def targets(self, stored: dict) -> dict:
        """The model's weights (whole or TP shard), the partition's masters and new optimizer
        state for each flat partition (zeros in its padding; put in place by `commit`)."""
        check_parameters(stored, dict(self.model.named_parameters()))
        out, self._state = {}, {}
        for name, p, m, base in self._params():
            shape = check_shape(stored, name, full_shape(p, self.grid))
            out[f"model/{name}"] = local_pieces(p.detach(), p, self.grid)
            if m is None:
                continue
            out[f"model/{name}"] += self._pieces(m.hp_fragment, p, m, base)
            flat, start, n = self._partition(m)
            state = self._state.setdefault(id(flat), (flat, {}))[1]
            for key, md in optimizer_keys(stored, name):
                if tuple(md.size) == shape and shape:
                    buf = state.setdefault(key, torch.zeros_like(flat))
                    out[f"optim/{name}/{key}"] = self._pieces(buf.narrow(0, start, n), p, m, base)
                elif key not in state:
                    state[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
                    out[f"optim/{name}/{key}"] = [((0,) * len(md.size), state[key])]
        return out

    def commit(self) -> None:
        for flat, state in self._state.values():
            if state:
                self.opt.optimizer.state[flat] = state
