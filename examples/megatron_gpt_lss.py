"""LSS in a plain Megatron-Core training step: what README.md's "In Megatron-Core" section shows.

    python examples/megatron_gpt_lss.py                                  # 1 process
    torchrun --nproc-per-node 2 examples/megatron_gpt_lss.py --layout zigzag --positions rope
    torchrun --nproc-per-node 4 examples/megatron_gpt_lss.py --context-parallel 2   # N=2, D=2
    torchrun --nproc-per-node 2 examples/megatron_gpt_lss.py --attention ring       # the ring

Megatron-Core's own `GPTModel`, built from `get_lss_layer_spec(layout=...)` on a context-parallel
group of N ranks, then `prepare_lss_model(model, layout=...)`; with ``--attention ring``, ring
attention's pair, `get_ring_layer_spec(layout=...)` and `prepare_ring_model(model, layout=...)`
(`lss_megatron.baselines.ring`), in exactly the same places: nothing else changes. Each rank reads its part of every
sequence, cut by the layout with GLOBAL position ids (zigzag is Megatron's own
`get_batch_on_this_cp_rank`), and the step is Megatron's: `DistributedDataParallel` and
`finalize_model_grads` average gradients over data x context, plus LSS's position fix-up
(docs/megatron-lm.md). Plain SGD updates the weights (Megatron's optimizers need CUDA).

`--out FILE` (rank 0) writes the per-token losses of every step in global order, [steps, G, l],
as JSON: the same file from 1 process and from N ranks agrees to fp32 rounding
(tests/e2e/test_example.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--attention", choices=("lss", "ring"), default="lss")
    p.add_argument("--positions", choices=("learned", "rope"), default="learned")
    p.add_argument("--context-parallel", type=int, default=None, help="N (default: all ranks)")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--out", default=None, help="per-token losses of every step (JSON, rank 0)")
    return p.parse_args(argv)


def init_distributed() -> None:
    """torchrun's environment, or a one-process group of our own."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def build(args, cp: int):
    """Megatron's parallel state, and an LSS GPTModel on its context-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_megatron.compat import cpu

    if args.attention == "ring":
        from lss_megatron.baselines.ring import get_ring_layer_spec as layer_spec
        from lss_megatron.baselines.ring import prepare_ring_model as prepare
    else:
        from lss_megatron import get_lss_layer_spec as layer_spec
        from lss_megatron import prepare_lss_model as prepare

    cpu.apply()  # Megatron-Core on a machine without CUDA; does nothing when CUDA is present
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        context_parallel_size=cp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(layout=args.layout),
        vocab_size=128,
        max_sequence_length=args.seq_length,
        position_embedding_type="rope" if args.positions == "rope" else "learned_absolute",
    )
    prepare(model, layout=args.layout)
    return config, model.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


def wrap(config, model):
    """Megatron's DDP over data x context; the position slices stay out of it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from lss_megatron.lss.grad_sync import kept_out_of_ddp

    with kept_out_of_ddp(model):
        return DistributedDataParallel(config, DistributedDataParallelConfig(), model)


def global_batch(args, step: int):
    """The same G sequences on every rank: tokens, labels (shifted globally), global positions."""
    g = torch.Generator().manual_seed(step)
    seqs = torch.randint(0, 128, (args.global_batch, args.seq_length + 1), generator=g)
    positions = torch.arange(args.seq_length).expand(args.global_batch, -1)  # [G, l]
    return {"tokens": seqs[:, :-1], "labels": seqs[:, 1:], "position_ids": positions}


def my_part(batch: dict, layout: str, device) -> dict:
    """This rank's rows (its data replica) and positions (its segment) of the global batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    d, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = {k: v.chunk(d, dim=0)[r].contiguous() for k, v in batch.items()}  # [G/D, l]
    if layout == "zigzag":  # chunks n and 2N-1-n: Megatron-LM's own cut
        return {k: v.to(device) for k, v in get_batch_on_this_cp_rank(rows).items()}
    n, i = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    return {k: v.chunk(n, dim=1)[i].contiguous().to(device) for k, v in rows.items()}  # [., l/N]


def train_step(ddp, batch: dict, lr: float) -> torch.Tensor:
    """Forward, backward, Megatron's gradient finalisation plus the position fix-up, SGD."""
    from megatron.core.distributed import finalize_model_grads

    from lss_megatron.lss.grad_sync import finalize_position_grads

    ddp.zero_grad_buffer()
    for p in ddp.parameters():
        p.grad = None
    losses = ddp(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, l/N]
    losses.float().mean().backward()  # this rank's mean: every rank holds as many tokens
    finalize_model_grads([ddp])  # average over data x context (and TP sums)
    finalize_position_grads(ddp)  # position slices: over the data group only, 1/(N D)
    with torch.no_grad():
        for p in ddp.parameters():
            p -= lr * (p.main_grad if hasattr(p, "main_grad") else p.grad)
    return losses.detach()


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    init_distributed()
    cp = args.context_parallel or dist.get_world_size()
    config, model = build(args, cp)
    ddp = wrap(config, model)
    device = next(model.parameters()).device
    record = []
    for step in range(1, args.steps + 1):
        batch = global_batch(args, step)
        mine = my_part(batch, args.layout, device)
        losses = train_step(ddp, mine, args.lr)
        # put every rank's per-token losses back at their global (row, position)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (mine["position_ids"].cpu(), losses.cpu(), _rows(args)))
        full = torch.zeros(args.global_batch, args.seq_length)
        for pos, loss, rows in parts:
            full[rows[0] : rows[1]].scatter_(1, pos, loss.float())
        record.append(full.tolist())
        if dist.get_rank() == 0:
            print(f"step {step}: loss {full.mean().item():.6f}", flush=True)
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "per_token_losses": record,
                    "ranks": dist.get_world_size(),
                    "context_parallel": cp,
                    "layout": args.layout,
                },
                f,
            )
    dist.destroy_process_group()


def _rows(args) -> tuple[int, int]:
    """The global batch rows of this rank's data replica."""
    from megatron.core import parallel_state as ps

    per = args.global_batch // ps.get_data_parallel_world_size()
    return ps.get_data_parallel_rank() * per, (ps.get_data_parallel_rank() + 1) * per


if __name__ == "__main__":
    main()
