"""Megatron-LM's spelling of the trainer's options (lss_megatron/megatron_args.py and the
`aliases` of config fields), packaged presets by name, the fresh default --out, console-script
names in usage lines, and extras checked up front (issue #25 items 1, 6, 8)."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from lss_megatron.config import ConfigError
from lss_megatron.train import build_parser, config_from_argv, main, parse_args

MODEL = "--num-layers 2 --hidden-size 64 --seq-length 64 --global-batch-size 8".split()


def _cfg(argv: list[str], world: int = 4):
    return config_from_argv([*MODEL, *argv, "--out", "/tmp/unused-out"], world)


@pytest.mark.parametrize(
    ("megatron", "ours"),
    [
        (
            "--mode nvidia-sp --tensor-model-parallel-size 4 --num-attention-heads 8",
            "--mode nvidia-sp --seq-parallel 4 --num-heads 8",
        ),
        (
            "--mode lss --context-parallel-size 4 --num-attention-heads 8 --num-query-groups 2",
            "--mode lss --seq-parallel 4 --num-heads 8 --num-kv-heads 2",
        ),
        (
            "--mode lss --context-parallel-size 2 --tensor-model-parallel-size 2",
            "--mode lss --seq-parallel 2 --tensor-parallel 2",
        ),
        (
            "--train-iters 7 --lr-decay-style constant --lr-warmup-iters 2 --eval-iters 3 --bf16",
            "--steps 7 --lr-schedule constant --warmup-steps 2 --eval-steps 3 --dtype bf16",
        ),
        (
            "--position-embedding-type learned_absolute --max-position-embeddings 64",
            "--position-embedding learned",
        ),
        ("--position-embedding-type rope", "--position-embedding rope"),
    ],
)
def test_megatron_flags_mean_what_ours_mean(megatron, ours):
    assert _cfg(megatron.split()) == _cfg(ours.split())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            "--mode nvidia-sp --context-parallel-size 4",
            "--context-parallel-size 4: nvidia-sp has no context-parallel group",
        ),
        (
            "--mode lss --seq-parallel 2 --context-parallel-size 4",
            "--context-parallel-size 4 contradicts --seq-parallel 2",
        ),
        (
            "--max-position-embeddings 128",
            "--max-position-embeddings 128 must equal --seq-length 64",
        ),
    ],
)
def test_contradictions_are_one_line_each(argv, message):
    with pytest.raises(ConfigError) as e:
        _cfg(argv.split())
    assert message in str(e.value)


def test_help_shows_both_names_and_the_defaults():
    text = build_parser().format_help()
    for pair in (
        "--num-heads NUM_HEADS, --num-attention-heads NUM_HEADS",
        "--num-kv-heads NUM_KV_HEADS, --num-query-groups NUM_KV_HEADS",
        "--steps STEPS, --train-iters STEPS",
        "--warmup-steps WARMUP_STEPS, --lr-warmup-iters WARMUP_STEPS",
        "--eval-steps EVAL_STEPS, --eval-iters EVAL_STEPS",
        "--deepspeed-config FILE.json, --deepspeed_config FILE.json",
        "--tensor-model-parallel-size T",
        "--context-parallel-size N",
        "--bf16",
        "--position-embedding-type {learned_absolute,rope}",
    ):
        assert pair in text, pair
    flat = " ".join(text.split())
    assert "optimizer steps (default: 10)" in flat
    assert "the optimizer (default: adamw)" in flat


def test_a_preset_may_use_megatron_names(tmp_path):
    preset = tmp_path / "m.yaml"
    preset.write_text(
        "num-attention-heads: 8\nnum_query_groups: 4\ntrain-iters: 3\nbf16: true\n"
        "position-embedding-type: rope\ntensor-model-parallel-size: 2\nmode: nvidia-sp\n"
    )
    cfg = config_from_argv([*MODEL, "--config", str(preset), "--out", "/tmp/unused-out"], 2)
    assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.train.steps) == (8, 4, 3)
    assert (cfg.train.dtype, cfg.model.position_embedding) == ("bf16", "rope")
    assert (cfg.parallel.mode, cfg.parallel.seq_parallel) == ("nvidia-sp", 2)
    preset.write_text("bf16: yes please\n")
    with pytest.raises(ConfigError, match="bf16: 'yes please' is not a boolean"):
        config_from_argv(["--config", str(preset)], 1)


def test_config_takes_a_packaged_preset_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called tiny-cpu here
    args = parse_args(["--config", "tiny-cpu"])
    assert args.config == "tiny-cpu" and args.seq_length != 256  # the preset's, not the default
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", "no-such-preset"])
    assert e.value.code == 2


def test_default_out_is_a_fresh_folder_per_launch_and_mode(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    a, b = _out([], 1), _out([], 1)
    assert a == b  # one launch: the same name every time it is derived (every rank)
    assert re.fullmatch(r"runs/\d{8}-\d{6}-lss", a), a
    assert _out(["--mode", "serial"], 1).endswith("-serial")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert re.fullmatch(r"runs/\d{8}-\d{6}-job77\.0-lss", _out([], 1))


def _out(argv: list[str], world: int) -> str:
    return config_from_argv([*MODEL, *argv], world).train.out


def test_console_scripts_name_themselves_in_usage(monkeypatch, capsys):
    from lss_megatron.resources import prog

    monkeypatch.setattr(sys, "argv", ["/venv/bin/lss-megatron-compare"])
    assert prog("python -m analysis.compare") == "lss-megatron-compare"
    monkeypatch.setattr(sys, "argv", ["-m"])
    assert prog("python -m analysis.compare") == "python -m analysis.compare"


def test_ulysses_without_deepspeed_fails_validate_only_in_one_line(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a),
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main([*MODEL, "--mode", "ulysses", "--out", "/tmp/unused-out", "--validate-only"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--mode ulysses needs DeepSpeed" in err and "pip install" in err
    assert "Traceback" not in err
