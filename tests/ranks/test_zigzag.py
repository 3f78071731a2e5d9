"""Zigzag LSS layout (causal load balance): rank n holds chunks n and 2N-1-n of l/(2N) tokens.

Exactness as for the contiguous layout (fp32 on CPU, 1e-5: only accumulation order differs from
the one-process reference): the operator against full attention, and the GPT model's loss, every
gradient and the per-token losses against the one-process Megatron model. The trainer's losses
against serial and the balance itself (per-rank attention FLOPs, analytic from the attended
pairs: max/mean 1.0 under zigzag, > 1
under contiguous segments): tests/e2e/test_zigzag.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import attention_inputs, reference_attention, run_ranks

TOL = 1e-5


def _local_index(seq_length, rank, world):
    from lss_megatron.lss.positions import local_positions

    return local_positions(seq_length, rank, world, "zigzag")


def _operator_worker(rank, world, cases):
    from lss_megatron import lss_attention
    from lss_megatron.parallel import comm

    out = []
    for case in cases:
        causal = case[0]
        q, k, v, dout = attention_inputs(case)
        ref_out, ref_dq, ref_dk, ref_dv = reference_attention(q, k, v, dout, causal)
        idx = _local_index(q.shape[0], rank, world)  # global positions held here
        lq, lk, lv = (t[idx].float().clone().requires_grad_(True) for t in (q, k, v))
        with comm.record() as log:
            o = lss_attention(lq, lk, lv, causal=causal, layout="zigzag")
            o.backward(dout[idx].float())
        out.append(
            {
                "out": (o.detach().double() - ref_out[idx]).abs().max().item(),
                "dq": (lq.grad.double() - ref_dq[idx]).abs().max().item(),
                "dk": (lk.grad.double() - ref_dk[idx]).abs().max().item(),
                "dv": (lv.grad.double() - ref_dv[idx]).abs().max().item(),
                "calls": log.count(category="sp"),
            }
        )
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: slow tier
def test_zigzag_operator_matches_full_attention(world):
    cases = [(True, 4, 2, 12, 32, 2), (False, 4, 4, 8, 16, 1), (True, 4, 1, 16, 16, 2)]
    for rank, results in enumerate(run_ranks(_operator_worker, world, cases, timeout=150)):
        for case, r in zip(cases, results, strict=True):
            for name in ("out", "dq", "dk", "dv"):
                assert r[name] < TOL, f"N={world} rank={rank} {case}: {name} error {r[name]:.2e}"
            assert r["calls"] == 2, "still one all-gather forward and one reduce-scatter backward"


def _model_worker(rank, world, layouts):
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training.micro_batches import (
        forward_backward,
        global_mean_loss,
        step_micro_batches,
    )

    out = []
    for n, pos, mode, layout, *extra in layouts:  # extra: save_kv, key/value heads
        save_kv = extra[0] if extra else "gathered"
        kv_heads = extra[1] if len(extra) > 1 else 2
        cfg = RunConfig(
            model=ModelConfig(
                num_layers=2,
                hidden_size=32,
                num_heads=4,
                num_kv_heads=kv_heads,
                seq_length=16,
                vocab_size=64,
                position_embedding=pos,
            ),
            parallel=ParallelConfig(
                mode=mode,
                world_size=world,
                seq_parallel=n,
                lss_layout=layout,
                lss_save_kv=save_kv,
            ),
            train=TrainConfig(global_batch_size=2, micro_batch_size=1, seed=3),
        ).validate()
        grid = initialize_grid(cfg.parallel)
        model = build_model(cfg.model, grid, mode=mode, seed=3)
        local_loss, tok = forward_backward(
            model, step_micro_batches(cfg, grid, 1), return_token_losses=True
        )
        GradientAverager(model, grid)()
        out.append(
            {
                "key": (pos, layout, save_kv, kv_heads),
                "loss": global_mean_loss(local_loss, grid),
                "grads": {k: p.grad.numpy().copy() for k, p in model.named_parameters()},
                "tokens": tok.numpy().copy(),
                "seq_rank": grid.seq_rank,
            }
        )
        destroy_grid()
    return out


@pytest.mark.timeout(300)
@pytest.mark.slow  # ~23 s; zigzag keeps its fast operator check (N = 2)
def test_zigzag_model_matches_one_process():
    serial = [(1, p, "serial", "contiguous") for p in ("learned", "rope")]
    serial.append((1, "learned", "serial", "contiguous", "gathered", 4))  # MHA
    ref = {(r["key"][0], r["key"][3]): r for r in run_ranks(_model_worker, 1, serial)[0]}
    # the paper's form; K/V kept local (re-gathered in backward) at GQA, and at MHA with learned
    # positions, where the local k, v kept are views of Megatron's QKV output (q's buffer)
    variants = [(4, p, "lss", "zigzag") for p in ("learned", "rope")]
    variants.append((4, "learned", "lss", "zigzag", "local"))
    variants.append((4, "learned", "lss", "zigzag", "local", 4))
    runs = run_ranks(_model_worker, 4, variants, timeout=250)
    for rank_results in runs:
        for r in rank_results:
            pos = r["key"][0]
            base = ref[(pos, r["key"][3])]
            tag = f"zigzag {r['key']} seq_rank={r['seq_rank']}"
            idx = _local_index(16, r["seq_rank"], 4).numpy()
            assert abs(r["loss"] - base["loss"]) < TOL, tag
            for name, g in r["grads"].items():
                want = base["grads"][name]
                if name == "embedding.position_embeddings.weight":
                    want = want[idx]  # this rank's two chunks of the table
                err = np.abs(g - want).max()
                assert err < TOL, f"{tag}: grad {name} error {err:.2e}"
                assert err <= 1e-3 * np.abs(want).max(), f"{tag}: grad {name} relative error"
            err = np.abs(r["tokens"] - base["tokens"][:, idx]).max()
            assert err < TOL, f"{tag}: token losses error {err:.2e}"
