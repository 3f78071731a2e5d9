"""The trainer with bounded, overlapped K/V gathers (`--kv-gather-chunks C`) against serial.

Exactness as everywhere (fp32 on CPU, 1e-5: only the accumulation order differs); the counted
collectives are C all-gathers and C reduce-scatters per layer and micro-batch.
"""

from __future__ import annotations

import pytest

from tests.support import read_metrics, torchrun_train

TOL = 1e-5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_with_chunked_gathers_matches_serial(tmp_path):
    args = (
        "--num-layers 2 --hidden-size 32 --num-heads 8 --num-kv-heads 4 --seq-length 32 "
        "--global-batch-size 2 --vocab-size 64 --steps 4 --optimizer sgd --lr 0.5"
    ).split()
    res = torchrun_train(1, ["--mode", "serial", "--out", str(tmp_path / "s"), *args])
    assert res.returncode == 0, res.stderr[-2000:]
    res = torchrun_train(
        2,
        [
            "--mode",
            "lss",
            "--seq-parallel",
            "2",
            "--kv-gather-chunks",
            "4",
            "--out",
            str(tmp_path / "c"),
            *args,
        ],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for a, b in zip(read_metrics(tmp_path / "c"), read_metrics(tmp_path / "s"), strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL, (a["step"], a["loss"], b["loss"])
    first = read_metrics(tmp_path / "c")[0]
    assert first["sp_comm_calls"] == 2 * 4 * 2  # 2 layers x 4 chunks x (AG + RS), 1 micro-batch
