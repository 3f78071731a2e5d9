"""`--deepspeed --deepspeed_config FILE` (DeepSpeed's spelling) end to end: bad files refused at
validation (exit 2, before any process group), and a ZeRO-2 LSS run whose stage and batch come
from the file (overlap_comm forced on, a smaller reduce bucket) against the same run by
--zero-stage 2 without a file: bucketing and overlap change only when gradients are
reduced, not the sums, so the losses agree within 1e-5 (fp32; seen bitwise equal). The effective
config and the overlap_comm reason are in config.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, read_metrics, torchrun_train

TOL = 1e-5


def _file(tmp_path: Path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--deepspeed-config", "{file}"], "needs ZeRO stage 1 or 2"),
        (["--deepspeed", "--deepspeed_config", "{file}"], "needs ZeRO stage 1 or 2"),
        (
            [
                "--zero-stage",
                "2",
                "--deepspeed-config",
                "{file}",
                "--global-batch-size",
                "4",
                "--micro-batch-size",
                "2",
            ],
            "train_micro_batch_size_per_gpu gives --micro-batch-size 1, but --micro-batch-size 2 "
            "was set",
        ),
    ],
)
def test_cli_refuses_bad_files_before_any_process_group(tmp_path, args, fragment):
    path = _file(tmp_path, {"train_micro_batch_size_per_gpu": 1})
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    res = subprocess.run(
        [sys.executable, "-m", "lss_megatron.train", *[a.format(file=path) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero_run_with_a_deepspeed_config(tmp_path):
    pytest.importorskip("deepspeed")
    common = [
        "--mode",
        "lss",
        "--seq-parallel",
        "2",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-heads",
        "4",
        "--seq-length",
        "32",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "1",
        "--vocab-size",
        "64",
        "--steps",
        "4",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--dist-timeout",
        "60",
        "--progress",
        "off",
    ]
    path = _file(
        tmp_path,
        {
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 4,
            "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5000},
            "steps_per_print": 1000,
        },
    )
    runs = {}
    # DeepSpeed's spelling: the stage and the batch come from the file
    for name, extra in (
        ("default", ["--zero-stage", "2"]),
        ("file", ["--deepspeed", "--deepspeed_config", path]),
    ):
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
    # micro 1 x 4 micro-batches x D = 1 data rank: the 4 sequences per step (the N = 2
    # sequence ranks are DeepSpeed's sequence-parallel group, not data ranks)
    assert z1["ds_config"]["train_batch_size"] == 4 and z1["ds_config"]["steps_per_print"] == 1000
    assert (z1["data_parallel_size"], z1["sequence_parallel_size"]) == (1, 2)
    assert z1["train_batch_size"] == 4 and file_cfg["train"]["zero_stage"] == 2
    assert z1["bucket_elements"] == 5000 and filed[-1]["zero_bucket_bytes"] == 5000 * 4
