"""`--deepspeed --deepspeed_config FILE` without a launch (lss_megatron/zero_config.py): the merge
over the trainer's ZeRO defaults, overlap_comm per accelerator with its reason, the file read as
DeepSpeed reads it (batch keys: sequences per step over the D data ranks, the sequence group not
counted; stage, clipping, optimizer and bf16 mapped onto the trainer's options), and the one-line
refusals (inconsistent batch keys, scheduler, fp16, stage 3, offload, optimizers the trainer
cannot run exactly, contradicting flags), before any process group. The runs:
tests/e2e/test_deepspeed_config.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from lss_megatron.zero_config import (
    adopt,
    batch_settings,
    defaults,
    file_problems,
    file_settings,
    for_deepspeed,
    merge,
    overlap_comm_default,
)


def _file(tmp_path: Path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_merge_is_recursive_and_auto_keeps_the_default():
    base = defaults(
        micro=2,
        accumulation=2,
        data_ranks=2,
        clip=1.0,
        stage=2,
        bucket_elements=100,
        overlap_comm=False,
    )
    out = merge(
        base,
        {
            "zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 7},
            "train_batch_size": "auto",
            "steps_per_print": 10,
            "new_key": 1,
        },
    )
    assert out["zero_optimization"] == {
        **base["zero_optimization"],
        "overlap_comm": True,
        "reduce_bucket_size": 7,
    }
    assert out["train_batch_size"] == 8 and out["steps_per_print"] == 10 and out["new_key"] == 1
    assert base["zero_optimization"]["overlap_comm"] is False  # the defaults are not mutated


def test_overlap_comm_default_says_why():
    on, why_on = overlap_comm_default(cuda=True)
    off, why_off = overlap_comm_default(cuda=False)
    assert on is True and "CUDA" in why_on
    assert off is False and "CPU/gloo" in why_off


def test_file_problems_name_the_key(tmp_path):
    ok = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "fp16": {"enabled": False},
    }
    assert file_problems(_file(tmp_path, ok), RUN, data_ranks=2, seq_ranks=2) == []
    bad = {
        "train_batch_size": 16,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "Lamb"},
        "fp16": {"enabled": True},
        "scheduler": {"type": "WarmupLR"},
        "sequence_parallel_size": 4,
    }
    probs = file_problems(_file(tmp_path, bad), RUN, data_ranks=2, seq_ranks=2)
    text = "\n".join(probs)
    for frag in (
        "train_batch_size means --global-batch-size 16, but the run has 8",
        "zero_optimization.stage 3 is not supported: ZeRO stage 1 or 2",
        "optimizer.type 'Lamb' is not supported",
        "fp16.enabled is not supported",
        "scheduler is not supported: DeepSpeed's WarmupLR",
        "sequence_parallel_size 4 disagrees with the run's sequence group N = 2",
        "zero_optimization.offload_optimizer is not supported",
    ):
        assert frag in text, text
    assert all("\n" not in x for x in probs)  # one line each
    run = {"zero_stage": 2, "clip_grad": 1.0}
    assert "not valid JSON" in file_problems(_file(tmp_path, "{oops"), run, **RANKS)[0]
    assert "expected a JSON object" in file_problems(_file(tmp_path, "[1]"), run, **RANKS)[0]
    assert "no such file" in file_problems(str(tmp_path / "none.json"), run, **RANKS)[0]


RUN = {
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "clip_grad": 1.0,
    "zero_stage": 2,
    "dtype": "fp32",
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
}
RANKS = {"data_ranks": 2, "seq_ranks": 2}


@pytest.mark.parametrize(
    "keys,expected",
    [
        # DeepSpeed's rules (DeepSpeedConfig._set_batch_related_parameters) at world size D = 2
        (
            {
                "train_batch_size": 8,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 2,
            },
            {"global_batch_size": 8, "micro_batch_size": 2},
        ),
        (
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 1},
            {"global_batch_size": 8, "micro_batch_size": 1},
        ),
        (
            {"train_batch_size": 8, "gradient_accumulation_steps": 2},
            {"global_batch_size": 8, "micro_batch_size": 2},
        ),
        ({"train_batch_size": 8}, {"global_batch_size": 8}),
        ({"train_micro_batch_size_per_gpu": 3}, {"global_batch_size": 6, "micro_batch_size": 3}),
        (
            {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2},
            {"global_batch_size": 12, "micro_batch_size": 3},
        ),
        ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, {}),
        # "auto" (HF Trainer's spelling): the trainer fills it, so micro alone keeps G
        (
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2},
            {"micro_batch_size": 2},
        ),
    ],
)
def test_batch_keys_count_sequences_over_the_data_ranks(keys, expected):
    """train_batch_size = micro x accumulation x D: D data ranks, the sequence group (N) not
    counted, so the file's train_batch_size is --global-batch-size, sequences per step."""
    settings, problems = batch_settings("ds.json", keys, data_ranks=2)
    assert problems == []
    assert {k: v for k, (_, v) in settings.items()} == expected


@pytest.mark.parametrize(
    "keys,fragment",
    [
        (
            {
                "train_batch_size": 32,
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 4,
            },
            "train_batch_size 32 != train_micro_batch_size_per_gpu 1 x gradient_accumulation_steps "
            "4 x 2 data ranks = 8 (the sequence group is not counted)",
        ),
        ({"train_batch_size": 7}, "train_batch_size 7 is not divisible by the 2 data ranks"),
        (
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3},
            "train_batch_size 8 is not divisible by train_micro_batch_size_per_gpu 3 x 2",
        ),
        (
            {"train_batch_size": 8, "gradient_accumulation_steps": 3},
            "train_batch_size 8 is not divisible by gradient_accumulation_steps 3 x 2",
        ),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps 2 alone does not set"),
        ({"train_batch_size": 0}, "train_batch_size must be a whole number >= 1, got 0"),
        ({"train_micro_batch_size_per_gpu": 1.5}, "must be a whole number >= 1, got 1.5"),
    ],
)
def test_inconsistent_batch_keys_are_one_line(keys, fragment):
    settings, problems = batch_settings("ds.json", keys, data_ranks=2)
    assert len(problems) == 1 and fragment in problems[0], problems
    assert problems[0].startswith("--deepspeed-config ds.json: ")


def test_sections_map_onto_the_trainers_options():
    user = {
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 1},
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1},
        },
        "bf16": {"enabled": True},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 5,
    }
    settings, problems = file_settings("ds.json", user, **RANKS)
    assert problems == []
    assert {k: v for k, (_, v) in settings.items()} == {
        "clip_grad": 0.5,
        "zero_stage": 1,
        "optimizer": "adamw",  # DeepSpeed's Adam is AdamW (adam_w_mode defaults to true)
        "lr": 3e-4,
        "weight_decay": 0.1,
        "dtype": "bf16",
    }
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.0}}}
    assert file_settings("ds.json", sgd, **RANKS)[0]["optimizer"] == ("optimizer.type", "sgd")


@pytest.mark.parametrize(
    "optimizer,fragment",
    [
        ({"type": "Adam", "params": {"betas": [0.8, 0.99]}}, "optimizer.params.betas [0.8, 0.99]"),
        ({"type": "Adam", "params": {"adam_w_mode": False}}, "optimizer.params.adam_w_mode False"),
        ({"type": "SGD", "params": {"momentum": 0.9}}, "optimizer.params.momentum 0.9"),
        ({"type": "AdamW", "params": {"amsgrad": True}}, "optimizer.params.amsgrad is not"),
        ({"type": "OneBitAdam"}, "optimizer.type 'OneBitAdam' is not supported"),
        ({"params": {}}, 'optimizer must be {"type": ..., "params": ...}'),
    ],
)
def test_optimizers_the_trainer_cannot_run_exactly_are_refused(optimizer, fragment):
    _, problems = file_settings("ds.json", {"optimizer": optimizer}, **RANKS)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_adopt_fills_defaults_and_refuses_contradicting_flags():
    defaults_ = {
        "global_batch_size": 8,
        "micro_batch_size": None,
        "zero_stage": 0,
        "clip_grad": 1.0,
        "lr": 1e-3,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "dtype": "fp32",
    }
    user = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.5,
    }
    values = dict(defaults_)

    def run(values, user):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "ds.json")
            Path(path).write_text(json.dumps(user))
            return adopt(path, values, defaults_, **RANKS)

    assert run(values, user) == []
    assert values == {
        **defaults_,
        "global_batch_size": 16,
        "micro_batch_size": 2,
        "zero_stage": 2,
        "clip_grad": 0.5,
    }
    given = {**defaults_, "global_batch_size": 4, "clip_grad": 0.5}  # --global-batch-size 4
    problems = run(given, user)
    assert len(problems) == 1, problems
    assert (
        "train_batch_size gives --global-batch-size 16, but --global-batch-size 4 was set"
        in (problems[0])
    )


def _cli(tmp_path, content, *argv, world_size=8):
    from lss_megatron.train import config_from_argv

    path = _file(tmp_path, content)
    return config_from_argv([*[a.format(file=path) for a in argv]], world_size)


def test_deepspeed_spelling_sets_the_run_from_the_file(tmp_path):
    """DeepSpeed's tutorials' command line: --deepspeed --deepspeed_config FILE. At N = 4
    (P = 8, D = 2) train_batch_size 8 is 8 sequences per step, not 8 / 4."""
    pytest.importorskip("deepspeed")
    user = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 4,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
    }
    for flag in ("--deepspeed_config", "--deepspeed-config"):
        cfg = _cli(
            tmp_path,
            user,
            "--mode",
            "lss",
            "--context-parallel-size",
            "4",
            "--deepspeed",
            flag,
            "{file}",
        )
        t = cfg.train
        assert cfg.parallel.dp == 2 and cfg.parallel.seq_parallel == 4
        assert (t.global_batch_size, cfg.micro_batch, cfg.num_micro_batches) == (8, 1, 4)
        assert (t.zero_stage, t.clip_grad, t.optimizer, t.lr, t.weight_decay) == (
            2,
            0.5,
            "adamw",
            2e-3,
            0.01,
        )
        assert t.deepspeed
    base = defaults(
        micro=1,
        accumulation=4,
        data_ranks=cfg.parallel.dp,
        clip=0.5,
        stage=2,
        bucket_elements=10,
        overlap_comm=False,
    )
    assert base["train_batch_size"] == 8  # what the trainer hands DeepSpeed (zero.ds_config)
    assert "optimizer" not in for_deepspeed(merge(base, user))  # the client optimizer runs


@pytest.mark.parametrize(
    "content,argv,fragment",
    [
        (
            {"train_batch_size": 8},
            ["--deepspeed"],
            "--deepspeed-config {file} needs ZeRO stage 1 or 2",
        ),
        ({}, ["--deepspeed"], "needs ZeRO stage 1 or 2"),
        (
            {"zero_optimization": {"stage": 2}},
            ["--zero-stage", "1"],
            "zero_optimization.stage gives --zero-stage 2, but --zero-stage 1 was set",
        ),
        (
            {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
            ["--dtype", "fp32"],
            None,
        ),  # --dtype fp32 is the default: the file's bf16 wins
        (
            {
                "zero_optimization": {"stage": 2},
                "train_batch_size": 32,
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 4,
            },
            [],
            "train_batch_size 32 != train_micro_batch_size_per_gpu 1 x gradient_accumulation_steps",
        ),
    ],
)
def test_cli_refusals_before_any_process_group(tmp_path, content, argv, fragment):
    from lss_megatron.config import ConfigError

    pytest.importorskip("deepspeed")
    args = ["--mode", "lss", "--seq-parallel", "4", *argv]
    if content or "--deepspeed" not in argv:
        args += ["--deepspeed_config", "{file}"]
    if fragment is None:
        cfg = _cli(tmp_path, content, *args)
        assert cfg.train.dtype == "bf16"
        return
    with pytest.raises(ConfigError) as e:
        _cli(tmp_path, content, *args)
    assert fragment.format(file=str(tmp_path / "ds.json")) in str(e.value), str(e.value)


def test_validation_counts_the_data_ranks_only(tmp_path):
    """A RunConfig made in code is checked against the file too: train_batch_size is
    --global-batch-size in every mode (D = P / N data ranks for lss and nvidia-sp alike)."""

    def problems(mode: str, tb: int):
        path = _file(tmp_path, {"train_batch_size": tb, "zero_optimization": {"stage": 1}})
        return RunConfig(
            model=ModelConfig(),
            parallel=ParallelConfig(mode=mode, world_size=4, seq_parallel=2),
            train=TrainConfig(global_batch_size=4, zero_stage=1, deepspeed_config=path),
        )._deepspeed_file_problems(batch_known=True)

    for mode in ("lss", "nvidia-sp"):
        assert problems(mode, 4) == [], mode
        probs = problems(mode, 8)
        assert len(probs) == 1 and "train_batch_size means --global-batch-size 8" in probs[0]


@pytest.mark.faults
@pytest.mark.parametrize(
    "zero,fragment",
    [
        ({"reduce_bucket_size": -5}, "reduce_bucket_size: Input should be greater than 0 (got -5)"),
        ({"bogus_key": 1}, "bogus_key: Extra inputs are not permitted"),
    ],
)
def test_deepspeeds_own_classes_validate_the_file(tmp_path, zero, fragment):
    """What only DeepSpeed knows (its pydantic ZeRO section, its top-level keys) is refused at
    validation through DeepSpeedConfig itself, one line, not at run time."""
    pytest.importorskip("deepspeed")
    path = _file(tmp_path, {"zero_optimization": {"stage": 2, **zero}})
    probs = file_problems(path, RUN, **RANKS)
    assert len(probs) == 1 and "DeepSpeed refuses it: " in probs[0] and fragment in probs[0], probs
    top = _file(tmp_path, {"communication_data_type": "fp13"})
    assert "Invalid communication_data_type" in file_problems(top, RUN, **RANKS)[0]
