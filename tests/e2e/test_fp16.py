"""--fp16 runs (issue #25 item 2): Megatron's fp16 mixed precision (fp16 model, fp32 master
weights, loss scaling) in every mode tracks the serial fp16 run (a static scale that does not
overflow: whether a borderline dynamic step overflows depends on rounding order, which differs
between modes); a scale that overflows skips every step on every rank alike (the trainer's
end-of-run replica check passes); a dynamic scale resumes exactly (the scaler's state is in the
checkpoint).

Tolerance: fp16 keeps 11 bits of mantissa, more than bf16's 8, but the modes round in different
orders (kernels, gathers, reductions); per-step losses agree to 2e-2 as in the bf16 tests
(test_bf16_options.py). The skipped steps and loss scales are decided by an all-reduced flag and
must be identical. A resumed run is the same process arithmetic: 1e-6.
"""

from __future__ import annotations

import pytest

from tests.support import read_metrics, torchrun_train

ARGS = (
    "--num-layers 2 --hidden-size 32 --num-heads 4 --num-kv-heads 2 --seq-length 64 "
    "--global-batch-size 4 --vocab-size 64 --steps 6 --optimizer adamw --lr 3e-3 --fp16 "
    "--progress off"
).split()
STATIC = ["--loss-scale", "1024"]
DYNAMIC = ["--initial-loss-scale", "1048576"]
VARIANTS = {  # name: (processes, flags)
    "lss-zigzag": (2, "--mode lss --seq-parallel 2 --lss-layout zigzag".split()),
    "nvidia-sp": (2, "--mode nvidia-sp --seq-parallel 2".split()),
    "ulysses": (2, "--mode ulysses --seq-parallel 2".split()),
}


@pytest.fixture(scope="module")
def serial_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    res = torchrun_train(1, ["--mode", "serial", "--out", str(out), *ARGS, *STATIC])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_metrics(out)
    assert not any(r["overflow"] for r in rows) and {r["loss_scale"] for r in rows} == {1024}
    return rows


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fp16_variant_tracks_serial(serial_fp16, tmp_path, name):
    nproc, flags = VARIANTS[name]
    res = torchrun_train(nproc, [*flags, "--out", str(tmp_path), *ARGS, *STATIC])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_metrics(tmp_path)
    assert len(rows) == len(serial_fp16) == 6
    for a, b in zip(rows, serial_fp16, strict=True):
        assert not a["overflow"], (name, a["step"])
        assert abs(a["loss"] - b["loss"]) < 2e-2, (name, a["step"], a["loss"], b["loss"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overflow_is_skipped_on_every_rank_alike(tmp_path):
    """A scale of 1e9 overflows fp16 gradients at every step: every step is skipped on both
    ranks (the run ends with its replicas bitwise equal, else it would fail), logged, counted."""
    args = ["--mode", "lss", "--seq-parallel", "2", "--out", str(tmp_path), *ARGS, "--steps", "3"]
    res = torchrun_train(2, [*args, "--loss-scale", "1e9"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_metrics(tmp_path)
    assert [r["overflow"] for r in rows] == [True] * 3
    assert rows[-1]["skipped_steps"] == 3 and {r["loss_scale"] for r in rows} == {1e9}
    assert res.stderr.count("fp16 gradients overflowed") == 3
    assert "replicas bitwise equal" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fp16_resume_continues_the_loss_scale(tmp_path):
    """Dynamic scaling from 2**20 (it overflows, then falls), interrupted after step 3 and
    resumed: the same losses and scales as the uninterrupted run."""
    base = ["--mode", "serial", *ARGS, *DYNAMIC]
    res = torchrun_train(1, [*base, "--out", str(tmp_path / "whole")])
    assert res.returncode == 0, res.stderr[-2000:]
    whole = read_metrics(tmp_path / "whole")
    assert whole[0]["overflow"] and len({r["loss_scale"] for r in whole}) > 1
    ck = tmp_path / "ck"
    first = [*base, "--save", str(ck), "--save-interval", "3"]
    res = torchrun_train(1, [*first, "--out", str(tmp_path / "a"), "--stop-after", "3"])
    assert res.returncode == 0, res.stderr[-2000:]
    res = torchrun_train(1, [*first, "--out", str(tmp_path / "b"), "--load", str(ck)])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == [4, 5, 6]
    for a, b in zip(rows, whole[3:], strict=True):
        assert (a["overflow"], a["loss_scale"]) == (b["overflow"], b["loss_scale"]), a["step"]
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
