"""The configuration errors of --zero-stage: named together; exit 2 from the trainer's main."""

from __future__ import annotations

import pytest


def _problems(**train) -> str:
    from lss_megatron.config import ConfigError, ParallelConfig, RunConfig, TrainConfig

    cfg = RunConfig(
        parallel=ParallelConfig(world_size=4, seq_parallel=2), train=TrainConfig(**train)
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return str(e.value)


def test_config_errors(monkeypatch, tmp_path, capsys):
    # ZeRO runs checkpoint (sharded format 2): --save/--load are no longer refused
    msg = _problems(zero_stage=1, save=str(tmp_path), load=str(tmp_path), keep_last=-1)
    assert "not supported with --zero-stage" not in msg
    assert "--keep-last must be >= 0 (0 keeps every checkpoint), got -1" in msg
    assert "--zero-stage 3 is not one of (0, 1, 2)" in _problems(zero_stage=3)

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a),
    )
    assert "--zero-stage 2 needs DeepSpeed" in _problems(zero_stage=2)
    monkeypatch.undo()

    from lss_megatron.train import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--zero-stage", "1", "--keep-last", "2"]) == 2
    assert "--keep-last 2 needs --save DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--zero-stage", "3"])
    assert e.value.code == 2
