"""The trainer end to end with ``--attention-kernel dense --recompute selective`` in all four
modes: every run records the kernel, recompute and dtype it really ran in config.json's runtime
section, and its per-step losses equal serial's (same flags) within 1e-5 (fp32: the kernels and
gloo sums add in different orders, ~1e-7). LSS's counted sp bytes are 1.5x its fused K/V
traffic without recompute (the gather repeats in backward), computed here independently. And
a bf16 run (fp32 master weights in the checkpoint) resumes bitwise.
"""

from __future__ import annotations

import json

import pytest

from tests.support import read_metrics, torchrun_train

pytestmark = pytest.mark.slow  # trainer launches

ARGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-heads",
    "4",
    "--num-kv-heads",
    "2",
    "--seq-length",
    "32",
    "--global-batch-size",
    "2",
    "--micro-batch-size",
    "1",
    "--vocab-size",
    "64",
    "--steps",
    "2",
    "--optimizer",
    "adamw",
    "--lr",
    "3e-3",
    "--attention-kernel",
    "dense",
    "--recompute",
    "selective",
    "--progress",
    "off",
]
MODES = {"serial": 1, "lss": 2, "nvidia-sp": 2, "ulysses": 2}


@pytest.mark.timeout(900)
def test_dense_selective_in_every_mode_matches_serial(tmp_path):
    runs = {}
    for mode, nproc in MODES.items():
        out = tmp_path / mode
        res = torchrun_train(nproc, ["--mode", mode, "--out", str(out), *ARGS], timeout=300)
        assert res.returncode == 0, (mode, res.stderr[-2000:])
        runtime = json.loads((out / "config.json").read_text())["runtime"]
        assert (runtime["attention_kernel"], runtime["recompute"], runtime["dtype"]) == (
            "dense",
            "selective",
            "fp32",
        ), (mode, runtime)
        runs[mode] = read_metrics(out)
    for mode, rows in runs.items():
        for a, b in zip(rows, runs["serial"], strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (mode, a["step"], a["loss"], b["loss"])
    # LSS, per layer and micro-batch: all-gather forward, again in backward, one reduce-scatter
    n, seg, h_kv, d, fp32 = 2, 16, 2, 8, 4
    gather = (n - 1) * seg * 1 * 2 * h_kv * d * fp32
    assert runs["lss"][-1]["sp_comm_bytes"] == 3 * gather * 2 * 2  # x 2 layers x 2 micro-batches


@pytest.mark.timeout(900)
def test_bf16_resume_is_exact(tmp_path):
    """bf16 checkpoints hold the fp32 master weights and their optimizer state (the model is
    their bf16 copy): stopping after step 2 and resuming gives bitwise the losses of an
    uninterrupted run (same model, same order of operations)."""
    args = (
        "--mode lss --num-layers 2 --hidden-size 32 --num-heads 4 --seq-length 32 "
        "--global-batch-size 2 --vocab-size 64 --steps 4 --dtype bf16 --progress off"
    ).split()
    save = tmp_path / "save"
    runs = {
        "full": [],
        "first": ["--save", str(save), "--save-interval", "2", "--stop-after", "2"],
        "resumed": ["--load", str(save)],
    }
    losses = {}
    for name, extra in runs.items():
        res = torchrun_train(2, [*args, "--out", str(tmp_path / name), *extra], timeout=300)
        assert res.returncode == 0, (name, res.stderr[-2000:])
        losses[name] = {r["step"]: r["loss"] for r in read_metrics(tmp_path / name)}
    assert losses["first"] == {s: losses["full"][s] for s in (1, 2)}
    assert losses["resumed"] == {s: losses["full"][s] for s in (3, 4)}
