"""The prepared GPU check (`bash launch/gpu_check.sh`) stays runnable: every phase runs here on
the CPU at the dry run's toy sizes, in one process (the whole script, trainer subprocesses
included: tests/e2e/test_gpu_check.py); its record is what the cost model reads.

On the GPU machine: ``bash launch/gpu_check.sh --out-dir DIR`` (docs/measurement.md).
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

from analysis import gpu_check
from analysis.costmodel import config_from_model, make_config, predict
from analysis.costmodel.counts import layout_from_config, parameters, shape_from_config
from analysis.costmodel.hw import get_device
from analysis.emulate import (
    SHAPES,
    VARIANTS,
    config_flags,
    emulate_row,
    layer_shapes,
    model_config,
    ranks_of,
)
from analysis.gpu_check import CASES, attention_case, kernels_seen
from lss_megatron.lss.kernel import partial_attention

DRY = SHAPES["dry"]


def test_kernel_spy_tells_fused_from_math_forward_and_backward():
    q, k, v = (torch.randn(8, 1, 2, 16, requires_grad=True) for _ in range(3))
    fwd = kernels_seen(lambda: partial_attention(q, k, v, q_offset=0, causal=True), False)
    assert fwd == {"forward": ["cpu_flash"], "backward": []}
    both = kernels_seen(
        lambda: partial_attention(q, k, v, q_offset=0, causal=True).sum().backward()
    )
    assert both == {"forward": ["cpu_flash"], "backward": ["cpu_flash"]}
    math_ = kernels_seen(
        lambda: partial_attention(q, k, v, q_offset=0, causal=True, backend="math").sum().backward()
    )
    assert math_ == {"forward": ["math"], "backward": ["math"]}  # no fused op: math ran


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: c[0])
def test_attention_case_on_cpu(dtype, case):
    """A last-rank (q_offset > 0) and a zigzag GQA path: the CPU flash kernel ran forward and
    backward, the output and gradients match the float64 reference within the check's own
    tolerances."""
    row = attention_case(torch.device("cpu"), dtype, *case, sq=16, n=2, b=2, d=16)
    assert row["kernels"] == {"forward": ["cpu_flash"], "backward": ["cpu_flash"]}, row
    assert row["ok"], row


@pytest.mark.parametrize("label", list(VARIANTS))
def test_emulated_shards_are_the_cost_models_per_rank_parameters(label):
    """The layer each emulated rank builds holds exactly the parameters the cost model's
    independent per-rank list gives that mode at N (nvidia-sp: QKV, projection and MLP 1/N;
    lss, ulysses: every weight whole), on the first and the last rank. The trainer's own model on
    real gloo ranks: tests/ranks/test_emulate.py."""
    variant = VARIANTS[label]
    cfg = config_from_model(
        variant.mode, DRY.n, 1, model_config(DRY, 1), global_batch_size=1, **config_flags(variant)
    )
    want = {
        p.name.removeprefix("decoder.layers.0."): p.numel
        for p in parameters(shape_from_config(cfg["model"]), layout_from_config(cfg))
        if p.name.startswith("decoder.layers.0.")
    }
    for rank in (0, DRY.n - 1):
        got = layer_shapes(label, DRY, rank)
        assert {k: int(torch.Size(s).numel()) for k, s in got.items()} == want, (label, rank)
    if variant.mode == "nvidia-sp":  # column-parallel rows and row-parallel columns split by N
        assert got["mlp.linear_fc1.weight"] == [DRY.ffn // DRY.n, DRY.hidden]
        assert got["mlp.linear_fc2.weight"] == [DRY.hidden, DRY.ffn // DRY.n]


def test_emulated_rows_time_count_and_price_each_rank():
    """Two rows of the emulation on the CPU: the last LSS rank and an nvidia-sp rank. Each is
    timed rep by rep (>= 5, median of them), ran the CPU flash kernel forward and backward, and
    counted the bytes its collectives would move, which equal the formulas of docs/modes.md
    computed here (LSS: one [K|V] all-gather forward, one reduce-scatter backward, each
    (N-1)/N l b 2 h_kv d es; nvidia-sp: 10 gathers / reduce-scatters of (N-1)/N l b E es), and
    the cost model's; the modelled time prices them (InfiniBand slower than NVLink)."""
    n, seq, es = DRY.n, DRY.seq_length, 2  # bf16
    want = {
        "lss": 2 * (n - 1) * seq * DRY.micro_batch * 2 * DRY.kv_heads * DRY.head_dim * es // n,
        "nvidia-sp": 10 * (n - 1) * seq * DRY.micro_batch * DRY.hidden * es // n,
    }
    for label, rank in (("lss", n - 1), ("nvidia-sp", 0)):
        row = emulate_row(label, DRY, rank, torch.device("cpu"), warmup=1, reps=5)
        assert len(row["times_s"]) == 5 and row["median_s"] == statistics.median(row["times_s"])
        assert row["kernels"] == {"forward": ["cpu_flash"], "backward": ["cpu_flash"]}
        assert row["sp_bytes"] == want[label] == row["cost_model"]["sp_bytes"], row
        assert row["comm_categories"] == ["sp"] and row["output_finite"]
        comm_s = row["modelled_comm_s"]
        assert 0 < comm_s["nvlink"] < comm_s["infiniband"]
        total = row["measured_compute_plus_modelled_comm_s"]["nvlink"]
        assert total == pytest.approx(row["median_s"] + comm_s["nvlink"])
        assert row["local_tokens"] == seq // n and row["rank_label"] == (
            "last" if rank else "first"
        )


def test_emulation_leaves_no_receive_buffer_undefined():
    """Under the emulation's fake backend nothing is delivered: `emulated_rank` starts the
    buffers the backend leaves untouched (point-to-point receives, a broadcast's receivers:
    `emulate.RECEIVE_BUFFERS`) zeroed, and the backend itself writes every other collective's
    output; so a NaN-filled buffer comes back finite from every primitive, and comm knows
    nothing of it. `comm.record()` inside still counts each call with comm's bytes; outside the
    emulation the primitives are torch's own again."""
    import torch.distributed as dist

    from analysis.emulate import RECEIVE_BUFFERS, emulated_rank
    from lss_megatron.parallel import comm

    def nan(*shape):
        return torch.full(shape, float("nan"))

    before = {name: getattr(dist, name) for name in RECEIVE_BUFFERS}
    x = torch.ones(4, 3)
    with emulated_rank(VARIANTS["lss"], 2, 1) as grid:
        g = grid.seq_group
        with comm.record() as log:
            shifted = comm.start_ring_shift(x, g, category="sp").wait()
        outs = {"ring shift": shifted}
        for name, call, out in (
            ("irecv", lambda o: dist.irecv(o, 0, group=g).wait(), nan(4, 3)),
            ("recv", lambda o: dist.recv(o, 0, group=g), nan(4, 3)),
            ("broadcast", lambda o: dist.broadcast(o, 0, group=g), nan(4, 3)),
            (
                "all_gather_into_tensor",
                lambda o: dist.all_gather_into_tensor(o, x, group=g),
                nan(8, 3),
            ),
            ("all_gather", lambda o: dist.all_gather(list(o), x, group=g), nan(2, 4, 3)),
            (
                "reduce_scatter_tensor",
                lambda o: dist.reduce_scatter_tensor(o, x, group=g),
                nan(2, 3),
            ),
            ("reduce_scatter", lambda o: dist.reduce_scatter(o, [x, x], group=g), nan(4, 3)),
            ("all_to_all_single", lambda o: dist.all_to_all_single(o, x, group=g), nan(4, 3)),
            (
                "all_to_all",
                lambda o: dist.all_to_all(list(o), list(x.view(2, 2, 3)), group=g),
                nan(2, 2, 3),
            ),
        ):
            call(out)
            outs[name] = out
        src = torch.ones(2)
        dist.broadcast(src, 1, group=g)  # this rank is the source: its tensor is kept
    assert {k: bool(torch.isfinite(v).all()) for k, v in outs.items()} == dict.fromkeys(outs, True)
    assert shifted.shape == x.shape and bool((src == 1).all())
    assert log.bytes[("isend", "sp")] == x.numel() * 4 and log.calls[("irecv", "sp")] == 1
    assert {name: getattr(dist, name) for name in RECEIVE_BUFFERS} == before


def test_plan_rows_and_ranks():
    """First, middle and last rank where causal work differs (lss, lss-zigzag); one rank where
    every rank does the same work (ulysses, nvidia-sp)."""
    assert ranks_of(VARIANTS["lss"], 8) == [0, 4, 7]
    assert ranks_of(VARIANTS["lss-zigzag"], 8) == [0, 4, 7]
    assert ranks_of(VARIANTS["ulysses"], 8) == ranks_of(VARIANTS["nvidia-sp"], 8) == [0]


def test_planned_seconds_fit_the_budget():
    """The GPU plan covers every phase and fits `BUDGET_S` (420 s) in all."""
    plan = gpu_check.planned_seconds("gpu")
    assert tuple(plan) == gpu_check.PHASES
    assert all(v > 0 for v in plan.values()) and sum(plan.values()) <= gpu_check.BUDGET_S == 420


def test_a_kernel_mix_fails_loudly():
    """Rows that ran different SDPA kernels in one dtype and direction (cuDNN for square causal,
    flash for the offset ranks: what an unpinned sm90 would do) are one failure naming both."""
    cuda = torch.device("cuda")
    same = {"forward": ["flash"], "backward": ["flash"]}
    result = {
        "attention_checks": [
            {"dtype": "bfloat16", "case": "rank0-causal", "kernels": same},
            {"dtype": "float32", "case": "rank0-causal", "kernels": {"forward": ["efficient"]}},
        ],
        "mode_emulation": [{"variant": "lss", "rank": 7, "kernels": same}],
    }
    result["attention_checks"][1]["kernels"]["backward"] = ["efficient"]
    assert gpu_check.kernel_mix(result, cuda) == []
    result["mode_emulation"].append(
        {
            "variant": "nvidia-sp",
            "rank": 0,
            "kernels": {"forward": ["cudnn"], "backward": ["flash"]},
        }
    )
    (line,) = gpu_check.kernel_mix(result, cuda)
    assert "SDPA kernel mix (bf16 forward)" in line and "cudnn" in line and "flash" in line
    assert gpu_check.kernel_summary(result)["bf16 forward"] == {"cudnn": 1, "flash": 2}


def test_efficiency_row_times_every_rep_with_both_flop_conventions():
    row = gpu_check._efficiency_row(
        torch.device("cpu"), 1e12, "last", 1, 16, 2, 4, 2, 16, warmup=1, reps=5
    )
    assert len(row["times_s"]) == 5 and row["kernels"]["backward"] == ["cpu_flash"]
    pairs = 16 * 16 + 16 * 17 // 2  # the last of N = 2: all 16 earlier keys, then causal
    assert row["flops"] == 3 * 4 * 4 * 16 * pairs
    assert row["flops_flash_convention"] == pytest.approx(row["flops"] * 3.5 / 3)


def test_backend_smoke_runs_a_one_rank_all_reduce():
    r = gpu_check.backend_smoke(torch.device("cpu"))
    assert r["backend"] == "gloo" and r["ok"] and r["result"] == [0.0, 1.0, 2.0, 3.0]


def test_a_failing_or_hanging_backend_is_named_not_waited_for():
    """The smoke child's failure (exit and stderr) or silence (timeout) is a result with the
    reason, never a hang or a traceback of the check itself (stand-in children: no NCCL here)."""
    cpu = torch.device("cpu")
    dead = gpu_check.nccl_smoke(cpu, command=["sh", "-c", "echo 'NCCL WARN no socket' >&2; exit 3"])
    assert not dead["ok"] and dead["error"] == "exit 3" and "NCCL WARN" in dead["stderr_tail"]
    hung = gpu_check.nccl_smoke(cpu, timeout_s=1, command=["sleep", "30"])
    assert not hung["ok"] and "no answer within 1 s" in hung["error"]


def test_out_dir_needs_a_fresh_folder_or_overwrite(tmp_path, capsys):
    """A second check into the same folder is refused (one line, exit 2) unless --overwrite,
    which removes the earlier check's own files only."""
    (tmp_path / "gpu_check.json").write_text("{}")
    (tmp_path / "train" / "lss").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    assert gpu_check.main(["--out-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(tmp_path) in err
    assert gpu_check._prepare_out_dir(tmp_path, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


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


def test_dry_shape_is_the_gpu_shapes_form():
    """The dry run's toy has the GPU model's form (GQA 2:1 or 4:1, F = 4E, RoPE) at a degree
    with distinct first, middle and last ranks."""
    gpu = SHAPES["gpu"]
    assert (gpu.heads, gpu.kv_heads, gpu.head_dim, gpu.hidden, gpu.n) == (32, 8, 128, 4096, 8)
    assert DRY.n >= 3 and len(ranks_of(VARIANTS["lss"], DRY.n)) == 3
    assert dataclasses.replace(DRY, n=8).ffn == 4 * DRY.hidden
