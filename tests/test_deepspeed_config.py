"""`--deepspeed-config FILE`: merged over the trainer's ZeRO defaults, the effective config in
config.json, ``overlap_comm`` on for CUDA and off on CPU/gloo (with the reason), and the keys the
trainer owns refused at validation (exit 2) unless "auto" or equal to the run's values.

The end-to-end run compares a ZeRO-2 LSS run with a file (overlap_comm forced on, a smaller
reduce bucket) against the same run without one: bucketing and overlap change only when
gradients are reduced, not the sums, so the losses agree within 1e-5 (fp32; seen bitwise equal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import read_metrics, torchrun_train

from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from lss_megatron.zero_config import defaults, file_problems, merge, overlap_comm_default

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
EXPECTED = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "zero_optimization.stage": 2}  # fmt: skip


def _file(tmp_path: Path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_merge_is_recursive_and_auto_keeps_the_default():
    base = defaults(micro=2, accumulation=2, data_ranks=2, clip=1.0, stage=2,
                    bucket_elements=100, overlap_comm=False)  # fmt: skip
    out = merge(base, {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 7},
                       "train_batch_size": "auto", "steps_per_print": 10, "new_key": 1})  # fmt: skip
    assert out["zero_optimization"] == {**base["zero_optimization"], "overlap_comm": True,
                                        "reduce_bucket_size": 7}  # fmt: skip
    assert out["train_batch_size"] == 8 and out["steps_per_print"] == 10 and out["new_key"] == 1
    assert base["zero_optimization"]["overlap_comm"] is False  # the defaults are not mutated


def test_overlap_comm_default_says_why():
    on, why_on = overlap_comm_default(cuda=True)
    off, why_off = overlap_comm_default(cuda=False)
    assert on is True and "CUDA" in why_on
    assert off is False and "CPU/gloo" in why_off


def test_file_problems_name_the_key(tmp_path):
    ok = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 2, "overlap_comm": True},
          "fp16": {"enabled": False}}  # fmt: skip
    assert file_problems(_file(tmp_path, ok), EXPECTED) == []
    bad = {"train_batch_size": 16, "zero_optimization": {"stage": 3, "offload_optimizer":
           {"device": "cpu"}}, "optimizer": {"type": "Adam"}, "bf16": {"enabled": True}}  # fmt: skip
    probs = "\n".join(file_problems(_file(tmp_path, bad), EXPECTED))
    for frag in ("train_batch_size 16 disagrees with the run's 8", "zero_optimization.stage 3 "
                 "disagrees with the run's 2 (set by --zero-stage)", "optimizer is not supported",
                 "bf16.enabled is not supported", "zero_optimization.offload_optimizer is not "
                 "supported"):  # fmt: skip
        assert frag in probs, probs
    assert "not valid JSON" in file_problems(_file(tmp_path, "{oops"), EXPECTED)[0]
    assert "expected a JSON object" in file_problems(_file(tmp_path, "[1]"), EXPECTED)[0]
    assert "no such file" in file_problems(str(tmp_path / "none.json"), EXPECTED)[0]


def test_validation_computes_deepspeeds_data_ranks(tmp_path):
    """train_batch_size = micro x accumulation x DeepSpeed's data ranks: P for lss (sequence
    ranks count), P / N for nvidia-sp (its TP group is DeepSpeed's model-parallel group)."""
    path = _file(tmp_path, {"train_batch_size": 8})

    def cfg(mode: str):
        return RunConfig(model=ModelConfig(), parallel=ParallelConfig(mode=mode, world_size=4,
                         seq_parallel=2), train=TrainConfig(global_batch_size=4, zero_stage=1,
                         deepspeed_config=path))  # fmt: skip

    assert cfg("lss")._deepspeed_file_problems(batch_known=True) == []  # micro 2 x 1 x 4 ranks
    probs = cfg("nvidia-sp")._deepspeed_file_problems(batch_known=True)
    assert probs and "train_batch_size 8 disagrees with the run's 4" in probs[0]


@pytest.mark.parametrize("args,fragment", [
    (["--deepspeed-config", "{file}"], "needs --zero-stage 1 or 2"),
    (["--zero-stage", "2", "--deepspeed-config", "{file}", "--global-batch-size", "4",
      "--micro-batch-size", "2"], "train_micro_batch_size_per_gpu 1 disagrees with the run's 2"),
])  # fmt: skip
def test_cli_refuses_bad_files_before_any_process_group(tmp_path, args, fragment):
    path = _file(tmp_path, {"train_micro_batch_size_per_gpu": 1})
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    res = subprocess.run([sys.executable, "-m", "lss_megatron.train",
                          *[a.format(file=path) for a in args]], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero_run_with_a_deepspeed_config(tmp_path):
    pytest.importorskip("deepspeed")
    common = ["--mode", "lss", "--seq-parallel", "2", "--zero-stage", "2", "--num-layers", "2",
              "--hidden-size", "32", "--num-heads", "4", "--seq-length", "32",
              "--global-batch-size", "4", "--micro-batch-size", "1", "--vocab-size", "64",
              "--steps", "4", "--optimizer", "adamw", "--lr", "0.01", "--seed", "3",
              "--dist-timeout", "60", "--progress", "off"]  # fmt: skip
    path = _file(tmp_path, {"train_batch_size": "auto", "gradient_accumulation_steps": 4,
                            "zero_optimization": {"stage": 2, "overlap_comm": True,
                                                  "reduce_bucket_size": 5000},
                            "steps_per_print": 1000})  # fmt: skip
    runs = {}
    for name, extra in (("default", []), ("file", ["--deepspeed-config", path])):
        out = tmp_path / name
        res = torchrun_train(2, [*common, *extra, "--out", str(out)], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = (read_metrics(out), json.loads((out / "config.json").read_text()))
    (plain, plain_cfg), (filed, file_cfg) = runs["default"], runs["file"]
    for a, b in zip(plain, filed, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL, (a["step"], a["loss"], b["loss"])
    z0, z1 = plain_cfg["runtime"]["zero"], file_cfg["runtime"]["zero"]
    assert file_cfg["train"]["deepspeed_config"] == path
    assert z0["overlap_comm"] is False and "CPU/gloo" in z0["overlap_comm_why"]
    assert z0["ds_config"]["zero_optimization"]["overlap_comm"] is False
    assert (
        z1["overlap_comm"] is True and f"set by --deepspeed-config {path}" in z1["overlap_comm_why"]
    )
    zo = z1["ds_config"]["zero_optimization"]
    assert zo["reduce_bucket_size"] == 5000 and zo["contiguous_gradients"] is True  # merged
    # auto: micro 1 x 4 micro-batches x 2 DeepSpeed data ranks (the sequence ranks count)
    assert z1["ds_config"]["train_batch_size"] == 8 and z1["ds_config"]["steps_per_print"] == 1000
    assert z1["bucket_elements"] == 5000 and filed[-1]["zero_bucket_bytes"] == 5000 * 4
