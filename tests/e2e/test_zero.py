"""ZeRO stage 1 / 2 through DeepSpeed (`--zero-stage`, lss_megatron/zero.py) against the plain trainer.

References are plain runs of the same model (LSS N = 2, D = 2, P = 4, learned positions, AdamW,
2 micro-batches per step, clipping active: the first step's norm is ~1.27 > --clip-grad 1).
The LSS runs inject a NaN loss at step 3 with --skip-nonfinite, so DeepSpeed's skip path is
exercised too (not nvidia-sp: the injected NaN is on one rank and nvidia-sp reduces the loss over
its data group only, so the aid would desynchronise the tensor-parallel pair; real NaNs do not).

* losses: ZeRO 1 and 2 (LSS) and ZeRO 1 (nvidia-sp, DeepSpeed's model-parallel group = TP) equal
  the plain run within 1e-5 at every finite step (fp32; seen ~1e-7), and the same step is skipped;
  gradient norms (DeepSpeed's, over its partitions) equal the trainer's within 1e-5 relative;
* memory, per rank: AdamW keeps two moments per element, so optimizer state under ZeRO is exactly
  2 x the fp32 partition (``zero_master_bytes``) + one 4-byte step, and the P partitions tile the
  flat parameter buffer. Against the plain run the ratio is 1/P within [-1 %, +5 %]: the full
  position table replaces the l/N-row slice under ZeRO ((l - l/N) E more elements, 1.8 % of this
  LSS model), DeepSpeed pads the flat buffer to a multiple of 2P elements (< 2P), and the plain
  run keeps one 4-byte step per parameter tensor where ZeRO keeps one (0.1 % of nvidia-sp's). Stage 2 keeps only the gradients of the parameters overlapping its
  partition: at most 1/P of them plus two straddling parameters;
* the configuration errors of --zero-stage: tests/unit/test_zero.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import read_metrics, torchrun_train

pytest.importorskip("deepspeed")

TOL = 1e-5
P = 4
E, L, FFN, V = 32, 32, 128, 64
COMMON = (
    f"--num-layers 2 --hidden-size {E} --num-heads 8 --num-kv-heads 4 --seq-length {L} "
    f"--global-batch-size 8 --micro-batch-size 2 --vocab-size {V} --steps 5 --optimizer adamw "
    "--lr 0.01 --seed 11 --data synthetic --dist-timeout 60 --progress off"
).split()
SKIPPED = 3
LSS = (
    f"--mode lss --seq-parallel 2 --data-parallel 2 --fault nan:1:{SKIPPED} --skip-nonfinite"
).split()
NVIDIA_SP = ["--mode", "nvidia-sp", "--seq-parallel", "2", "--data-parallel", "2"]


def train(out: Path, args: list[str]) -> list[dict]:
    res = torchrun_train(P, [*args, *COMMON, "--out", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["replicas"]["bitwise_equal"]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    fault = "--fault" in args
    assert [r["skipped"] for r in rows] == [fault and s == SKIPPED for s in range(1, 6)]
    return rows


def assert_same_training(rows: list[dict], ref: list[dict], what: str) -> None:
    for r, q in zip(rows, ref, strict=True):
        if r["skipped"] or q["skipped"]:
            assert r["skipped"] and q["skipped"], (what, r, q)
            continue
        assert abs(r["loss"] - q["loss"]) < TOL, (
            f"{what} step {r['step']}: {r['loss']} vs {q['loss']}"
        )
        assert abs(r["grad_norm"] - q["grad_norm"]) < TOL * q["grad_norm"], (what, r, q)


def assert_partitioned_state(row: dict, dp: int) -> None:
    """AdamW state = exp_avg + exp_avg_sq of this rank's partition + one step scalar; the
    partitions (fp32 master copies) tile the flat parameter buffer over the dp ranks."""
    assert row["optimizer_state_bytes"] == 2 * row["zero_master_bytes"] + 4, row
    assert row["zero_master_bytes"] * dp == row["param_bytes"], row


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[dict]:
    return train(tmp_path_factory.mktemp("plain"), LSS)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2])
def test_lss_zero_matches_plain(plain, tmp_path, stage):
    rows = train(tmp_path / "zero", [*LSS, "--zero-stage", str(stage)])
    assert_same_training(rows, plain, f"LSS ZeRO-{stage}")
    config = json.loads((tmp_path / "zero" / "config.json").read_text())
    zero = config["runtime"]["zero"]
    # DeepSpeed is told the sequence group as such (MegatronMPU): D = 2 data ranks, N = 2
    # sequence ranks, ZeRO over the N x D = P ranks; its batch is the 8 sequences per step
    assert zero["data_parallel_size"] == 2 and zero["sequence_parallel_size"] == 2
    assert zero["sequence_data_parallel_size"] == P and zero["train_batch_size"] == 8
    assert zero["ds_config"]["train_batch_size"] == 8
    assert zero["replicated_position_table"]

    z, ref = rows[-1], plain[-1]
    assert z["zero_stage"] == stage
    assert_partitioned_state(z, P)
    ratio = z["optimizer_state_bytes"] / ref["optimizer_state_bytes"]
    assert 0.99 / P <= ratio <= 1.05 / P, ratio
    if stage == 1:  # full gradients until the step
        assert z["grad_bytes"] == z["param_bytes"]
    else:  # this rank's partition, plus at most the two parameters straddling its edges
        largest = 4 * max(V * E, FFN * E, 2 * E * E, L * E)
        assert z["grad_bytes"] <= z["param_bytes"] / P + 2 * largest, z
        assert z["grad_bytes"] < 0.4 * ref["grad_bytes"], (z, ref)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nvidia_sp_zero1_matches_plain(tmp_path):
    """nvidia-sp (TP = 2, sequence_parallel) with ZeRO-1 over its D = 2 data replicas."""
    plain = train(tmp_path / "plain", NVIDIA_SP)
    rows = train(tmp_path / "zero", [*NVIDIA_SP, "--zero-stage", "1"])
    assert_same_training(rows, plain, "nvidia-sp ZeRO-1")
    assert_partitioned_state(rows[-1], 2)  # each TP shard partitioned over D = 2
    ratio = rows[-1]["optimizer_state_bytes"] / plain[-1]["optimizer_state_bytes"]
    assert 0.99 / 2 <= ratio <= 1.05 / 2, ratio
