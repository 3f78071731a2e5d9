"""--tensor-parallel T: the grid P = N x T x D, its derivations and every refusal (torch-free)."""

from __future__ import annotations

import pytest

from lss_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from lss_megatron.train import config_from_argv

MODEL = dict(num_layers=2, hidden_size=32, num_heads=4, seq_length=32, vocab_size=64)


def _cfg(model=None, **parallel) -> RunConfig:
    return RunConfig(
        model=ModelConfig(**{**MODEL, **(model or {})}),
        parallel=ParallelConfig(**parallel),
        train=TrainConfig(global_batch_size=4),
    )


def test_grid_of_n_t_d():
    cfg = _cfg(mode="lss", world_size=8, seq_parallel=2, tensor_parallel=2).validate()
    p = cfg.parallel
    assert (p.dp, p.tensor_parallel_size, p.context_parallel_size) == (2, 2, 2)
    assert p.sequence_parallel, "Megatron's TP runs with sequence_parallel inside LSS"
    assert not _cfg(mode="lss", world_size=2, seq_parallel=2).parallel.sequence_parallel
    assert _cfg(mode="nvidia-sp", world_size=2, seq_parallel=2).parallel.tensor_parallel_size == 2


def test_cli_default_n_is_p_over_t():
    cfg = config_from_argv(
        ["--mode", "lss", "--tensor-parallel", "2", "--global-batch-size", "4"], world_size=8
    )
    assert (cfg.parallel.seq_parallel, cfg.parallel.tensor_parallel, cfg.parallel.dp) == (4, 2, 1)


@pytest.mark.parametrize(
    "model,parallel,train,fragment",
    [
        (
            {"num_heads": 6, "hidden_size": 48},
            dict(world_size=4, seq_parallel=1, tensor_parallel=4),
            {},
            "--tensor-parallel: --num-heads 6 is not divisible by T = 4",
        ),
        (
            {"num_kv_heads": 1},
            dict(world_size=4, seq_parallel=2, tensor_parallel=2),
            {},
            "--num-kv-heads 1 is not divisible by T = 2",
        ),
        (
            {"ffn_hidden_size": 33},
            dict(world_size=4, seq_parallel=2, tensor_parallel=2),
            {},
            "--ffn-hidden-size 33 is not divisible by T = 2",
        ),
        (
            {"vocab_size": 63},
            dict(world_size=4, seq_parallel=2, tensor_parallel=2),
            {},
            "the model vocabulary 63",
        ),
        (
            {},
            dict(world_size=4, seq_parallel=2, tensor_parallel=3),
            {},
            "P = 4 processes must equal --seq-parallel N x --tensor-parallel T x --data-parallel D",
        ),
        (
            {},
            dict(world_size=4, seq_parallel=2, tensor_parallel=0),
            {},
            "--tensor-parallel must be >= 1",
        ),
        (
            {},
            dict(mode="ulysses", world_size=4, seq_parallel=2, tensor_parallel=2),
            {},
            "--tensor-parallel 2 applies to --mode lss only, not ulysses",
        ),
        (
            {},
            dict(mode="nvidia-sp", world_size=4, seq_parallel=2, tensor_parallel=2),
            {},
            "(its tensor-parallel degree is --seq-parallel N)",
        ),
        (
            {},
            dict(mode="serial", world_size=2, seq_parallel=1, tensor_parallel=2),
            {},
            "applies to --mode lss only, not serial",
        ),
        (
            {"num_kv_heads": 2},
            dict(world_size=4, seq_parallel=2, tensor_parallel=2, kv_gather_chunks=2),
            {},
            "key/value heads 2 / T = 1 per rank",
        ),
        (
            {},
            dict(world_size=4, seq_parallel=2, tensor_parallel=2),
            {"dtype": "bf16"},
            "--dtype bf16 with --tensor-parallel > 1",
        ),
    ],
)
def test_refusals_name_the_value(model, parallel, train, fragment):
    cfg = RunConfig(
        model=ModelConfig(**{**MODEL, **model}),
        parallel=ParallelConfig(**{"mode": "lss", **parallel}),
        train=TrainConfig(global_batch_size=4, **train),
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert fragment in str(e.value), str(e.value)
