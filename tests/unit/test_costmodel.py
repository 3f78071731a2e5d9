"""The cost model (analysis.costmodel), its parts one by one: no trainer launches.

Its predictions against real trainer runs: tests/e2e/test_costmodel.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from analysis.costmodel import (
    Assumptions,
    Network,
    config_from_model,
    config_from_preset,
    make_config,
    predict,
)
from analysis.costmodel.counts import buckets, shape_from_config
from analysis.costmodel.hw import DEVICES, SUMMIT, get_device

ROOT = Path(__file__).resolve().parents[2]


def test_model_flops_equal_trainer_formula():
    from lss_megatron.config import ModelConfig
    from lss_megatron.training.metrics import model_flops_per_step

    for kw in (
        {},
        {"num_kv_heads": 2, "causal": False, "vocab_size": 200},
        {"num_layers": 12, "hidden_size": 512, "num_heads": 8, "seq_length": 50112},
    ):
        m = ModelConfig(**kw)
        cfg = config_from_model("lss", 1, 1, m, global_batch_size=24)
        assert predict(cfg)["model_flops_per_step"] == model_flops_per_step(m, 24)


# --- pure unit tests ---------------------------------------------------------------------------
def test_alpha_beta_intra_vs_inter_node():
    net = Network(
        gpus_per_node=8, intra_bw=100e9, inter_bw_per_node=40e9, intra_alpha=1e-6, inter_alpha=1e-5
    )
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
    kw = dict(num_layers=12, hidden_size=512, num_heads=8, seq_length=6912, global_batch_size=4)
    preds = {
        m: predict(make_config(m, 8, 4, **kw), device="a100")
        for m in ("lss", "ulysses", "ring", "nvidia-sp")
    }
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
    half = predict(
        make_config("lss", 16, 1, **kw),
        device="v100-summit",
        assumptions=Assumptions(gemm_efficiency=0.35),
    )
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

    cfg = make_config(
        "lss",
        6,
        4,
        num_layers=2,
        hidden_size=768,
        num_heads=12,
        seq_length=6144,
        global_batch_size=4,
    )
    out = peers(cfg, device="v100-summit")
    assert set(out) == {"lss", "nvidia-sp", "ulysses", "ring"}
    (problem,) = out["nvidia-sp"]["problems"]  # the trainer's own message: the vocabulary
    assert "--mode nvidia-sp" in problem and "vocabulary 256" in problem and "N = 6" in problem
    for mode in ("lss", "ulysses", "ring"):
        assert out[mode]["mode"] == mode and out[mode]["world_size"] == 24
    assert cfg["parallel"]["mode"] == "lss"  # the caller's dict is left alone


def test_preset_yaml_is_read():
    cfg = config_from_preset(ROOT / "launch/presets/paper-enwik8-3456gpu.yaml")
    s = shape_from_config(cfg["model"])
    assert (s.layers, s.hidden, s.heads, s.seq) == (12, 512, 8, 50112)
    assert (cfg["parallel"]["seq_parallel"], cfg["parallel"]["data_parallel"]) == (144, 24)


def test_configs_are_the_trainers_own():
    """make_config and config_from_preset give exactly the trainer's effective configuration
    (its parser, defaults and derivations), plus the cost model's section."""
    from lss_megatron.train import config_from_argv

    def trainer(argv: list[str], world: int) -> dict:  # what the trainer itself would run
        return config_from_argv(argv, world).to_dict()

    cfg = make_config(
        "lss",
        2,
        2,
        num_layers=2,
        hidden_size=64,
        num_heads=8,
        seq_length=128,
        global_batch_size=8,
        micro_batch_size=1,
        num_kv_heads=4,
        position_embedding="rope",
        causal=False,
        kv_gather_chunks=2,
    )
    assert cfg.pop("costmodel") == {"attention_kernel": "auto"}
    assert cfg == trainer(
        [
            "--mode",
            "lss",
            "--seq-parallel",
            "2",
            "--data-parallel",
            "2",
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-heads",
            "8",
            "--seq-length",
            "128",
            "--global-batch-size",
            "8",
            "--micro-batch-size",
            "1",
            "--num-kv-heads",
            "4",
            "--position-embedding",
            "rope",
            "--no-causal",
            "--kv-gather-chunks",
            "2",
        ],
        4,
    )
    assert cfg["train"]["num_micro_batches"] == 4 and cfg["model"]["ffn_hidden_size"] == 256
    tiny = ROOT / "launch/presets/tiny-cpu.yaml"  # N left out: the trainer's default, on P = 1
    got = config_from_preset(tiny, num_layers=3)
    got.pop("costmodel")
    assert got == trainer(["--config", str(tiny), "--num-layers", "3"], 1)


def test_layouts_the_trainer_refuses_are_refused_with_its_messages():
    from analysis.costmodel import layout_problems, peers
    from lss_megatron.config import ConfigError

    kw = dict(num_layers=2, hidden_size=768, num_heads=12, seq_length=6144, global_batch_size=8)
    with pytest.raises(ConfigError, match=r"--num-heads 12 is not divisible by N = 8"):
        make_config("ulysses", 8, 1, **kw)
    with pytest.raises(ConfigError, match=r"--seq-length 6144 is not divisible by --seq-parallel"):
        make_config("lss", 7, 1, **kw)
    with pytest.raises(ConfigError, match=r"rejects the arguments.*--mode nonsense"):
        make_config("nonsense", 2, 1, **kw)
    out = peers(make_config("lss", 8, 1, **kw))
    assert {m for m, p in out.items() if "problems" in p} == {"nvidia-sp", "ulysses"}
    assert any("--num-heads 12" in x for x in out["ulysses"]["problems"])
    # what-ifs beyond the trainer, checked as their trainer twins: ring as lss, fp16 as fp32
    ring = make_config("ring", 8, 1, dtype="fp16", **kw)
    assert (ring["parallel"]["mode"], ring["train"]["dtype"]) == ("ring", "fp16")
    assert layout_problems(ring) == []
    assert predict(ring)["mode"] == "ring"
    ring["model"]["seq_length"] = 6145
    assert layout_problems(ring) == ["--seq-length 6145 is not divisible by --seq-parallel 8"]


def test_cli_bad_input_is_one_error_and_exit_2(tmp_path):
    for args, names in (
        (["--preset", "summit-paper", "--set", "num_heads=7"], "--num-heads 7"),
        (["--config", str(tmp_path / "missing.json")], "missing.json"),
    ):
        res = subprocess.run(
            [sys.executable, "-m", "analysis.costmodel", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.count("error:") == 1 and names in res.stderr and res.stdout == ""


def test_summit_paper_report():
    from analysis.costmodel.paper import PAPER_CLAIMS, summit_layout, summit_paper

    rep = summit_paper()
    assert {c["paper"] for c in rep["claims"]} == {5.6, 10.2, 161.0, 32.0, 50112.0}
    for c in rep["claims"]:
        assert set(c["model"]) == {"paper-2023", "modern"} and "reached" not in c
        assert all(v > 0 for m in c["model"].values() for v in m.values())
        assert c["label"] and c["assumptions"] and all(c["driven_by"].values())
        for s, readings in c["model"].items():  # the ratio is model / claim, reading by reading
            for r, v in readings.items():
                assert c["model_over_claim"][s][r] == pytest.approx(v / c["paper"])
        assert c["paper"] == PAPER_CLAIMS[c["claim"]]["value"]
    by = {c["claim"]: c for c in rep["claims"]}
    assert by["speedup"]["model"]["paper-2023"]["per_iteration_t6"] > 1.0  # faster, not 5.6x
    assert by["memory"]["model"]["paper-2023"]["bytes_per_gpu_t6"] > 1.0
    d = rep["details"]["paper-2023"]["144"][6]
    assert d["lss"]["world_size"] == d["sp"]["world_size"] == 144
    assert (d["lss"]["seq_parallel"], d["sp"]["seq_parallel"]) == (144, 6)
    assert d["longest"]["lss"] > d["longest"]["nvidia-sp"]
    # at the same degree N = 6 inside a node, LSS's K/V gather is cheaper than SP's collectives
    same = {m: summit_layout("144", mode=m) for m in ("lss", "nvidia-sp")}
    assert (
        same["lss"]["time_breakdown_s"]["sp_comm_exposed"]
        < same["nvidia-sp"]["time_breakdown_s"]["sp_comm_exposed"]
    )
    big = rep["details"]["paper-2023"]["3456"]
    assert big["run"]["world_size"] == 3456 and big["seq_length"] == 50112
    assert big["flops_per_s"] == pytest.approx(
        big["run"]["model_flops_per_step"] / big["run"]["step_time_s"]
    )


def test_summit_layout_what_if():
    from analysis.costmodel.paper import summit_layout

    r = summit_layout(
        "144", mode="nvidia-sp", seq_parallel=2, data_parallel=72, global_batch_size=72
    )
    assert (r["mode"], r["world_size"], r["device"]) == (
        "nvidia-sp",
        144,
        "V100 SXM2 16 GB (Summit)",
    )
    with pytest.raises(ValueError):
        summit_layout("288")


def test_cli_prints_each_claim_beside_the_model():
    res = subprocess.run(
        [sys.executable, "-m", "analysis.costmodel", "--preset", "summit-paper"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for label, paper in (
        ("speed vs NVIDIA SP", "5.60x"),
        ("memory vs NVIDIA SP", "10.20x"),
        ("parallel efficiency", "161%"),
        ("throughput", "32 PFLOP/s"),
        ("sequence length on 3,456", "50,112 tokens"),
    ):
        (row,) = [x for x in lines if x.startswith(f"{label}") and paper in x]
        assert len(row.split(" | ")) == 5  # claim | paper-2023 | modern | ratios | driven by
        assert "paper-2023:" in row and "modern:" in row
    assert "reached" not in res.stdout and "assumption | value | source" in res.stdout


def _options_config(mode, n, d, *, zero=0, layout="contiguous", chunks=1, **model) -> dict:
    cfg = make_config(
        mode,
        n,
        d,
        num_layers=2,
        hidden_size=64,
        num_heads=8,
        num_kv_heads=4,
        ffn_hidden_size=256,
        micro_batch_size=1,
        lss_layout=layout,
        **model,
    )
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
        249092,
        498176,
        1120902,
    )
    assert (z2["optimizer_state_bytes"], z2["grad_bytes"], z2["grad_comm_bytes"]) == (
        249092,
        182016,
        1868166,
    )
    assert z1["other_comm_bytes"] == 12 and z1["sp_comm_bytes"] == plain["sp_comm_bytes"]
    learned = dict(seq_length=256, global_batch_size=4, vocab_size=250)
    z1 = predict(_options_config("lss", 2, 2, zero=1, **learned))  # the table is whole: [l, E]
    z2 = predict(_options_config("lss", 2, 2, zero=2, **learned))
    assert (z1["param_bytes"], z1["optimizer_state_bytes"], z1["grad_comm_bytes"]) == (
        560640,
        280324,
        1261446,
    )
    assert (z2["grad_bytes"], z2["grad_comm_bytes"]) == (146432, 2102406)
    both = predict(_options_config("lss", 4, 1, layout="zigzag", chunks=2, **learned))
    # 727,872 until the zigzag reorder moved inside the K/V gather (issue 21): autograd no longer
    # keeps the 2N-entry int64 chunk order per gather (2 x 2 x 64 bytes fewer)
    assert (both["activation_bytes"], both["sp_comm_bytes"]) == (727616, 786432)
