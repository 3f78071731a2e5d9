"""The GPU check script stays runnable: the same code at toy sizes on the CPU.

On a machine with CUDA, `bash launch/gpu_check.sh` runs it for real (docs: analysis/gpu_check.py).
"""

import json

import pytest


@pytest.mark.timeout(120)
def test_gpu_check_runs_at_toy_sizes_on_cpu(tmp_path):
    from analysis.gpu_check import run

    path = run("cpu", tiny=True, n=2, out_dir=tmp_path)
    result = json.loads(path.read_text())
    assert result["matmul_peak_flops"] > 0
    for key in ("attention", "layer"):
        rows = result[key]
        assert [r["seq_length"] for r in rows] == [64, 128]
        assert all(r["tflops"] > 0 and r["flops"] > 0 for r in rows)
    # causal pairs of the last of N=2 ranks at l=64: 32 queries x 32 earlier keys + 32*33/2
    assert result["attention"][0]["flops"] == 3 * 4 * 4 * 16 * (32 * 32 + 32 * 33 // 2)
