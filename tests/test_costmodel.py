"""The cost model (analysis.costmodel) against real trainer runs, plus unit tests of its parts.

Trainer runs (fp32, small models, micro-batching) cover serial, lss (N=2 D=1, N=2 D=2 learned,
N=4 rope) and nvidia-sp (N=2, N=2 D=2); they are launched together under torchrun with a hard
timeout (each run spends most of its time importing, so running them side by side is faster than
in a row even on 2 cores). Every metrics row must show exactly the predicted ``sp_comm_bytes``,
``grad_comm_bytes`` (and other counters), and ``activation_bytes``, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.costmodel import (
    Assumptions,
    Network,
    config_from_preset,
    make_config,
    predict,
)
from analysis.costmodel_counts import buckets, shape_from_config
from analysis.costmodel_hw import DEVICES, SUMMIT, get_device

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 150
COMMON = ["--num-layers", "2", "--hidden-size", "32", "--num-heads", "4", "--seq-length", "64",
          "--vocab-size", "64", "--steps", "2", "--progress", "off", "--dist-timeout", "60",
          "--optimizer", "adamw", "--dtype", "fp32"]  # fmt: skip
RUNS = {  # name: (processes, flags); G / (D B) > 1 everywhere: micro-batching
    "serial": (2, ["--mode", "serial", "--global-batch-size", "4", "--micro-batch-size", "1"]),
    "lss-n2": (2, ["--mode", "lss", "--seq-parallel", "2", "--data-parallel", "1",
                   "--global-batch-size", "2", "--micro-batch-size", "1"]),
    "lss-n2d2": (4, ["--mode", "lss", "--seq-parallel", "2", "--data-parallel", "2",
                     "--position-embedding", "learned", "--global-batch-size", "4",
                     "--micro-batch-size", "1"]),
    "lss-n4-rope": (4, ["--mode", "lss", "--seq-parallel", "4", "--position-embedding", "rope",
                        "--num-kv-heads", "2", "--global-batch-size", "4",
                        "--micro-batch-size", "2"]),
    "nvsp-n2": (2, ["--mode", "nvidia-sp", "--seq-parallel", "2", "--global-batch-size", "2",
                    "--micro-batch-size", "1"]),
    "nvsp-n2d2": (4, ["--mode", "nvidia-sp", "--seq-parallel", "2", "--data-parallel", "2",
                      "--position-embedding", "rope", "--global-batch-size", "4",
                      "--micro-batch-size", "1"]),
}  # fmt: skip
EXACT = ("sp_comm_bytes", "grad_comm_bytes", "other_comm_bytes", "sp_comm_calls",
         "grad_comm_calls", "param_bytes", "grad_bytes", "optimizer_state_bytes",
         "model_flops_per_step")  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Launch every run at once; return {name: (config, metrics rows)}."""
    base = tmp_path_factory.mktemp("costmodel")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name, (nproc, flags) in RUNS.items():
        out = base / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "lss_megatron.train", *COMMON, *flags,
               "--out", str(out)]  # fmt: skip
        log = (base / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT, start_new_session=True), out, log)  # fmt: skip
    deadline = time.monotonic() + RUN_TIMEOUT_S
    failed, late = [], []
    try:
        for name, (p, _, _) in procs.items():
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(name)
                break
            if p.returncode != 0:
                failed.append(f"{name}: exit {p.returncode}\n"
                              + (base / f"{name}.log").read_text()[-2000:])  # fmt: skip
    finally:
        for p, _, log in procs.values():  # hard stop: the whole process group of a live run
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
            log.close()
    assert not late, f"trainer run {late[0]} did not finish within {RUN_TIMEOUT_S} s"
    assert not failed, "\n".join(failed)
    result = {}
    for name, (_, out, _) in procs.items():
        config = json.loads((out / "config.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
        assert len(rows) == 2, name
        result[name] = (config, rows)
    return result


@pytest.mark.parametrize("name", list(RUNS))
def test_counts_match_trainer(runs, name):
    config, rows = runs[name]
    pred = predict(config)
    assert config["train"]["num_micro_batches"] > 1  # micro-batching is exercised
    for row in rows:  # the first step counts the same collectives as the others
        for key in EXACT:
            assert pred[key] == row[key], (name, row["step"], key, pred[key], row[key])
        assert pred["activation_bytes"] == row["activation_bytes"], (
            name, pred["activation_bytes"], row["activation_bytes"])  # fmt: skip
    assert pred["parameters_per_rank"] == config["runtime"]["parameters_per_rank"]


def test_model_flops_equal_trainer_formula():
    from lss_megatron.config import ModelConfig
    from lss_megatron.metrics import model_flops_per_step

    for kw in ({}, {"num_kv_heads": 2, "causal": False, "vocab_size": 200},
               {"num_layers": 12, "hidden_size": 512, "num_heads": 8, "seq_length": 50112}):  # fmt: skip
        m = ModelConfig(**kw)
        cfg = make_config("lss", 1, 1, num_layers=m.num_layers, hidden_size=m.hidden_size,
                          num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                          seq_length=m.seq_length, vocab_size=m.vocab_size, causal=m.causal,
                          global_batch_size=24)  # fmt: skip
        assert predict(cfg)["model_flops_per_step"] == model_flops_per_step(m, 24)


# --- pure unit tests ---------------------------------------------------------------------------
def test_alpha_beta_intra_vs_inter_node():
    net = Network(gpus_per_node=8, intra_bw=100e9, inter_bw_per_node=40e9, intra_alpha=1e-6,
                  inter_alpha=1e-5)  # fmt: skip
    assert net.placement(8, 1) == (8, 1) and net.placement(16, 1) == (8, 2)
    assert net.placement(4, 8) == (1, 4)  # a data group strided by a node: one member per node
    assert net.link(8) == (1e-6, 100e9)  # inside a node
    # a consecutive group over 2 nodes: one ring stream per node interface
    assert net.link(16) == (1e-5, 40e9)
    # strided data groups: 8 concurrent groups share each node's interface
    assert net.link(4, stride=8) == (1e-5, 5e9)
    mb = 1e8
    assert net.time("all_gather", mb, 8) == pytest.approx(7 * 1e-6 + mb / 100e9)
    assert net.time("all_gather", mb, 16) == pytest.approx(15 * 1e-5 + mb / 40e9)
    assert net.time("all_gather", mb, 16) > net.time("all_gather", mb, 8)
    assert net.time("all_reduce", mb, 1) == 0.0
    # latency-bound all-reduce over many ranks takes the tree
    big = net.time("all_reduce", 8, 4096)
    assert big == pytest.approx(2 * 12 * 1e-5 + 8 * 4096 / 4095 / (40e9 / 1), rel=1e-6)


def test_summit_sockets_and_interface():
    # 6 GPUs: 3 per socket; a ring over the whole node crosses the 32 GB/s X-Bus
    assert SUMMIT.link(3)[1] == 50e9 and SUMMIT.link(6)[1] == 32e9
    assert SUMMIT.link(2)[1] == 50e9
    assert SUMMIT.link(144)[1] == 23e9  # 24 nodes: the EDR interface
    assert SUMMIT.link(24, stride=6)[1] == pytest.approx(23e9 / 6)


def test_device_presets():
    assert set(DEVICES) >= {"v100-summit", "a100", "h100", "h200"}
    v100 = get_device("v100-summit")
    assert v100.network.gpus_per_node == 6 and v100.memory_bytes == 16e9
    assert v100.peak("fp32") == 15.7e12 and v100.peak("fp16") == 125e12
    with pytest.raises(ValueError):
        v100.peak("bf16")  # V100 has no bf16
    assert get_device("h200").memory_bytes == 141e9
    assert get_device("h200").hbm_bw == 4.3e12 and get_device("h200").peak("bf16") == 790e12
    assert get_device("a100").network.gpus_per_node == 8
    with pytest.raises(ValueError):
        get_device("tpu")


def test_buckets_follow_grad_sync():
    mib = 1024 * 1024
    assert buckets([10 * mib, 10 * mib, 10 * mib]) == [20 * mib, 10 * mib]
    assert buckets([30 * mib, 1]) == [1, 30 * mib]  # an oversized tensor gets its own bucket
    assert buckets([]) == []


def test_step_time_and_peers_at_paper_scale():
    kw = dict(num_layers=12, hidden_size=512, num_heads=8, seq_length=6912,
              global_batch_size=4)  # fmt: skip
    preds = {m: predict(make_config(m, 8, 4, **kw), device="a100") for m in
             ("lss", "ulysses", "ring", "nvidia-sp")}  # fmt: skip
    for m, p in preds.items():
        assert p["step_time_s"] > 0 and p["achieved_flops_per_s"] > 0, m
        assert p["step_time_s"] == pytest.approx(sum(p["time_breakdown_s"].values()))
    seg_bytes = (6912 // 8) * 512 * 4  # one local [l/N, b=1, E] fp32 activation
    # per layer: LSS gathers and reduce-scatters [K|V] (7 x 2 segments), ring passes [K|V] 3 x 7
    # times, Ulysses all-to-alls q, k, v and the output both ways (8 x 7/8 of a segment)
    assert preds["lss"]["sp_comm_bytes"] == 12 * 2 * 7 * 2 * seg_bytes
    assert preds["ring"]["sp_comm_bytes"] == 12 * 3 * 7 * 2 * seg_bytes
    assert preds["ulysses"]["sp_comm_bytes"] == 12 * 8 * (7 * seg_bytes // 8)
    # the gathered K/V makes LSS save more than ring attention, less than materialised scores
    assert preds["ring"]["activation_bytes"] < preds["lss"]["activation_bytes"]
    assert preds["lss"]["activation_bytes"] < preds["nvidia-sp"]["activation_bytes"]
    # halving the GEMM efficiency doubles the GEMM time and leaves communication alone
    base = predict(make_config("lss", 16, 1, **kw), device="v100-summit")
    assert base["time_breakdown_s"]["sp_comm_exposed"] > 0  # 16 ranks: crosses nodes
    half = predict(make_config("lss", 16, 1, **kw), device="v100-summit",
                   assumptions=Assumptions(gemm_efficiency=0.35))  # fmt: skip
    b, h = base["time_breakdown_s"], half["time_breakdown_s"]
    assert h["gemm"] == pytest.approx(2 * b["gemm"])
    assert h["sp_comm_exposed"] == b["sp_comm_exposed"]
    # the same group inside one node is cheaper per byte than across nodes
    inside = predict(make_config("lss", 6, 1, **kw), device="v100-summit")
    per_byte_in = inside["time_breakdown_s"]["sp_comm_exposed"] / inside["sp_comm_bytes"]
    per_byte_across = b["sp_comm_exposed"] / base["sp_comm_bytes"]
    assert per_byte_in < per_byte_across


def test_peers_share_the_layout_and_refuse_what_cannot_run():
    from analysis.costmodel import peers

    cfg = make_config("lss", 6, 4, num_layers=2, hidden_size=768, num_heads=12, seq_length=6144,
                      global_batch_size=4)  # fmt: skip
    out = peers(cfg, device="v100-summit")
    assert set(out) == {"lss", "nvidia-sp", "ulysses", "ring"}
    assert out["nvidia-sp"]["problems"] == [
        "nvidia-sp: padded_vocab_size 256 not divisible by N = 6"
    ]
    for mode in ("lss", "ulysses", "ring"):
        assert out[mode]["mode"] == mode and out[mode]["world_size"] == 24
    assert cfg["parallel"]["mode"] == "lss"  # the caller's dict is left alone


def test_preset_yaml_is_read():
    cfg = config_from_preset(ROOT / "launch/presets/paper-enwik8-3456gpu.yaml")
    s = shape_from_config(cfg["model"])
    assert (s.layers, s.hidden, s.heads, s.seq) == (12, 512, 8, 50112)
    assert (cfg["parallel"]["seq_parallel"], cfg["parallel"]["data_parallel"]) == (144, 24)


def test_summit_paper_report():
    from analysis.costmodel_paper import summit_paper

    rep = summit_paper()
    assert {c["paper"] for c in rep["claims"]} == {5.6, 10.2, 161.0, 32.0}
    for c in rep["claims"]:
        assert set(c["model"]) == {"fp32", "fp16"}
        assert all(v > 0 for v in c["model"].values())
        assert c["label"] and c["assumptions"] and c["why"]
        assert c["reached"] == any(r >= 0.8 for r in c["model_over_paper"].values())
    by_label = {c["label"]: c for c in rep["claims"]}
    assert by_label["speed vs NVIDIA SP, 144 V100"]["model"]["fp32"] > 1.0  # faster, not 5.6x
    assert by_label["memory vs NVIDIA SP, 144 V100: bytes per GPU"]["model"]["fp32"] > 1.0
    d = rep["details"]["144"]["fp32"]
    assert d["lss"]["world_size"] == d["nvidia-sp"]["world_size"] == 144
    assert (
        d["lss"]["time_breakdown_s"]["sp_comm_exposed"]
        < d["nvidia-sp"]["time_breakdown_s"]["sp_comm_exposed"]
    )
    assert d["max_seq_length"]["lss"] > d["max_seq_length"]["nvidia-sp"]
    big = rep["details"]["3456"]["fp32"]
    assert big["run"]["world_size"] == 3456 and big["tokens_per_gpu"] == 348
    assert big["petaflops"] == pytest.approx(
        big["run"]["model_flops_per_step"] / big["run"]["step_time_s"] / 1e15
    )


def test_summit_layout_what_if():
    from analysis.costmodel_paper import summit_layout

    r = summit_layout("144", mode="nvidia-sp", seq_parallel=2, data_parallel=72,
                      global_batch_size=72)  # fmt: skip
    assert (r["mode"], r["world_size"], r["device"]) == (
        "nvidia-sp",
        144,
        "V100 SXM2 16 GB (Summit)",
    )
    with pytest.raises(ValueError):
        summit_layout("288")


def test_cli_prints_each_claim_beside_the_model():
    res = subprocess.run([sys.executable, "-m", "analysis.costmodel", "--preset", "summit-paper"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for label, paper in (("speed vs NVIDIA SP", "5.60x"), ("bytes per GPU", "10.20x"),
                         ("longest l", "10.20x"), ("parallel efficiency", "161.0%"),
                         ("throughput", "32.0PFLOP/s")):  # fmt: skip
        row = next(x for x in lines if label in x and paper in x)
        assert row.rstrip().endswith(("yes", "NO")) and len(row.split()) >= 6
    assert "assumptions:" in res.stdout and "why not reached" in res.stdout


def _options_config(mode, n, d, *, zero=0, layout="contiguous", chunks=1, **model) -> dict:
    cfg = make_config(mode, n, d, num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4,
                      ffn_hidden_size=256, micro_batch_size=1, lss_layout=layout,
                      **model)  # fmt: skip
    cfg["parallel"]["kv_gather_chunks"] = chunks
    cfg["train"]["zero_stage"] = zero
    return cfg


def test_options_beyond_the_paper_match_counted_runs():
    """Zigzag balance, chunked gathers and ZeRO-1/2 memory and traffic: the numbers the trainer
    counted in runs of these configurations (CPU, gloo, DeepSpeed 0.19.8), kept here so the
    formulas are checked without launching (tests/test_compare_options.py checks them live)."""
    rope = dict(seq_length=512, global_batch_size=2, position_embedding="rope")
    plain = predict(_options_config("lss", 4, 1, **rope))
    assert plain["attention_imbalance"] == pytest.approx(57408 / 32832)  # rank 3 over the mean
    assert (
        predict(_options_config("lss", 4, 1, layout="zigzag", **rope))["attention_imbalance"] == 1
    )
    assert predict(_options_config("ulysses", 4, 1, **rope))["attention_imbalance"] is None
    kv4 = predict(_options_config("lss", 4, 1, chunks=4, **rope))
    assert (kv4["sp_comm_bytes"], kv4["sp_comm_calls"]) == (786432, 4 * plain["sp_comm_calls"])
    assert kv4["activation_bytes"] == 1490048 and plain["activation_bytes"] == 1424512
    assert kv4["kv_transient_bytes"] * 4 == plain["kv_transient_bytes"] == 512 * 2 * 4 * 8 * 4
    z1 = predict(_options_config("lss", 4, 1, zero=1, **rope))
    z2 = predict(_options_config("lss", 4, 1, zero=2, **rope))
    assert (z1["optimizer_state_bytes"], z1["grad_bytes"], z1["grad_comm_bytes"]) == (
        249092, 498176, 1120902)  # fmt: skip
    assert (z2["optimizer_state_bytes"], z2["grad_bytes"], z2["grad_comm_bytes"]) == (
        249092, 182016, 1868166)  # fmt: skip
    assert z1["other_comm_bytes"] == 12 and z1["sp_comm_bytes"] == plain["sp_comm_bytes"]
    learned = dict(seq_length=256, global_batch_size=4, vocab_size=250)
    z1 = predict(_options_config("lss", 2, 2, zero=1, **learned))  # the table is whole: [l, E]
    z2 = predict(_options_config("lss", 2, 2, zero=2, **learned))
    assert (z1["param_bytes"], z1["optimizer_state_bytes"], z1["grad_comm_bytes"]) == (
        560640, 280324, 1261446)  # fmt: skip
    assert (z2["grad_bytes"], z2["grad_comm_bytes"]) == (146432, 2102406)
    both = predict(_options_config("lss", 4, 1, layout="zigzag", chunks=2, **learned))
    assert (both["activation_bytes"], both["sp_comm_bytes"]) == (727872, 786432)
