"""Non-finite numbers never pass silently: ``--skip-nonfinite`` is bounded (exit 3 after
``--max-consecutive-skips`` skipped steps in a row), and no checkpoint is written from a skipped
step or from non-finite parameters. (Non-finite flags are refused up front: test_faults_input.py;
one NaN on one rank is one decision on every rank: test_failures.py.)
"""

from __future__ import annotations

import json

import pytest
from dist_utils import run_ranks
from faults_utils import TINY, train

from lss_megatron.nonfinite import NonFiniteLoss, SkipGuard

pytestmark = pytest.mark.faults

# SGD at lr 1e38 (finite, accepted) throws the weights so far that every loss after step 1 is
# non-finite: a run that diverges for good, as a user would meet it.
DIVERGING = [*TINY, "--optimizer", "sgd", "--lr", "1e38", "--clip-grad", "0", "--lr-schedule",
             "constant", "--skip-nonfinite", "--save-interval", "1"]  # fmt: skip


def test_skip_guard_counts_consecutive_skips_only():
    g = SkipGuard(3)
    for step, skipped in enumerate([True, True, False, True, True, False], start=1):
        g.record(step, skipped)  # never 3 in a row
    g.record(7, True)
    g.record(8, True)
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive steps \(7\.\.9\).*--max-consecutive"):
        g.record(9, True)
    with pytest.raises(ValueError):
        SkipGuard(0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_diverging_run_stops_after_the_bound_and_saves_only_good_steps(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    res = train([*DIVERGING, "--steps", "6", "--max-consecutive-skips", "2", "--out", out,
                 "--save", ck])  # fmt: skip
    assert res.returncode == 3, res.stderr[-3000:]
    assert "non-finite loss in 2 consecutive steps (2..3): stopping" in res.stderr
    assert res.stderr.count("ERROR") == 1 and "Traceback" not in res.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True)]
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000001"]
    assert (ck / "latest").read_text() == "step_00000001"
    assert not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_skipped_last_step_writes_no_checkpoint(tmp_path):
    """Within the bound the run finishes (exit 0), but the final save at a skipped step is
    refused with a warning: `latest` still names the last good step."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    res = train([*DIVERGING, "--steps", "3", "--max-consecutive-skips", "5", "--out", out,
                 "--save", ck])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 3 was skipped (non-finite loss): no checkpoint written for it" in res.stderr
    assert (ck / "latest").read_text() == "step_00000001"
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 2


def _nan_params_worker(rank, world, directory):
    import torch

    from lss_megatron import loop
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.grid import destroy_grid, initialize_grid
    from lss_megatron.model import build_model

    cfg = RunConfig(model=ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_length=8,
                                      vocab_size=32),
                    parallel=ParallelConfig(mode="lss", world_size=world, seq_parallel=world),
                    train=TrainConfig(save=str(directory)))  # fmt: skip
    grid = initialize_grid(cfg.parallel)
    model = build_model(cfg.model, grid, mode="lss", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if rank == 1:  # only one rank's copy is bad: every rank must still refuse
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))
    try:
        loop._save(cfg, 4, False, model, opt, grid, {"model": {}})
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
