"""Bad configurations fail validation (before any process group), naming the offending
values, every problem at once; the trainer's command line: tests/e2e/test_config.py."""

from __future__ import annotations

import pytest

from lss_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig


def _cfg(model=None, parallel=None, train=None) -> RunConfig:
    return RunConfig(
        model=ModelConfig(**(model or {})),
        parallel=ParallelConfig(**({"world_size": 1} | (parallel or {}))),
        train=TrainConfig(**(train or {})),
    )


BAD = [
    # (what, config, fragments the message must contain)
    (
        "seq not divisible by N",
        _cfg(model={"seq_length": 30}, parallel={"world_size": 4, "seq_parallel": 4}),
        ["--seq-length 30", "--seq-parallel 4"],
    ),
    (
        "heads not divisible by kv heads",
        _cfg(model={"num_heads": 4, "num_kv_heads": 3}),
        ["--num-heads 4", "--num-kv-heads 3"],
    ),
    (
        "hidden not divisible by heads",
        _cfg(model={"hidden_size": 30, "num_heads": 4}),
        ["--hidden-size 30", "--num-heads 4"],
    ),
    (
        "P != N*D",
        _cfg(parallel={"world_size": 4, "seq_parallel": 2, "data_parallel": 3}),
        ["P = 4", "2 x 3 = 6"],
    ),
    (
        "G not divisible by D",
        _cfg(parallel={"world_size": 4, "seq_parallel": 2}, train={"global_batch_size": 3}),
        ["--global-batch-size 3", "D = 2"],
    ),
    (
        "serial with N > 1",
        _cfg(parallel={"mode": "serial", "world_size": 2, "seq_parallel": 2}),
        ["--mode serial", "--seq-parallel 2"],
    ),
    (
        "nvidia-sp with N = 1 would silently run without sequence parallelism",
        _cfg(parallel={"mode": "nvidia-sp", "world_size": 2, "seq_parallel": 1}),
        ["--mode nvidia-sp needs --seq-parallel N >= 2", "got 1"],
    ),
    (
        "nvidia-sp heads not divisible by N",
        _cfg(
            model={"hidden_size": 48, "num_heads": 6, "num_kv_heads": 6},
            parallel={"mode": "nvidia-sp", "world_size": 4, "seq_parallel": 4},
        ),
        ["--num-heads 6 is not divisible by N = 4", "--num-kv-heads 6", "--mode lss"],
    ),
    (
        "nvidia-sp kv heads not divisible by N",
        _cfg(
            model={"num_heads": 4, "num_kv_heads": 1},
            parallel={"mode": "nvidia-sp", "world_size": 2, "seq_parallel": 2},
        ),
        ["--num-kv-heads 1 is not divisible by N = 2", "no such limit"],
    ),
    (
        "nvidia-sp vocab not divisible by N",
        _cfg(
            model={"vocab_size": 255},
            parallel={"mode": "nvidia-sp", "world_size": 2, "seq_parallel": 2},
        ),
        [
            "model vocabulary 255 (--vocab-size 255",
            "not divisible by N = 2",
            "--make-vocab-size-divisible-by",
        ],
    ),
    (
        "--lss-save-kv on another mode",
        _cfg(parallel={"mode": "ulysses", "world_size": 2, "lss_save_kv": "local"}),
        ["--lss-save-kv local applies to --mode lss only, not ulysses"],
    ),
    (
        "--lss-save-kv unknown",
        _cfg(parallel={"world_size": 2, "lss_save_kv": "cpu"}),
        ["--lss-save-kv 'cpu' is not one of"],
    ),
    (
        "--lss-save-kv local with the dense kernel",
        _cfg(
            parallel={"world_size": 2, "lss_save_kv": "local"}, train={"attention_kernel": "dense"}
        ),
        ["--lss-save-kv local needs --attention-kernel flash"],
    ),
    (
        "--lss-overlap on another mode",
        _cfg(parallel={"mode": "ulysses", "world_size": 2, "lss_overlap": True}),
        ["--lss-overlap applies to --mode lss only, not ulysses"],
    ),
    (
        "--lss-overlap with the dense kernel",
        _cfg(parallel={"world_size": 2, "lss_overlap": True}, train={"attention_kernel": "dense"}),
        ["--lss-overlap needs --attention-kernel flash"],
    ),
    (
        "--lss-kv-gather on another mode",
        _cfg(parallel={"mode": "nvidia-sp", "world_size": 2, "lss_kv_gather": "separate"}),
        ["--lss-kv-gather separate applies to --mode lss only, not nvidia-sp"],
    ),
    (
        "micro batch does not divide G/D",
        _cfg(train={"global_batch_size": 4, "micro_batch_size": 3}),
        ["--micro-batch-size 3", "4"],
    ),
]


@pytest.mark.parametrize("what,cfg,fragments", BAD, ids=[b[0] for b in BAD])
def test_validate_names_offending_values(what, cfg, fragments):
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    for frag in fragments:
        assert frag in str(e.value), f"{what}: {frag!r} not in {e.value}"


def test_vocab_padding_is_the_same_in_every_mode():
    """Padding depends only on the flag, not on the mode or N, so every mode builds one model."""
    for mode, n in (("serial", 1), ("lss", 6), ("nvidia-sp", 6)):
        cfg = _cfg(
            model={
                "vocab_size": 256,
                "make_vocab_size_divisible_by": 768,
                "hidden_size": 96,
                "seq_length": 240,
                "num_heads": 6,
            },
            parallel={"mode": mode, "world_size": n, "seq_parallel": n},
            train={"global_batch_size": 1},
        ).validate()
        assert cfg.to_dict()["model"]["padded_vocab_size"] == 768
    with pytest.raises(ConfigError, match="model vocabulary 256"):
        _cfg(
            model={"hidden_size": 96, "num_heads": 6},
            parallel={"mode": "nvidia-sp", "world_size": 6, "seq_parallel": 6},
        ).validate()


def test_lss_has_no_head_cap():
    """The same head count nvidia-sp rejects runs under LSS (N = 4, 6 heads, 2 kv heads)."""
    _cfg(
        model={"hidden_size": 48, "num_heads": 6, "num_kv_heads": 2},
        parallel={"mode": "lss", "world_size": 4, "seq_parallel": 4},
    ).validate()


def test_nvidia_sp_guard_refuses_a_model_without_sequence_parallelism():
    """If Megatron built the model without TP = N and sequence_parallel, the run must stop."""
    from types import SimpleNamespace

    from lss_megatron.baselines.nvidia_sp import verify_sequence_parallel

    grid = SimpleNamespace(tp_size=2)
    ok = SimpleNamespace(
        config=SimpleNamespace(sequence_parallel=True, tensor_model_parallel_size=2)
    )
    verify_sequence_parallel(ok, grid)
    for sp, tp in ((False, 2), (True, 1)):
        bad = SimpleNamespace(
            config=SimpleNamespace(sequence_parallel=sp, tensor_model_parallel_size=tp)
        )
        with pytest.raises(RuntimeError, match=f"sequence_parallel={sp}"):
            verify_sequence_parallel(bad, grid)


def test_validate_lists_every_problem_at_once():
    cfg = _cfg(
        model={"hidden_size": 30, "num_heads": 4}, parallel={"world_size": 3, "seq_parallel": 2}
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "--hidden-size 30" in str(e.value) and "P = 3" in str(e.value)


def test_good_config_derives_defaults():
    cfg = _cfg(
        parallel={"world_size": 8, "seq_parallel": 4}, train={"global_batch_size": 8}
    ).validate()
    d = cfg.to_dict()
    assert d["parallel"]["data_parallel"] == 2
    assert d["train"]["micro_batch_size"] == 4 and d["train"]["num_micro_batches"] == 1
    assert d["model"]["num_kv_heads"] == d["model"]["num_heads"]
    assert d["model"]["ffn_hidden_size"] == 4 * d["model"]["hidden_size"]
