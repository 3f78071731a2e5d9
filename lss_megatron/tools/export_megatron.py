"""``python -m lss_megatron.tools.export_megatron --load CK --out DIR [--tensor-model-parallel-size T]``:
write a checkpoint of ours as a Megatron-LM checkpoint (legacy torch format; training/megatron_ckpt.py).

Our checkpoints are canonical (the one-process model's full tensors, whatever N, T, D and mode
wrote them; LSS position slices are stored as rows of the full table), so the export is the same
for every layout: read the full tensors, cut them into T tensor-parallel shards as Megatron's
layers split them (each parameter's ``partition_dim``), and write ``args`` with Megatron-LM's
names so ``--use-checkpoint-args`` (or the same flags) builds the same model. Load it in
Megatron-LM with ``--load DIR --no-load-optim --no-load-rng`` (or ``--finetune``); the trainer's own
``--load DIR`` takes it back (optimizer state starts fresh: Megatron's is not ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..resources import prog

PROG = prog("python -m lss_megatron.tools.export_megatron")


def megatron_args(cfg: dict, tp: int, iteration: int) -> argparse.Namespace:
    """Megatron-LM's names for the model our checkpoint's effective config `cfg` describes."""
    m, t = cfg["model"], cfg["train"]
    return argparse.Namespace(
        num_layers=m["num_layers"],
        hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"],
        num_attention_heads=m["num_heads"],
        num_query_groups=m["num_kv_heads"],
        group_query_attention=m["num_kv_heads"] != m["num_heads"],
        kv_channels=m["head_dim"],
        seq_length=m["seq_length"],
        max_position_embeddings=m["seq_length"],
        padded_vocab_size=m["padded_vocab_size"],
        make_vocab_size_divisible_by=m["make_vocab_size_divisible_by"],
        position_embedding_type="learned_absolute"
        if m["position_embedding"] == "learned"
        else "rope",
        normalization="LayerNorm",
        add_bias_linear=True,
        untie_embeddings_and_output_weights=True,
        transformer_impl="local",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        bf16=t["dtype"] == "bf16",
        fp16=t["dtype"] == "fp16",
        iteration=iteration,
        consumed_train_samples=iteration * t["global_batch_size"],
        consumed_valid_samples=0,
    )


def partition_dims(model_cfg: dict) -> dict[str, int | None]:
    """Each parameter's tensor-parallel ``partition_dim`` (None: replicated), read from the stock
    one-process model of `model_cfg` (Megatron sets the attributes at any TP size)."""
    import os
    import tempfile

    import torch.distributed as dist

    from ..compat import cpu
    from ..config import ModelConfig, ParallelConfig
    from ..model import build_model
    from ..parallel.grid import destroy_grid, initialize_grid

    cpu.apply()
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in model_cfg.items() if k in fields})
    owned = not dist.is_initialized()
    if owned:
        store = os.path.join(tempfile.mkdtemp(prefix="lss-export-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        grid = initialize_grid(ParallelConfig(mode="serial", world_size=1))
        gpt = build_model(model, grid, mode="serial", seed=0)
        dims = {
            name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for name, p in gpt.named_parameters()
        }
        destroy_grid()
    finally:
        if owned:
            dist.destroy_process_group()
    return dims


def read_canonical(path: Path) -> dict:
    """The full tensors of every ``model/<name>`` key of our checkpoint at `path`."""
    import torch

    from ..training import sharded

    stored = sharded.read_metadata(path)
    full, targets = {}, {}
    for key, md in stored.state_dict_metadata.items():
        if key.startswith("model/") and hasattr(md, "size"):
            t = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            full[key[len("model/") :]] = t
            targets[key] = [((0,) * t.dim(), t)]
    sharded.read_shards(path, stored, targets)
    return full


def export(load: str, out: str, tp: int = 1) -> Path:
    """Export the checkpoint `--load` resumes from into `out`; returns the iteration folder."""
    from ..runs import latest_checkpoint
    from ..training.checkpoint import read_meta
    from ..training.megatron_ckpt import write

    path, _ = latest_checkpoint(load)
    if path is None:
        raise ValueError(f"--load {load}: no complete checkpoint there")
    meta = read_meta(path)
    cfg = meta.get("config", {})
    full = read_canonical(path)
    dims = partition_dims(cfg["model"])
    missing, extra = sorted(set(dims) - set(full)), sorted(set(full) - set(dims))
    if missing or extra:
        raise ValueError(f"--load {path}: parameters missing {missing}, unexpected {extra}")
    return write(out, meta["step"], full, dims, tp, megatron_args(cfg, tp, meta["step"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, metavar="CK", help="our checkpoint folder (or step)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder for Megatron-LM")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        metavar="T",
        help="tensor-parallel ranks of the Megatron-LM run (mp_rank_00 .. T-1; default 1)",
    )
    args = p.parse_args(argv)
    if args.tensor_model_parallel_size < 1:
        p.error(f"--tensor-model-parallel-size must be >= 1, got {args.tensor_model_parallel_size}")
    from ..training.checkpoint import CheckpointError

    try:
        folder = export(args.load, args.out, args.tensor_model_parallel_size)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {folder} ({args.tensor_model_parallel_size} tensor-parallel file(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
