"""ZeRO stage 1 / 2 (`training.zero.ZeroEngine`) against the trainer's own `PlainStepper`, on 2 ranks.

The reference is the plain stepper (double gradient averaging, global-norm clipping, AdamW) on the
same model from the same seed and the same micro-batches: LSS N = 2 with learned positions (the
position table is replicated whole under ZeRO), GQA, 2 micro-batches per step, clipping active
(--clip-grad 0.5 is below the first step's norm). Over three steps, every step's global loss and
gradient norm, and then every parameter, equal the plain stepper's within 1e-5 (fp32 on CPU:
only the reduction order differs; seen ~1e-7). Memory: AdamW keeps two moments per element of
this rank's partition plus one 4-byte step, and the P partitions tile the flat parameter buffer.

Stage 2 also keeps fewer gradient bytes than the full gradients. ZeRO-2 with K/V kept local
(`--lss-save-kv local`, re-gathered in backward) matches the same plain stepper. The same checks through the
trainer (skipped steps and nvidia-sp included): tests/e2e/test_zero.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import run_ranks

pytest.importorskip("deepspeed")

TOL = 1e-5
STEPS = 3


def _zero_worker(rank, world, stages):
    import dataclasses
    import os

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as torchrun
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training.micro_batches import global_mean_loss, step_micro_batches
    from lss_megatron.training.stepper import PlainStepper
    from lss_megatron.training.zero import ZeroEngine

    def config(stage, save_kv="gathered"):
        return RunConfig(
            model=ModelConfig(
                num_layers=2,
                hidden_size=32,
                num_heads=8,
                num_kv_heads=4,
                seq_length=32,
                vocab_size=64,
                position_embedding="learned",
            ),
            parallel=ParallelConfig(
                mode="lss", world_size=world, seq_parallel=world, lss_save_kv=save_kv
            ),
            train=TrainConfig(
                global_batch_size=4,
                micro_batch_size=2,
                optimizer="adamw",
                lr=0.01,
                clip_grad=0.5,
                steps=STEPS,
                seed=11,
                zero_stage=stage,
            ),
        ).validate()

    cfg = config(0)
    grid = initialize_grid(cfg.parallel)
    out = {}
    for key in (0, *stages):  # a stage, or (stage, save_kv)
        stage, save_kv = key if isinstance(key, tuple) else (key, "gathered")
        g = dataclasses.replace(grid, lss_save_kv=save_kv)
        model = build_model(cfg.model, g, mode="lss", seed=cfg.train.seed)
        if stage:
            stepper = ZeroEngine(model, config(stage, save_kv), g)
        else:
            stepper = PlainStepper(model, cfg, grid)
        losses, norms = [], []
        for step in range(1, STEPS + 1):
            stepper.zero_grad()
            local = stepper.forward_backward(step_micro_batches(cfg, grid, step))
            stepper.sync_gradients()
            losses.append(global_mean_loss(local, grid))
            norms.append(stepper.step())
        params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        out[key] = {
            "losses": losses,
            "norms": norms,
            "params": params,
            "memory": stepper.memory_stats(),
        }
    out["segment"] = cfg.model.seq_length // world
    out["seq_rank"] = grid.seq_rank
    destroy_grid()
    return out


@pytest.mark.timeout(240)
def test_zero_steps_match_the_plain_stepper():
    world = 2
    for r in run_ranks(_zero_worker, world, (1, 2, (2, "local")), timeout=200):
        plain = r[0]
        assert plain["norms"][0] > 0.5, "clipping must be active on the first step"
        rows = slice(r["seq_rank"] * r["segment"], (r["seq_rank"] + 1) * r["segment"])
        for key in (1, 2, (2, "local")):
            stage = key[0] if isinstance(key, tuple) else key
            z, tag = r[key], f"ZeRO-{key} rank {r['seq_rank']}"
            for step, (a, b) in enumerate(zip(z["losses"], plain["losses"], strict=True), 1):
                assert abs(a - b) < TOL, f"{tag} step {step}: loss {a} vs {b}"
            for step, (a, b) in enumerate(zip(z["norms"], plain["norms"], strict=True), 1):
                assert abs(a - b) < TOL * b, f"{tag} step {step}: grad norm {a} vs {b}"
            assert set(z["params"]) == set(plain["params"]), tag
            for name, w in z["params"].items():
                want = plain["params"][name]
                if w.shape != want.shape:  # the whole table under ZeRO, this rank's rows plain
                    assert name == "embedding.position_embeddings.weight", (tag, name)
                    w = w[rows]
                err = np.abs(w - want).max()
                assert err < TOL, f"{tag}: {name} after {STEPS} steps, error {err:.2e}"
            mem = z["memory"]
            assert mem["zero_stage"] == stage
            assert mem["optimizer_state_bytes"] == 2 * mem["zero_master_bytes"] + 4, (tag, mem)
            assert mem["zero_master_bytes"] * world == mem["param_bytes"], (tag, mem)
        assert r[1]["memory"]["grad_bytes"] == r[1]["memory"]["param_bytes"]  # stage 1: full
        assert r[2]["memory"]["grad_bytes"] < r[1]["memory"]["grad_bytes"]  # stage 2: partition
