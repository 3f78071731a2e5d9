"""The trainer on an enwik8-format file: a generated file of exactly 10^8 bytes (the corpus
itself is never downloaded by tests), read through the loader by serial and LSS runs, whose
losses agree within 1e-5 (fp32; as in test_train.py), with validation bits per byte."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.support import read_metrics, torchrun_train

ENWIK8_BYTES = 100_000_000
ARGS = (
    "--data enwik8 --vocab-size 256 --num-layers 1 --hidden-size 32 --num-heads 4 --seq-length 64 "
    "--global-batch-size 4 --steps 3 --optimizer sgd --lr 0.3 --eval-interval 3 --eval-steps 1"
).split()


@pytest.fixture(scope="module")
def enwik8_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("enwik8") / "enwik8"
    rng = np.random.default_rng(0)
    text = rng.integers(32, 127, size=ENWIK8_BYTES, dtype=np.uint8)  # printable ASCII
    text[rng.integers(0, ENWIK8_BYTES, size=ENWIK8_BYTES // 50)] = ord("\n")
    text.tofile(path)
    assert path.stat().st_size == ENWIK8_BYTES
    return path


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_enwik8_serial_and_lss_agree(enwik8_file, tmp_path):
    runs = {}
    for mode, n in (("serial", 1), ("lss", 2)):
        out = tmp_path / mode
        res = torchrun_train(
            n,
            [
                "--mode",
                mode,
                "--seq-parallel",
                str(n),
                "--data-path",
                str(enwik8_file),
                "--out",
                str(out),
                *ARGS,
            ],
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs[mode] = read_metrics(out)
    for a, b in zip(runs["serial"], runs["lss"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    last = runs["lss"][-1]
    assert abs(last["valid_loss"] - runs["serial"][-1]["valid_loss"]) < 1e-5
    assert last["valid_bpb"] == pytest.approx(last["valid_loss"] / math.log(2))
    assert 0 < last["valid_bpb"] < 8.5  # bytes: at most ~8 bits each at initialisation


@pytest.mark.timeout(60)
def test_wrong_size_file_fails_fast_naming_the_path(tmp_path):
    bad = tmp_path / "enwik8"
    bad.write_bytes(b"x" * 1000)
    res = torchrun_train(
        1,
        ["--mode", "serial", "--data-path", str(bad), "--out", str(tmp_path / "o"), *ARGS],
        timeout=50,
    )
    assert res.returncode != 0
    assert str(bad) in res.stderr and "1,000 bytes, expected exactly 100,000,000" in res.stderr
