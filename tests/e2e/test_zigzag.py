"""The trainer with the zigzag LSS layout: losses against serial, the balance, a checkpoint.

Per-step losses of contiguous and zigzag LSS at N = 4 equal serial's within 1e-5 (fp32 on CPU:
only accumulation order differs); per-rank causal attention FLOPs (analytic: 4 b h d x the pairs
each rank's forwards attend, summed by the LSS core attention) have max/mean 1.0 under zigzag
and > 1.5 under contiguous segments, with the same total; a zigzag checkpoint (position rows of
two chunks per rank) resumes in the contiguous layout at N = 2 with the same losses.
"""

from __future__ import annotations

import pytest

from tests.support import read_metrics, torchrun_train

TOL = 1e-5


ARGS = (
    "--num-layers 2 --hidden-size 32 --num-heads 4 --seq-length 64 --global-batch-size 2 "
    "--vocab-size 64 --steps 4 --optimizer adamw --lr 3e-3 --seed 9"
).split()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_zigzag_training_balance_and_checkpoint(tmp_path):
    res = torchrun_train(1, ["--mode", "serial", "--out", str(tmp_path / "serial"), *ARGS])
    assert res.returncode == 0, res.stderr[-2000:]
    serial = read_metrics(tmp_path / "serial")
    runs = {}
    for layout in ("contiguous", "zigzag"):
        extra = (
            ["--save", str(tmp_path / "ck"), "--save-interval", "2"] if layout == "zigzag" else []
        )
        res = torchrun_train(
            4,
            [
                "--mode",
                "lss",
                "--seq-parallel",
                "4",
                "--lss-layout",
                layout,
                "--out",
                str(tmp_path / layout),
                *ARGS,
                *extra,
            ],
        )
        assert res.returncode == 0, res.stderr[-2000:]
        runs[layout] = read_metrics(tmp_path / layout)
        for a, b in zip(runs[layout], serial, strict=True):
            assert abs(a["loss"] - b["loss"]) < TOL, (layout, a["step"], a["loss"], b["loss"])
    # balance: per-rank causal attention FLOPs, max/mean
    contiguous = runs["contiguous"][-1]["attention_imbalance"]
    zigzag = runs["zigzag"][-1]["attention_imbalance"]
    assert zigzag == pytest.approx(1.0) and contiguous > 1.5, (contiguous, zigzag)
    assert sum(runs["zigzag"][-1]["attention_flops_per_rank"]) == sum(
        runs["contiguous"][-1]["attention_flops_per_rank"]
    ), "same total work"
    # a zigzag checkpoint (position rows of two chunks per rank) resumes in contiguous at N=2
    res = torchrun_train(
        2,
        [
            "--mode",
            "lss",
            "--seq-parallel",
            "2",
            "--load",
            str(tmp_path / "ck" / "step_00000002"),
            "--out",
            str(tmp_path / "resumed"),
            *ARGS,
        ],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")}
    assert sorted(resumed) == [3, 4]
    for r in runs["zigzag"][2:]:
        assert abs(resumed[r["step"]] - r["loss"]) < TOL, (r["step"], resumed[r["step"]], r["loss"])
