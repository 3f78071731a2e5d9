"""No checkpoint from non-finite parameters, even when only one rank's copy is bad: every rank
refuses the save (a finite-parameter flag is all-reduced first) and nothing is written."""

from __future__ import annotations

import pytest

from lss_megatron.training.nonfinite import NonFiniteLoss
from tests.support import run_ranks

pytestmark = pytest.mark.faults


def _nan_params_worker(rank, world, directory):
    from types import SimpleNamespace

    import torch

    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training import loop

    cfg = RunConfig(
        model=ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_length=8, vocab_size=32),
        parallel=ParallelConfig(mode="lss", world_size=world, seq_parallel=world),
        train=TrainConfig(save=str(directory), steps=4),
    )
    grid = initialize_grid(cfg.parallel)
    model = build_model(cfg.model, grid, mode="lss", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if rank == 1:  # only one rank's copy is bad: every rank must still refuse
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))
    run = SimpleNamespace(
        cfg=cfg,
        rank=rank,
        grid=grid,
        device=torch.device("cpu"),
        model=model,
        stepper=SimpleNamespace(optimizer=opt),
        effective={"model": {}},
    )
    try:
        loop._save(run, 4, False)  # step 4 of 4: a save step
        outcome = "saved"
    except NonFiniteLoss as e:
        outcome = str(e)
    destroy_grid()
    return outcome


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_nonfinite_parameters_are_never_saved(tmp_path):
    got = run_ranks(_nan_params_worker, 2, tmp_path / "ck", timeout=100)
    for outcome in got:
        assert "parameters are not finite at step 4" in outcome, got
        assert "without writing a checkpoint" in outcome
    assert not (tmp_path / "ck").exists()
