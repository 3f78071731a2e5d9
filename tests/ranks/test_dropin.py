"""The public drop-in API on Megatron-Core's own GPTModel, driven by a Megatron-LM style step.

A user's model: `GPTModel(TransformerConfig(...), transformer_layer_spec=get_lss_layer_spec(
layout=...))` built after `initialize_model_parallel(context_parallel_size=N)`, then
`prepare_lss_model(model, layout=...)`. The reference: Megatron's STOCK local GPT spec
(`get_gpt_layer_local_spec()`, its DotProductAttention) in one process, same seed, same batch.

Each rank reads its data replica's rows cut by the layout with GLOBAL position ids; zigzag is cut
by Megatron's own `get_batch_on_this_cp_rank` (and must be LSS's zigzag layout). Gradients take
Megatron-LM's path: `DistributedDataParallel` (built inside `kept_out_of_ddp`) and
`finalize_model_grads` average over data x context, then `finalize_position_grads` reduces the
position slices over the data group only. That must equal LSS's own double gradient averaging
(`GradientAverager`, on a second copy of the model) and the one-process model's gradients.

Tolerance 1e-5 (fp32 on CPU): the paths differ only in attention kernels and reduction order
(observed ~1e-7). Learned and RoPE positions, contiguous and zigzag, (N, D) = (2, 1) and (2, 2).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import TOL, run_ranks

SEED, SEQ, VOCAB, GLOBAL_BATCH = 11, 16, 64, 4


def _build(cp: int, pos: str, spec, seq: int = SEQ):
    """A user's GPTModel on the current parallel state (fp32, CPU init, no dropout)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(SEED)
    torch.manual_seed(SEED)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        context_parallel_size=cp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kind = "rope" if pos == "rope" else "learned_absolute"
    model = GPTModel(
        cfg,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=seq,
        position_embedding_type=kind,
    )
    return cfg, model


def _global_batch():
    import torch

    g = torch.Generator().manual_seed(SEED)
    seqs = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ)
    return {
        "tokens": seqs[:, :-1].clone(),
        "labels": seqs[:, 1:].clone(),
        "position_ids": pos.clone(),
    }


def _reference_worker(rank, world, positions):
    """One process, Megatron's stock local spec: per-token losses, gradients, weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from lss_megatron.compat import cpu

    cpu.apply()
    ps.initialize_model_parallel()
    out = {}
    for pos in positions:
        _, model = _build(1, pos, get_gpt_layer_local_spec())
        b = _global_batch()
        losses = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [G, l]
        losses.mean().backward()
        out[pos] = {
            "tokens": losses.detach().numpy().copy(),
            "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters()},
            "init": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
        }
    ps.destroy_model_parallel()
    return out


def _my_batch(layout: str):
    """This rank's replica rows, cut by the layout (zigzag: Megatron-LM's own cut)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from lss_megatron.lss.positions import local_positions

    d, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n, i = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    rows = {k: v.chunk(d, dim=0)[r].contiguous() for k, v in _global_batch().items()}
    mine = local_positions(SEQ, i, n, layout)  # [l/N]: LSS's layout
    if layout == "zigzag":
        cut = get_batch_on_this_cp_rank(dict(rows))
        # Megatron-LM's zig-zag slicing is exactly LSS's zigzag layout
        assert (cut["position_ids"] == mine).all(), (cut["position_ids"][0], mine)
        assert (cut["tokens"] == rows["tokens"][:, mine]).all()
        assert (cut["labels"] == rows["labels"][:, mine]).all()
        return cut
    return {k: v[:, mine].contiguous() for k, v in rows.items()}


def _megatron_step(cfg, model, batch):
    """Megatron-LM's way: DDP over data x context + finalize_model_grads, then the fix-up."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from lss_megatron.lss.grad_sync import finalize_position_grads, kept_out_of_ddp

    with kept_out_of_ddp(model):
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    losses = ddp(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    losses.mean().backward()
    finalize_model_grads([ddp])
    finalize_position_grads(ddp)
    return losses.detach(), {
        n: (p.main_grad if hasattr(p, "main_grad") else p.grad).clone()
        for n, p in model.named_parameters()
    }


def _lss_worker(rank, world, cases):
    from lss_megatron import get_lss_layer_spec, prepare_lss_model
    from lss_megatron.compat import cpu
    from lss_megatron.config import ParallelConfig
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.parallel.params import ROWS_ATTR

    cpu.apply()
    out = []
    for n, pos, layout in cases:
        par = ParallelConfig(mode="lss", world_size=world, seq_parallel=n, lss_layout=layout)
        grid = initialize_grid(par)  # Megatron's initialize_model_parallel(context_parallel_size=n)
        batch = _my_batch(layout)
        cfg, model = _build(n, pos, get_lss_layer_spec(layout=layout))
        prepare_lss_model(model, layout=layout)
        losses, meg_grads = _megatron_step(cfg, model, batch)
        _, ours = _build(n, pos, get_lss_layer_spec(layout=layout))  # the same weights
        try:  # forgetting prepare_lss_model is an error, not a silently wrong model
            ours(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            unprepared = "ran"
        except RuntimeError as e:
            unprepared = str(e)
        prepare_lss_model(ours)  # the layout comes from the spec: one source of truth
        ours(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean().backward()
        GradientAverager(ours, grid)()
        slices = {
            name: getattr(p, ROWS_ATTR).numpy()
            for name, p in model.named_parameters()
            if hasattr(p, ROWS_ATTR)
        }
        out.append(
            {
                "case": (n, pos, layout),
                "data_rank": grid.data_rank,
                "data_size": grid.data_size,
                "positions": batch["position_ids"][0].numpy(),
                "tokens": losses.numpy(),
                "megatron": {k: v.numpy() for k, v in meg_grads.items()},
                "ours": {k: p.grad.numpy().copy() for k, p in ours.named_parameters()},
                "init": {k: p.detach().numpy().copy() for k, p in model.named_parameters()},
                "rows": slices,
                "unprepared": unprepared,
            }
        )
        destroy_grid()
    return out


POSITIONS = ("learned", "rope")
CASES2 = [(2, p, lay) for p in POSITIONS for lay in ("contiguous", "zigzag")]
CASES4 = [(2, "learned", "zigzag"), (2, "rope", "contiguous")]  # N = 2, D = 2


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_reference_worker, 1, POSITIONS, timeout=120)[0]


def _runs(world, cases) -> dict:
    out: dict = {}
    for per_rank in run_ranks(_lss_worker, world, cases, timeout=400):
        for r in per_rank:
            out.setdefault(r["case"], []).append(r)
    return out


@pytest.fixture(scope="module")
def runs2():
    return _runs(2, CASES2)


@pytest.fixture(scope="module")
def runs4():
    return _runs(4, CASES4)


def _check(ref, ranks):
    for r in ranks:
        n, pos, layout = r["case"]
        tag = f"N={n} D={r['data_size']} {pos} {layout} data_rank={r['data_rank']}"
        assert "call prepare_lss_model(model)" in r["unprepared"], (tag, r["unprepared"])
        per = GLOBAL_BATCH // r["data_size"]
        rows = slice(r["data_rank"] * per, (r["data_rank"] + 1) * per)
        ref_tok = ref["tokens"][rows][:, r["positions"]]  # the reference at this rank's positions
        assert r["tokens"].shape == ref_tok.shape, tag
        err = np.abs(r["tokens"] - ref_tok).max()
        assert err < TOL, f"{tag}: per-token losses max error {err:.2e}"
        assert set(r["megatron"]) == set(ref["grads"]), tag
        for name, ref_g in ref["grads"].items():
            want_w, want_g = ref["init"][name], ref_g
            if name in r["rows"]:  # a position slice: the rows of the global positions held here
                want_w, want_g = want_w[r["rows"][name]], want_g[r["rows"][name]]
            assert np.array_equal(r["init"][name], want_w), f"{tag}: initial {name} differs"
            for path in ("megatron", "ours"):
                err = np.abs(r[path][name] - want_g).max()
                assert err < TOL, f"{tag}: {path} gradient {name} max error {err:.2e}"
            err = np.abs(r["megatron"][name] - r["ours"][name]).max()
            assert err < TOL, f"{tag}: Megatron-LM step vs double averaging, {name}: {err:.2e}"
        if pos == "learned":
            assert list(r["rows"]) == ["embedding.position_embeddings.weight"], tag
        else:
            assert not r["rows"], f"{tag}: RoPE adds no sequence-local parameter"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n,pos,layout", CASES2)
def test_public_api_matches_stock_megatron_one_process(reference, runs2, n, pos, layout):
    """2 ranks: per-token losses and every gradient (Megatron-LM's step and ours) = one process."""
    _check(reference[pos], runs2[(n, pos, layout)])


@pytest.mark.timeout(600)
@pytest.mark.slow  # one 4-rank spawn (~13 s idle); the 2-rank drop-in check stays in the fast tier
@pytest.mark.parametrize("n,pos,layout", CASES4)
def test_megatron_lm_step_with_data_parallel(reference, runs4, n, pos, layout):
    """N = 2 x D = 2: the position fix-up averages each slice over its data group only."""
    _check(reference[pos], runs4[(n, pos, layout)])


# --- refusals -----------------------------------------------------------------------------------
def _refusal_worker(rank, world):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from lss_megatron import get_lss_layer_spec, prepare_lss_model
    from lss_megatron.compat import cpu

    cpu.apply()
    ps.initialize_model_parallel(context_parallel_size=world)
    seen = {}

    def expect(key, exc, fn):
        try:
            fn()
        except exc as e:
            seen[key] = str(e)
        else:
            seen[key] = None

    expect("bad layout spec", ValueError, lambda: get_lss_layer_spec(layout="diagonal"))
    expect(
        "bad layout prepare",
        ValueError,
        lambda: prepare_lss_model(
            _build(world, "learned", get_lss_layer_spec())[1], layout="diagonal"
        ),
    )
    expect(
        "stock spec",
        ValueError,
        lambda: prepare_lss_model(_build(1, "learned", get_gpt_layer_local_spec())[1]),
    )
    expect(
        "layout mismatch",
        ValueError,
        lambda: prepare_lss_model(
            _build(world, "rope", get_lss_layer_spec(layout="zigzag"))[1], layout="contiguous"
        ),
    )
    expect(
        "cp mismatch",
        ValueError,
        lambda: prepare_lss_model(_build(1, "learned", get_lss_layer_spec())[1]),
    )
    expect(
        "length",
        ValueError,
        lambda: prepare_lss_model(
            _build(world, "rope", get_lss_layer_spec(layout="zigzag"), seq=18)[1], layout="zigzag"
        ),
    )
    expect("kv chunks", ValueError, lambda: _build(world, "rope", get_lss_layer_spec(kv_chunks=3)))
    expect("bad save_kv spec", ValueError, lambda: get_lss_layer_spec(save_kv="cpu"))
    expect(
        "overlap mismatch",
        ValueError,
        lambda: prepare_lss_model(
            _build(world, "learned", get_lss_layer_spec(overlap=True))[1], overlap=False
        ),
    )
    expect("overlap dense", ValueError, lambda: get_lss_layer_spec(overlap=True, kernel="dense"))
    expect(
        "local with dense", ValueError, lambda: get_lss_layer_spec(save_kv="local", kernel="dense")
    )
    expect(
        "save_kv mismatch",
        ValueError,
        lambda: prepare_lss_model(
            _build(world, "learned", get_lss_layer_spec(save_kv="local"))[1], save_kv="gathered"
        ),
    )
    expect("not a GPTModel", TypeError, lambda: prepare_lss_model(torch.nn.Linear(2, 2)))
    _, model = _build(world, "learned", get_lss_layer_spec())
    prepare_lss_model(model)
    expect("twice", RuntimeError, lambda: prepare_lss_model(model))
    seg = SEQ // world
    local = torch.arange(seg).expand(2, seg)  # LOCAL position ids: wrong on every rank but 0
    tokens = torch.zeros(2, seg, dtype=torch.long)
    if rank > 0:
        expect("local positions", IndexError, lambda: model(tokens, local, None))
    short = torch.arange(seg // 2).expand(2, seg // 2) + rank * seg
    expect("short batch", ValueError, lambda: model(tokens[:, : seg // 2], short, None))
    ps.destroy_model_parallel()
    return seen


@pytest.mark.timeout(300)
def test_prepare_refuses_what_it_cannot_make_exact():
    """Every refusal is a clear error naming the problem, on every rank."""
    fragments = {
        "bad layout spec": "'diagonal' is not one of",
        "bad layout prepare": "'diagonal' is not one of",
        "stock spec": "get_lss_layer_spec",
        "layout mismatch": "get_lss_layer_spec(layout='zigzag')",
        "cp mismatch": "context_parallel_size=1",
        "length": "divisible by 2N = 4",
        "kv chunks": "kv_chunks 3 does not divide",
        "bad save_kv spec": "save_kv 'cpu' is not one of",
        "overlap mismatch": "get_lss_layer_spec(overlap=True)",
        "overlap dense": "overlap needs kernel='flash'",
        "local with dense": "needs kernel='flash'",
        "save_kv mismatch": "get_lss_layer_spec(save_kv='local')",
        "not a GPTModel": "GPTModel, got Linear",
        "twice": "already prepared",
        "local positions": "outside this rank's rows",
        "short batch": "max_sequence_length = 16",
    }
    for rank, seen in enumerate(run_ranks(_refusal_worker, 2, timeout=200)):
        for key, fragment in fragments.items():
            if key == "local positions" and rank == 0:
                continue
            assert seen.get(key) is not None, f"rank {rank}: {key} was not refused"
            assert fragment in seen[key], f"rank {rank}: {key}: {seen[key]}"
