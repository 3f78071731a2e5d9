"""bf16 (Megatron mixed precision: bf16 model, fp32 master weights) for the options beyond the
paper and for nvidia-sp.

Tolerance: bf16 keeps 8 bits of mantissa (~3 significant digits); the variants differ from the
serial bf16 run in kernels, chunking and reduction order, all rounded at bf16, so per-step losses
agree to 2e-2 (as in test_train.py's bf16 test), over a few steps. nvidia-sp runs Megatron's own
bf16 tensor-parallel layers (its former refusal is gone); ZeRO runs DeepSpeed's bf16 mode.
"""

from __future__ import annotations

import pytest

from tests.support import read_metrics, torchrun_train

ARGS = (
    "--num-layers 2 --hidden-size 32 --num-heads 4 --num-kv-heads 2 --seq-length 64 "
    "--global-batch-size 4 --vocab-size 64 --steps 3 --optimizer adamw --lr 3e-3 --dtype bf16"
).split()
VARIANTS = {  # name: (processes, flags)
    "lss-zigzag-kv2": (
        2,
        "--mode lss --seq-parallel 2 --lss-layout zigzag --kv-gather-chunks 2".split(),
    ),
    "ulysses": (2, "--mode ulysses --seq-parallel 2".split()),
    "lss-zero1": (4, "--mode lss --seq-parallel 2 --zero-stage 1".split()),
    "nvidia-sp": (2, "--mode nvidia-sp --seq-parallel 2".split()),
}


@pytest.fixture(scope="module")
def serial_bf16(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    res = torchrun_train(1, ["--mode", "serial", "--out", str(out), *ARGS])
    assert res.returncode == 0, res.stderr[-2000:]
    return read_metrics(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_bf16_variant_tracks_serial(serial_bf16, tmp_path, name):
    nproc, flags = VARIANTS[name]
    res = torchrun_train(nproc, [*flags, "--out", str(tmp_path), *ARGS])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_metrics(tmp_path)
    assert len(rows) == len(serial_bf16) == 3
    for a, b in zip(rows, serial_bf16, strict=True):
        assert abs(a["loss"] - b["loss"]) < 2e-2, (name, a["step"], a["loss"], b["loss"])
