"""`--data megatron` end to end: the converter's command line, a bad --data-path failing at
validation, and serial and LSS (N = 2) training on a dataset built on the spot, agreeing within
1e-5 per step (fp32 on CPU: the modes differ only in attention kernel and reduction order, ~1e-7;
see test_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lss_megatron.data.make_indexed import make_indexed
from tests.support import ROOT, byte_corpus, read_metrics, torchrun_train

SEED, L, G = 5, 32, 4
TOL = 1e-5


@pytest.mark.slow  # ~6 s of subprocesses; unit/test_megatron_data checks the converter in-process
def test_cli_converter_and_bad_data_path_exit(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"hello world " * 100)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lss_megatron.data.make_indexed",
            "--input",
            str(src),
            "--output-prefix",
            str(tmp_path / "out" / "p"),
            "--document-bytes",
            "100",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "12 documents, 1,200 tokens" in res.stdout
    assert (tmp_path / "out" / "p.bin").read_bytes() == src.read_bytes()
    assert [x.name for x in (tmp_path / "out").iterdir()] != [] and not list(
        (tmp_path / "out").glob("*.tmp")
    )
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lss_megatron.train",
            "--data",
            "megatron",
            "--data-path",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"--data-path {tmp_path / 'missing'}: no such file" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serial_and_lss_train_on_it_alike(tmp_path):
    (tmp_path / "corpus.raw").write_bytes(byte_corpus())
    make_indexed(tmp_path / "corpus.raw", tmp_path / "corpus", separator=b"<END>")
    common = [
        "--data",
        "megatron",
        "--data-path",
        str(tmp_path / "corpus"),
        "--vocab-size",
        "256",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-heads",
        "4",
        "--seq-length",
        str(L),
        "--global-batch-size",
        str(G),
        "--steps",
        "6",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--seed",
        str(SEED),
        "--dist-timeout",
        "60",
        "--progress",
        "off",
        "--eval-interval",
        "3",
        "--eval-steps",
        "1",
    ]
    runs = {}
    for name, nproc, extra in (
        ("serial", 1, ["--mode", "serial"]),
        ("lss", 2, ["--mode", "lss", "--seq-parallel", "2"]),
    ):
        out = tmp_path / name
        res = torchrun_train(nproc, [*common, *extra, "--out", str(out)])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = read_metrics(out)
    serial, lss = runs["serial"], runs["lss"]
    assert len(serial) == len(lss) == 6
    for a, b in zip(serial, lss, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL, (a["step"], a["loss"], b["loss"])
        if "valid_loss" in a:
            assert abs(a["valid_loss"] - b["valid_loss"]) < TOL
    assert serial[-1]["loss"] < serial[0]["loss"]  # it learns something (random bytes: ln 250)
