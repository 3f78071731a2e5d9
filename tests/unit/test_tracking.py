"""The Megatron-style iteration and validation lines and the TensorBoard scalars of a metrics
record (lss_megatron/training/tracking.py); the run that writes them is tests/e2e/test_tensorboard.py."""

from __future__ import annotations

import math

from lss_megatron.training.tracking import (
    arguments_block,
    interval_record,
    iteration_line,
    scalars,
    validation_line,
)


def test_scalars_are_the_numeric_metrics_under_megatron_tags_where_megatron_has_them():
    rec = {"step": 3, "loss": 1.5, "skipped": False, "note": "x", "per_rank": [4, 5], "bytes": 7}
    assert scalars(rec) == {
        "lm loss": 1.5,
        "skipped": 0.0,
        "per_rank/0": 4.0,
        "per_rank/1": 5.0,
        "bytes": 7.0,
    }
    tags = scalars({"step": 2, "lr": 1e-3, "grad_norm": 0.5, "step_time_s": 0.2, "valid_loss": 2.0})
    assert tags == {
        "learning-rate": 1e-3,
        "grad-norm": 0.5,
        "iteration-time": 0.2,
        "lm loss validation": 2.0,
        "lm loss validation ppl": math.exp(2.0),
    }


def test_the_iteration_line_averages_over_the_log_interval_like_megatron():
    """Loss over the steps not skipped, time per iteration over all steps of the interval, the
    interval's skipped steps; the rest (lr, step, counters) from the interval's last step."""
    recs = [
        {"step": 1, "loss": 3.0, "step_time_s": 0.1, "tflops_per_s_per_rank": 1.0, "lr": 1.0},
        {"step": 2, "loss": float("nan"), "skipped": True, "step_time_s": 0.3},
        {"step": 3, "loss": 2.0, "step_time_s": 0.2, "tflops_per_s_per_rank": 3.0, "lr": 0.5},
    ]
    recs[1]["tflops_per_s_per_rank"] = 2.0
    rec = interval_record(recs)
    assert rec["step"] == 3 and rec["lr"] == 0.5
    assert math.isclose(rec["loss"], 2.5) and math.isclose(rec["step_time_s"], 0.2)
    assert math.isclose(rec["tflops_per_s_per_rank"], 2.0) and rec["skipped_steps"] == 1


def test_arguments_block_is_megatron_aligned():
    block = arguments_block({"seq_length": 1024, "lr": 0.001}).splitlines()
    assert block[0].strip("-").strip() == "arguments"
    assert block[-1].strip("-").strip() == "end of arguments"
    assert block[1] == "  lr " + "." * 46 + " 0.001"  # sorted; dots up to column 48
    assert block[2].startswith("  seq_length ....") and block[2].endswith(" 1024")


def test_iteration_line_fields():
    rec = {
        "step": 7,
        "consumed_samples": 56,
        "consumed_tokens": 56 * 128,
        "step_time_s": 0.0412,
        "tflops_per_s_per_rank": 0.00123,
        "lr": 1e-3,
        "loss": 2.07944,
        "grad_norm": 0.5123,
        "skipped_steps": 1,
        "peak_mem_bytes": 612 * 2**20,
    }
    line = iteration_line(rec, steps=100, global_batch=8)
    for frag in (
        "iteration        7/     100",
        "consumed samples:           56",
        "consumed tokens:           7168",
        "elapsed time per iteration (ms): 41.2",
        "throughput per rank (TFLOP/s/rank): 0.00123",
        "learning rate: 1.000000E-03",
        "global batch size:     8",
        "lm loss: 2.079440E+00",
        "grad norm: 0.512",
        "number of skipped iterations:   1",
        "peak memory (MiB): 612.0 (CPU RSS)",
    ):
        assert frag in line, (frag, line)
    gpu = iteration_line(rec, steps=100, global_batch=8, device_type="cuda")
    assert "(GPU max allocated)" in gpu
    valid = validation_line({"step": 7, "valid_loss": 2.0, "valid_bpb": 2.0 / math.log(2)})
    assert "lm loss value: 2.000000E+00" in valid and f"PPL: {math.exp(2):.6E}" in valid
