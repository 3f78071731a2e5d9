"""The summit-paper claims under named assumption sets, and the modelled series the paper
figures draw (analysis.costmodel.paper, .scenarios). No trainer launches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from analysis.costmodel import Assumptions, make_config, predict
from analysis.costmodel.counts import layout_from_config, probs_bytes
from analysis.costmodel.paper import PAPER_CLAIMS, Options, paper_series, summit_paper
from analysis.costmodel.scenarios import ASSUMPTION_SETS, SP_DEGREES, get_set, setup_144

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def series() -> dict:
    return paper_series("paper-2023")


@pytest.fixture(scope="module")
def report() -> dict:
    return summit_paper()


def test_every_claim_has_a_row_under_both_sets_with_model_over_claim(report):
    rep = report
    assert [c["claim"] for c in rep["claims"]] == list(PAPER_CLAIMS)
    for c in rep["claims"]:
        assert set(c["model"]) == set(c["driven_by"]) == {"paper-2023", "modern"}
        for s in ("paper-2023", "modern"):
            assert c["model"][s] and set(c["model"][s]) == set(c["model_over_claim"][s])
            for reading, value in c["model"][s].items():
                assert c["model_over_claim"][s][reading] == value / c["paper"]
    speed = next(c for c in rep["claims"] if c["claim"] == "speedup")["model"]["paper-2023"]
    assert {f"per_iteration_t{t}" for t in SP_DEGREES} <= set(speed)  # both speed readings
    assert {f"equal_tokens_t{t}" for t in SP_DEGREES} <= set(speed)
    flops = next(c for c in rep["claims"] if c["claim"] == "throughput")["model"]["modern"]
    assert flops["full_square_flops"] > flops["causal_flops"]  # both FLOP conventions
    assert {row["assumption"] for row in rep["sources"]} >= {"paper-2023 kernel", "modern"}


def test_the_sets_differ_in_kernel_and_precision_on_both_sides(report):
    for name, kernel, dtype in (
        ("paper-2023", "materialized", "fp16"),
        ("modern", "flash", "bf16"),
    ):
        a = get_set(name)
        for mode, degree in (("lss", 144), ("nvidia-sp", 6), ("nvidia-sp", 12)):
            cfg = setup_144(a, mode, degree)
            lay = layout_from_config(cfg)
            assert (lay.attention_kernel, cfg["train"]["dtype"], lay.act_bytes) == (
                kernel,
                dtype,
                2,
            )
            assert (lay.mode, lay.n, lay.world) == (mode, degree, 144)
    rep = report
    lay = {s: rep["details"][s]["layouts"] for s in ASSUMPTION_SETS}
    assert lay["paper-2023"]["lss"]["attention_kernel"] == "materialized"
    assert lay["modern"]["nvidia-sp"] == {"dtype": "bf16", "attention_kernel": "flash"}
    sp = {s: rep["details"][s]["144"][6]["sp"] for s in ASSUMPTION_SETS}
    assert sp["paper-2023"]["activation_bytes"] > 10 * sp["modern"]["activation_bytes"]


def test_options_change_what_they_claim_to():
    a = get_set("paper-2023")
    lss = setup_144(a, "lss", 144)
    plain = predict(lss, "v100-summit")
    hidden = predict(lss, "v100-summit", Assumptions(overlap_kv_gather=True))
    assert (
        hidden["time_breakdown_s"]["sp_comm_exposed"] < plain["time_breakdown_s"]["sp_comm_exposed"]
    )
    sp = predict(setup_144(a, "nvidia-sp", 6), "v100-summit")
    sel = predict(setup_144(a, "nvidia-sp", 6, recompute="selective"), "v100-summit")
    assert sel["activation_bytes"] < sp["activation_bytes"] / 5  # no saved probabilities
    assert sel["time_breakdown_s"]["recompute"] == pytest.approx(
        sel["time_breakdown_s"]["attention"] / 3
    )
    assert sel["step_time_s"] == pytest.approx(sum(sel["time_breakdown_s"].values()))
    rep = summit_paper(("paper-2023",), Options(baseline_recompute="selective"))
    assert rep["options"]["baseline_recompute"] == "selective"
    assert rep["details"]["paper-2023"]["144"][6]["sp"]["recompute"] == "selective"


def test_transient_score_bytes_count_in_fits():
    kw = dict(
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        seq_length=256,
        global_batch_size=2,
        micro_batch_size=1,
        dtype="fp16",
        attention_kernel="materialized",
    )
    p = predict(make_config("nvidia-sp", 2, 1, **kw), device="v100-summit")
    # input grads dq, dk, dv [l, b, h/t, d] + dP (fp16 and fp32 softmax) + dS (fp16)
    heads, ll, d = 2, 256, 16
    expect = 3 * ll * heads * d * 2 + probs_bytes(1, heads, ll, ll, 2) + heads * ll * ll * 2
    assert p["transient_bytes"] == expect
    assert p["peak_bytes"] == p["memory_bytes"] + expect and p["fits_memory"]
    lss = predict(make_config("lss", 2, 1, **{**kw, "attention_kernel": "flash"}))
    assert lss["transient_bytes"] == 128 * 4 * 16 * 2 + lss["kv_transient_bytes"]


def test_paper_series_frames(series):
    cols = {
        "speedup_vs_ranks": [
            "ranks",
            "lss_seq_parallel",
            "sp_tensor_parallel",
            "speedup_per_iteration",
            "speedup_equal_tokens",
        ],
        "memory_vs_length": ["mode", "seq_length", "bytes_per_rank"],
        "longest_vs_ranks": ["mode", "ranks", "longest_seq_length"],
        "weak_scaling": ["ranks", "efficiency"],
        "throughput": ["ranks", "flops_per_s"],
    }
    assert set(series) == set(cols)
    for key, want in cols.items():
        df = series[key]
        assert set(want) <= set(df.columns) and len(df) > 0, key
        assert df.attrs["kind"] == "modelled" and set(df["kind"]) == {"modelled"}
        assert df.attrs["assumptions"] == "paper-2023"
    sp = series["speedup_vs_ranks"]
    equal = sp[sp["ranks"] == 144]
    assert {
        (n, t) for n, t in zip(equal["lss_seq_parallel"], equal["sp_tensor_parallel"], strict=True)
    } == {(n, t) for n in (6, 24, 144) for t in (6, 12)}
    assert (sp[["speedup_per_iteration", "speedup_equal_tokens"]] > 0).all().all()


def test_paper_series_monotone(series):
    longest = series["longest_vs_ranks"]
    lss = longest[longest["mode"] == "lss"].sort_values("ranks")
    assert lss["longest_seq_length"].is_monotonic_increasing and lss["longest_seq_length"].is_unique
    sp = longest[longest["mode"] == "nvidia-sp"]
    assert sp["degree"].max() == 12  # head-capped
    assert lss["longest_seq_length"].iloc[-1] > 3 * sp["longest_seq_length"].max()
    mem = series["memory_vs_length"]
    for _, g in mem.groupby(["mode", "degree"]):
        assert g.sort_values("seq_length")["bytes_per_rank"].is_monotonic_increasing
    assert (mem["bytes_per_rank"] >= mem["held_bytes_per_rank"]).all()
    weak = series["weak_scaling"]
    assert list(weak["ranks"]) == [24 * n for n in weak["seq_parallel"]]
    assert series["throughput"].sort_values("ranks")["flops_per_s"].is_monotonic_increasing


def test_longest_series_with_local_kv(series):
    """Under ``modern`` (flash) the longest-l panel adds LSS with K/V kept local, alone and with
    ZeRO-1 / ZeRO-2 (`LOCAL_KV_SERIES`); keeping K/V local only ever lengthens l (it saves
    (N-1)/N of every layer's gathered K/V for one re-gathered layer's worth of transient), and
    at 144 GPUs it passes the head-capped baseline. Under ``paper-2023`` (materialised scores,
    where the trainer refuses local K/V) the panel has the plain series only."""
    from analysis.costmodel.paper import LOCAL_KV_SERIES, _longest_rows

    assert set(series["longest_vs_ranks"]["variant"]) == {"lss", "nvidia-sp"}
    rows = _longest_rows(get_set("modern"), Options())
    by = {(r["variant"], r["ranks"]): r["longest_seq_length"] for r in rows}
    ranks = sorted({r["ranks"] for r in rows})
    assert {r["variant"] for r in rows} == {"lss", "nvidia-sp", *LOCAL_KV_SERIES}
    assert all(r["mode"] == "lss" for r in rows if r["variant"] in LOCAL_KV_SERIES)
    for p in ranks:
        assert by["lss-local", p] >= by["lss", p], p
    assert by["lss-local", 144] > by["nvidia-sp", 144] > by["lss", 144]


def test_cli_one_assumption_set_names_every_claim():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis.costmodel",
            "--preset",
            "summit-paper",
            "--assumptions",
            "paper-2023",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    rows = [x for x in res.stdout.splitlines() if x.count(" | ") == 3]
    assert rows[0].startswith("claim | model under paper-2023 | model/claim | driven by")
    for claim in PAPER_CLAIMS.values():
        (row,) = [x for x in rows if x.startswith(claim["label"])]
        assert "paper-2023:" in row and "modern" not in row
    assert "layouts under paper-2023: lss fp16 materialized; nvidia-sp fp16 materialized" in (
        res.stdout
    )


def test_preset_comments_quote_the_model():
    """The paper presets' comments carry the cost model's numbers (computed as they say)."""
    from analysis.costmodel.paper import summit_layout

    text = (ROOT / "launch/presets/paper-enwik8-144gpu.yaml").read_text()
    probs_and_mask = probs_bytes(1, 12 // 6, 6144, 6144, 4) + 6144 * 6144  # fp32, t = 6, bool mask
    assert f"{probs_and_mask / 1e9:.2f} GB per layer (4.7 GB of activations" in text
    dense = summit_layout("144", mode="nvidia-sp", attention_kernel="materialized")
    assert f"{dense['peak_bytes'] / 1e9:.1f} GB peak" in text
    big = (ROOT / "launch/presets/paper-enwik8-3456gpu.yaml").read_text()
    flash = summit_layout("3456", attention_kernel="flash")
    dense = summit_layout("3456", attention_kernel="materialized")
    kv = 50112 * 2 * 512 * 4  # the gathered [K | V] of one layer, fp32
    assert (
        f"backward {kv / 1e9:.2f} GB" in big and f"peak {flash['peak_bytes'] / 1e9:.1f} GB" in big
    )
    assert f"{dense['peak_bytes'] / 1e9:.1f} GB peak" in big
