"""The prepared GPU check (`bash launch/gpu_check.sh`) stays runnable: `--dry-run` runs the same
code on the CPU at toy sizes; its record is what the cost model reads.

On the GPU machine: ``bash launch/gpu_check.sh --out-dir DIR`` (docs/measurement.md).
"""

from __future__ import annotations

import json

import pytest
import torch

from analysis.costmodel import make_config, predict
from analysis.costmodel.hw import get_device
from analysis.gpu_check import CASES, attention_case, kernels_seen
from lss_megatron.lss.kernel import partial_attention


def test_kernel_spy_tells_fused_from_math():
    q, k, v = torch.randn(8, 1, 2, 16), torch.randn(8, 1, 2, 16), torch.randn(8, 1, 2, 16)
    assert kernels_seen(lambda: partial_attention(q, k, v, q_offset=0, causal=True)) == {
        "cpu_flash"
    }
    assert kernels_seen(
        lambda: partial_attention(q, k, v, q_offset=0, causal=True, backend="math")
    ) == {"math"}  # no fused op: the math kernel ran


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c[0])
def test_attention_case_on_cpu(dtype, case):
    """A last-rank (q_offset > 0) and a zigzag GQA path: the CPU flash kernel ran, the output
    and gradients match the float64 reference within the check's own tolerances."""
    row = attention_case(torch.device("cpu"), dtype, *case, sq=16, n=2, b=2, d=16)
    assert row["kernels"] == ["cpu_flash"] and row["ok"], row


def _record(device: str, peak: float, points: list[tuple[int, float]]) -> dict:
    return {
        "device": device,
        "matmul_peak_flops": peak,
        "attention_efficiency": [
            {"rank": "last", "local_len": n, "fraction_of_matmul_peak": f} for n, f in points
        ]
        + [{"rank": "first", "local_len": 1024, "fraction_of_matmul_peak": 0.99}],
    }


def test_cost_model_reads_the_measured_efficiency(tmp_path):
    (tmp_path / "h200.json").write_text(
        json.dumps(_record("NVIDIA H200", 700e12, [(4096, 0.40), (16384, 0.60)]))
    )
    dev = get_device("h200", tmp_path)
    assert dev.peak("bf16") == 700e12 and dev.attention_efficiency == ((4096, 0.4), (16384, 0.6))
    assert dev.attention_efficiency_at(8192) == pytest.approx(0.5)  # linear in log2(l/N)
    assert dev.attention_efficiency_at(1024) == 0.4 and dev.attention_efficiency_at(10**6) == 0.6
    model = dict(num_layers=2, hidden_size=256, num_heads=8, seq_length=65536, global_batch_size=1)
    bf16 = predict(make_config("lss", 8, 1, dtype="bf16", **model), device=dev)
    assert bf16["attention_efficiency"] == pytest.approx(0.5)  # l/N = 8192
    fp32 = predict(make_config("lss", 8, 1, dtype="fp32", **model), device=dev)
    assert fp32["attention_efficiency"] == 0.5 == fp32["assumptions"]["attention_efficiency"]
    unmeasured = predict(make_config("lss", 4, 1, dtype="bf16", **model), device="h100")
    assert unmeasured["attention_efficiency"] == unmeasured["assumptions"]["attention_efficiency"]
