"""`--deepspeed-config FILE` without a launch (lss_megatron/zero_config.py): the merge over the
trainer's ZeRO defaults, overlap_comm per accelerator with its reason, and the problems of a file
(the keys the trainer owns only as "auto" or the run's value; optimizer, scheduler, fp16/bf16 and
offload refused), with DeepSpeed's data ranks computed per mode. The runs:
tests/e2e/test_deepspeed_config.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from lss_megatron.zero_config import defaults, file_problems, merge, overlap_comm_default

EXPECTED = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "zero_optimization.stage": 2,
}


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
    assert file_problems(_file(tmp_path, ok), EXPECTED) == []
    bad = {
        "train_batch_size": 16,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "Adam"},
        "bf16": {"enabled": True},
    }
    probs = "\n".join(file_problems(_file(tmp_path, bad), EXPECTED))
    for frag in (
        "train_batch_size 16 disagrees with the run's 8",
        "zero_optimization.stage 3 disagrees with the run's 2 (set by --zero-stage)",
        "optimizer is not supported",
        "bf16.enabled is not supported",
        "zero_optimization.offload_optimizer is not supported",
    ):
        assert frag in probs, probs
    assert "not valid JSON" in file_problems(_file(tmp_path, "{oops"), EXPECTED)[0]
    assert "expected a JSON object" in file_problems(_file(tmp_path, "[1]"), EXPECTED)[0]
    assert "no such file" in file_problems(str(tmp_path / "none.json"), EXPECTED)[0]


def test_validation_computes_deepspeeds_data_ranks(tmp_path):
    """train_batch_size = micro x accumulation x DeepSpeed's data ranks: P for lss (sequence
    ranks count), P / N for nvidia-sp (its TP group is DeepSpeed's model-parallel group)."""
    path = _file(tmp_path, {"train_batch_size": 8})

    def cfg(mode: str):
        return RunConfig(
            model=ModelConfig(),
            parallel=ParallelConfig(mode=mode, world_size=4, seq_parallel=2),
            train=TrainConfig(global_batch_size=4, zero_stage=1, deepspeed_config=path),
        )

    assert cfg("lss")._deepspeed_file_problems(batch_known=True) == []  # micro 2 x 1 x 4 ranks
    probs = cfg("nvidia-sp")._deepspeed_file_problems(batch_known=True)
    assert probs and "train_batch_size 8 disagrees with the run's 4" in probs[0]


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
    probs = file_problems(path, EXPECTED)
    assert len(probs) == 1 and "DeepSpeed refuses it: " in probs[0] and fragment in probs[0], probs
    top = _file(tmp_path, {"communication_data_type": "fp13"})
    assert "Invalid communication_data_type" in file_problems(top, EXPECTED)[0]
