"""The one-device emulation (`analysis.emulate`) against the trainer's own model on real ranks.

Two gloo ranks build the trainer's GPTModel (`model.build_model`, `parallel.grid.initialize_grid`)
for lss, lss-zigzag, ulysses and nvidia-sp at N = 2 and run its first layer forward + backward on
the rank's l/N tokens under `comm.record()`. The emulation of each rank, in this process on the
``fake`` backend, must hold the same parameters with the same shapes (nvidia-sp: Megatron's real
tensor-parallel shards) and count the same collectives with the same bytes: what the GPU check
times and prices is what the rank does in training.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from analysis.emulate import SHAPES, VARIANTS, emulate_row
from tests.support import run_ranks

SHAPE = dataclasses.replace(SHAPES["dry"], n=2)


def _trainer_layer_worker(rank, world, labels, shape):
    from analysis.emulate import VARIANTS, model_config
    from lss_megatron.config import ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel import comm
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid

    out = {}
    for label in labels:
        v = VARIANTS[label]
        cfg = RunConfig(
            model=model_config(shape, layers=1),
            parallel=ParallelConfig(
                mode=v.mode,
                world_size=world,
                seq_parallel=world,
                data_parallel=1,
                lss_layout=v.layout,
            ),
            train=TrainConfig(global_batch_size=1, micro_batch_size=1),
        ).validate()
        grid = initialize_grid(cfg.parallel)
        model = build_model(cfg.model, grid, mode=v.mode, seed=1, dtype="bf16")
        layer = model.decoder.layers[0]
        x = torch.randn(shape.seq_length // world, 1, shape.hidden, dtype=torch.bfloat16)
        x.requires_grad_()
        with comm.record() as log:
            y = layer(x, attention_mask=None)[0]  # [l/N, b, E]
            y.backward(torch.randn_like(y))
        out[label] = {
            "shapes": {n: list(p.shape) for n, p in layer.named_parameters()},
            "calls": {op: c for (op, _), c in log.calls.items()},
            "bytes": {op: b for (op, _), b in log.bytes.items()},
        }
        destroy_grid()
    return out


@pytest.mark.slow  # two ranks building four models, then eight emulations: ~25 s of CPU
@pytest.mark.timeout(300)
def test_emulated_ranks_are_the_trainers_ranks():
    labels = list(VARIANTS)
    real = run_ranks(_trainer_layer_worker, 2, labels, SHAPE)
    for rank in range(2):
        for label in labels:
            emu = emulate_row(
                label, SHAPE, rank, __import__("torch").device("cpu"), warmup=0, reps=1
            )
            got = real[rank][label]
            assert emu["param_shapes"] == got["shapes"], (label, rank)
            assert emu["comm_calls"] == got["calls"], (label, rank)
            assert emu["comm_bytes"] == got["bytes"], (label, rank)
