"""Every mode's per-rank layer work on ONE device: what rank r of P does for one layer.

NCCL cannot put two ranks on one GPU, so a one-GPU check cannot run P ranks. It can run what ONE
rank runs: `emulated_rank(mode, n, r)` makes this process rank r of n on torch's ``fake``
process-group backend (every collective returns at once and moves nothing) and builds Megatron's
groups for the mode at degree n on it; `build_layer` then builds the mode's own transformer layer
(`modes.get_mode(mode).layer_spec`, Megatron's `build_module`, the trainer's `TransformerConfig`
in bf16) there, so rank r holds exactly the shards it holds in training (nvidia-sp: 1/N of QKV,
projection and MLP; lss, ulysses: every weight) and runs exactly its kernels on its shard sizes:
nvidia-sp attends over all l tokens on h/N heads, lss its l/N queries against all l keys from
the rank's global offset, ulysses all l tokens on h/N heads after its all-to-alls.

`emulate_row` times one layer's forward + backward of one (variant, rank) after warm-up
(`timing.time_reps`: CUDA events on a GPU, median and min of every rep), records the fused
SDPA kernels it ran (forward and backward), and counts the bytes its collectives WOULD move
(`parallel.comm.record()` reads them from the arguments, by the counters' own formulas). Those
bytes are priced with the link figures of `costmodel.hw` (DGX H100: NVLink inside a node,
NDR InfiniBand with one rank per node) as MODELLED communication time, and the cost model's
prediction for the same layer (`predicted_layer`) stands beside it. tests/ranks/test_emulate.py
checks the emulated shards and bytes against the trainer's own model on real gloo ranks.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lss_megatron.modes import MODES

from .costmodel import config_from_model, predict
from .costmodel.counts import mode_of
from .costmodel.hw import DEVICES
from .timing import kernels_seen, time_reps

BF16 = torch.bfloat16


@dataclass(frozen=True)
class Variant:
    """One row family: a trainer mode and the options that change its per-rank work."""

    mode: str
    layout: str = "contiguous"
    causal_ranks: bool = False
    """Ranks do unequal causal work (contiguous LSS, zigzag LSS, ring): take the first, middle and
    last rank; otherwise every rank does the same work and rank 0 stands for all."""
    options: tuple = ()
    """((name, value), ...): mode options beyond the layout, by their `parallel.grid.Grid`
    field, which is also the cost model's `make_config` flag (e.g. ``("lss_save_kv",
    "local")``)."""


VARIANTS = {
    "lss": Variant("lss", causal_ranks=True),
    "lss-zigzag": Variant("lss", "zigzag", causal_ranks=True),
    "ulysses": Variant("ulysses"),
    "nvidia-sp": Variant("nvidia-sp"),
    # ring attention (issue 22), as soon as the registry holds its mode (checked against the
    # ring branch's mode: 18,432 counted bytes = the cost model's at the dry shape, every rank)
    **({"ring": Variant("ring", causal_ranks=True)} if "ring" in MODES else {}),
    # one line each once on main: LSS's K/V kept local and overlapped gathers (issue 21):
    # "lss-localkv": Variant("lss", causal_ranks=True, options=(("lss_save_kv", "local"),)),
    # "lss-overlap": Variant("lss", causal_ranks=True, options=(("lss_overlap", True),)),
}
"""The emulated variants: each at the same degree P with its own legal layout."""


@dataclass(frozen=True)
class LayerShape:
    """The stated model and the equal layout every variant runs at (degree n = P)."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    seq_length: int
    n: int
    micro_batch: int = 1
    layers: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "gpu": LayerShape(hidden=4096, heads=32, kv_heads=8, ffn=16384, seq_length=65536, n=8),
    "dry": LayerShape(hidden=64, heads=8, kv_heads=4, ffn=256, seq_length=64, n=4, vocab=64),
}
"""gpu: h 32, h_kv 8, d 128, E 4096, F 4E, l 64K on P = 8 (l/N = 8K), b 1; dry: a toy of the same
form for the CPU (N = 4, so first, middle and last ranks differ)."""


def ranks_of(variant: Variant, n: int) -> list[int]:
    return sorted({0, n // 2, n - 1}) if variant.causal_ranks else [0]


def rank_label(rank: int, n: int) -> str:
    return "first" if rank == 0 else "last" if rank == n - 1 else "middle"


def model_config(shape: LayerShape, layers: int = 1):
    from lss_megatron.config import ModelConfig

    return ModelConfig(
        num_layers=layers,
        hidden_size=shape.hidden,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        ffn_hidden_size=shape.ffn,
        seq_length=shape.seq_length,
        vocab_size=shape.vocab,
        position_embedding="rope",
    )


RECEIVE_BUFFERS = {"irecv": "tensor", "recv": "tensor", "broadcast": "tensor"}
"""`torch.distributed`'s primitives whose receive buffer torch's ``fake`` backend leaves as the
caller allocated it, and that buffer's argument (the first): the point-to-point receives (the
ring's shifts) and a broadcast's receivers. Its gathers, reduce-scatters and all-to-alls write
their outputs (copies of the input), so they need nothing (tests/unit/test_gpu_check.py checks
both)."""


def defined_receive(name: str, fn):
    """`fn` (the primitive `name` of `RECEIVE_BUFFERS`) zeroing its receive buffer first: the
    fake backend delivers nothing, and a buffer allocated uninitialised (``torch.empty_like``)
    may hold non-finite bits on the device, which would make the emulated rank's output
    non-finite. A real backend writes the whole buffer, so the rank's kernels see finite values
    of the same shapes either way. A broadcast's source keeps its tensor."""
    key = RECEIVE_BUFFERS[name]

    def receive(*args, **kwargs):
        buf = args[0] if args else kwargs[key]
        src = args[1] if len(args) > 1 else kwargs.get("src")
        if name != "broadcast" or src != dist.get_rank():
            buf.zero_()
        return fn(*args, **kwargs)

    receive.__wrapped__ = fn
    return receive


@contextlib.contextmanager
def emulated_rank(variant: Variant, n: int, rank: int):
    """This process as rank `rank` of `n` on the ``fake`` backend, with Megatron's groups for
    the variant's mode at degree n (tagged ``sp`` as the trainer tags them); yields the rank's
    `parallel.grid.Grid`. Inside, every receive buffer starts zeroed (`defined_receive`, over
    `RECEIVE_BUFFERS`). Torch.distributed must not be initialised already."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lss_megatron.compat import cpu
    from lss_megatron.modes import get_mode
    from lss_megatron.parallel import comm, recording
    from lss_megatron.parallel.grid import Grid

    if dist.is_initialized():
        raise RuntimeError("emulated_rank: torch.distributed is already initialised here")
    cpu.apply()
    rules = get_mode(variant.mode)
    tp, cp = rules.tensor_parallel(n, 1), rules.context_parallel(n)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=n)
    try:
        with recording.primitives_wrapped(defined_receive, RECEIVE_BUFFERS):
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                context_parallel_size=cp,
                create_gloo_process_groups=False,  # the fake backend has no gloo twin
            )
            model_parallel_cuda_manual_seed(1234)  # Megatron's RNG tracker, as the trainer seeds it
            grid = Grid(
                rank=rank,
                world_size=n,
                seq_group=ps.get_context_parallel_group(),
                seq_rank=ps.get_context_parallel_rank(),
                seq_size=cp,
                data_group=ps.get_data_parallel_group(),
                data_rank=0,
                data_size=1,
                grad_group=ps.get_data_parallel_group(with_context_parallel=True),
                tp_group=ps.get_tensor_model_parallel_group(),
                tp_rank=ps.get_tensor_model_parallel_rank(),
                tp_size=tp,
                layout=variant.layout,
                **dict(variant.options),
            )
            comm.tag_group(grid.seq_group, "sp")
            comm.tag_group(grid.tp_group, "sp")
            yield grid
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def build_layer(variant: Variant, shape: LayerShape, grid, device: torch.device):
    """The mode's own transformer layer (its layer spec, Megatron's `build_module`, the
    trainer's bf16 `TransformerConfig`) on this rank, on `device` in bf16. Weights are drawn on
    the device (N(0, 0.02), norms 1, biases 0): the timing needs finite values, not the
    trainer's seeded ones, and a full-size CPU draw per row would cost seconds."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from lss_megatron.compat import cpu
    from lss_megatron.model import transformer_config
    from lss_megatron.modes import get_mode

    cpu.apply()
    model = model_config(shape)
    spec = get_mode(variant.mode).layer_spec(model, grid, "flash")
    if isinstance(spec, TransformerBlockSubmodules):  # nvidia-sp: block submodules
        spec = spec.layer_specs[0]
    cfg = transformer_config(
        model,
        context_parallel=grid.seq_size,
        tensor_parallel=grid.tp_size,
        sequence_parallel=get_mode(variant.mode).sequence_parallel or grid.tp_size > 1,
        dtype="bf16",
    )
    cfg.perform_initialization = False  # drawn below, on the device
    layer = build_module(spec, config=cfg, layer_number=1).to(device=device, dtype=BF16)
    core = layer.self_attention.core_attention
    if hasattr(core, "prepared"):  # LSS: what `prepare_lss_model` does for a GPTModel, the
        core.prepared = True  # emulation does itself: it feeds the rank's global RoPE angles
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return layer


def layer_shapes(label: str, shape: LayerShape, rank: int) -> dict[str, list[int]]:
    """{parameter name: shape} of the layer `emulate_row` builds for this (variant, rank), on
    the CPU, without running it."""
    variant = VARIANTS[label]
    with emulated_rank(variant, shape.n, rank) as grid:
        layer = build_layer(variant, shape, grid, torch.device("cpu"))
        return {name: list(p.shape) for name, p in layer.named_parameters()}


def rope_embedding(shape: LayerShape, grid, device: torch.device) -> torch.Tensor:
    """RoPE angles of the tokens this rank's attention sees, [tokens, 1, 1, d] fp32: the rank's
    global positions for the sequence-split modes (`lss.positions.local_positions`), all l for
    nvidia-sp (its attention runs after the sequence all-gather)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from lss_megatron.lss.positions import local_positions

    rope = RotaryEmbedding(kv_channels=shape.head_dim, rotary_percent=1.0)
    full = rope.get_emb(shape.seq_length).to(device)  # [l, 1, 1, d]
    if grid.seq_size == 1:
        return full
    pos = local_positions(shape.seq_length, grid.seq_rank, grid.seq_size, grid.layout)
    return full.index_select(0, pos.to(device))  # [l/N, 1, 1, d]


def _links(n: int) -> dict:
    """(network, stride) of the priced links: the sequence / tensor group inside one DGX H100
    node (NVLink), or spread one rank per node (InfiniBand NDR, a node's NICs shared by its 8
    groups)."""
    net = DEVICES["h100"].network
    return {"nvlink": (net, 1), "infiniband": (net, net.gpus_per_node)}


_NET_OPS = {"all_gather", "reduce_scatter", "all_reduce", "all_to_all"}


def modelled_comm_seconds(calls: dict, nbytes: dict, n: int) -> dict:
    """MODELLED seconds of the counted collectives ({op: calls}, {op: bytes this rank sends}) on
    each link of `_links`: the cost model's alpha-beta time per call (`hw.Network.time`)."""
    out = {}
    for link, (net, stride) in _links(n).items():
        total = 0.0
        for op, c in calls.items():
            kind = op if op in _NET_OPS else "p2p"
            total += c * net.time(kind, nbytes[op] / c, n, stride)
        out[link] = total
    return out


def config_flags(variant: Variant) -> dict:
    """The variant's options as the cost model's `make_config` flags: the layout (where the
    mode takes one) and `Variant.options`."""
    layout = {"lss_layout": variant.layout} if "lss_layout" in mode_of(variant.mode).options else {}
    return {**layout, **dict(variant.options)}


def predicted_layer(variant: Variant, shape: LayerShape, device: str) -> dict:
    """The cost model's time for ONE layer of one micro-batch (forward + backward) on the
    slowest rank: its per-micro-batch terms at 2 layers minus at 1 layer (embedding, logits,
    gradient sync and optimizer cancel), and its sp bytes for that layer."""

    def at(layers: int) -> dict:
        cfg = config_from_model(
            variant.mode,
            shape.n,
            1,
            model_config(shape, layers),
            global_batch_size=shape.micro_batch,
            micro_batch_size=shape.micro_batch,
            dtype="bf16",
            **config_flags(variant),
        )
        return predict(cfg, device=device)

    one, two = at(1), at(2)
    terms = ("gemm", "attention", "elementwise", "sp_comm_exposed")
    layer = {k: two["time_breakdown_s"][k] - one["time_breakdown_s"][k] for k in terms}
    return {
        "device": two["device"],
        "compute_s": layer["gemm"] + layer["attention"] + layer["elementwise"],
        "sp_comm_s": layer["sp_comm_exposed"],
        "total_s": sum(layer.values()),
        "terms_s": layer,
        "sp_bytes": two["sp_comm_bytes"] - one["sp_comm_bytes"],
        "attention_efficiency": two["attention_efficiency"],
        "rank": "slowest",
    }


def attention_pairs(variant: Variant, shape: LayerShape, rank: int) -> int:
    """(query, key) pairs this rank's attention visits per head and sequence (causal)."""
    from lss_megatron.layout import attended_pairs

    if mode_of(variant.mode).costs.local_queries:  # l/N queries against all keys
        return attended_pairs(shape.seq_length, rank, shape.n, True, variant.layout)
    return attended_pairs(shape.seq_length, 0, 1, True)  # all l queries on this rank's heads


def emulate_row(
    label: str,
    shape: LayerShape,
    rank: int,
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    predict_device: str = "h100",
) -> dict:
    """One (variant, rank) row: the layer's shards, its timed forward + backward, its SDPA
    kernels, its counted collective bytes, their modelled time and the cost model beside it."""
    from lss_megatron.parallel import comm

    variant = VARIANTS[label]
    n = shape.n
    with emulated_rank(variant, n, rank) as grid:
        layer = build_layer(variant, shape, grid, device)
        emb = rope_embedding(shape, grid, device)
        gen = torch.Generator(device="cpu").manual_seed(rank)
        x = torch.randn(shape.seq_length // n, shape.micro_batch, shape.hidden, generator=gen)
        x = x.to(device, BF16).requires_grad_()  # [l/N, b, E]: the residual stream a rank holds
        dout = torch.randn(x.shape, generator=gen).to(device, BF16)
        outs = {}

        def step():
            out = layer(x, attention_mask=None, rotary_pos_emb=emb)[0]  # [l/N, b, E]
            out.backward(dout)
            outs["finite"] = out

        with comm.record() as log:  # one untimed step: the bytes its collectives would move
            kernels = kernels_seen(step)
        finite = bool(torch.isfinite(outs.pop("finite")).all())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = time_reps(step, device, warmup=warmup, reps=reps)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        shapes = {name: list(p.shape) for name, p in layer.named_parameters()}
    calls = {op: c for (op, _), c in log.calls.items()}
    nbytes = {op: b for (op, _), b in log.bytes.items()}
    categories = sorted({cat for _, cat in log.calls})
    median = statistics.median(times)
    comm_s = modelled_comm_seconds(calls, nbytes, n)
    return {
        "variant": label,
        "mode": variant.mode,
        "layout": variant.layout,
        "n": n,
        "rank": rank,
        "rank_label": rank_label(rank, n),
        "local_tokens": shape.seq_length // n,
        "attention_pairs_per_head": attention_pairs(variant, shape, rank),
        "param_shapes": shapes,
        "params": sum(int(torch.Size(s).numel()) for s in shapes.values()),
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "warmup": warmup,
        "peak_mem_bytes": peak,
        "output_finite": finite,
        "kernels": kernels,
        "comm_calls": calls,
        "comm_bytes": nbytes,
        "comm_categories": categories,
        "sp_bytes": sum(nbytes.values()),
        "modelled_comm_s": comm_s,
        "measured_compute_plus_modelled_comm_s": {k: median + v for k, v in comm_s.items()},
        "cost_model": predicted_layer(variant, shape, predict_device),
    }


def plan(shape: LayerShape, variants=None) -> list[tuple[str, int]]:
    """(variant, rank) of every row, in order."""
    return [
        (label, r) for label in (variants or VARIANTS) for r in ranks_of(VARIANTS[label], shape.n)
    ]


def table(rows: list[dict]) -> str:
    """The printed comparison: measured compute, MODELLED communication (NVLink, IB), their sum,
    and the cost model's per-layer prediction (slowest rank) beside it."""
    head = (
        f"{'variant':<11}{'rank':>8}{'fwd+bwd ms':>12}{'min ms':>9}{'sp MiB':>9}"
        f"{'NVL ms*':>9}{'IB ms*':>9}{'tot NVL':>9}{'tot IB':>9}{'model ms':>10}"
        f"{'model comm':>11}  kernels fwd/bwd"
    )
    lines = [head]
    for r in rows:
        m = r["cost_model"]
        k = r["kernels"]
        lines.append(
            f"{r['variant']:<11}{r['rank_label'] + str(r['rank']):>8}"
            f"{r['median_s'] * 1e3:>12.2f}{r['min_s'] * 1e3:>9.2f}{r['sp_bytes'] / 2**20:>9.2f}"
            f"{r['modelled_comm_s']['nvlink'] * 1e3:>9.2f}"
            f"{r['modelled_comm_s']['infiniband'] * 1e3:>9.2f}"
            f"{r['measured_compute_plus_modelled_comm_s']['nvlink'] * 1e3:>9.2f}"
            f"{r['measured_compute_plus_modelled_comm_s']['infiniband'] * 1e3:>9.2f}"
            f"{m['total_s'] * 1e3:>10.2f}{m['sp_comm_s'] * 1e3:>11.2f}"
            f"  {'+'.join(k['forward'])}/{'+'.join(k['backward'])}"
        )
    lines.append(
        "* modelled: counted bytes priced at DGX H100 links (costmodel.hw); 'model' = the cost "
        f"model's layer time on the slowest rank ({rows[0]['cost_model']['device'] if rows else ''})"
    )
    return "\n".join(lines)
