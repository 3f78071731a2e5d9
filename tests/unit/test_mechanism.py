"""The paper's mechanism, without launching the trainer: the equal-ranks preset's plan (every mode
at every layout the trainer allows on P = 4 ranks, nvidia-sp capped by the 2 heads), the
best-layout table, and analysis.longest's search and command line (with a fake trainer whose
bytes are a known function of l, so the answers are worked out by hand)."""

from __future__ import annotations

import csv
import math

import pandas as pd
import pytest

from analysis import longest, presets, tables

pytestmark = pytest.mark.unit


# --- cpu-equal-ranks ----------------------------------------------------------------------------
def test_equal_ranks_plan_is_every_legal_layout_on_four_ranks():
    plan = presets.make_plan(presets.get_preset("cpu-equal-ranks"), repeats=1)
    grid = {(r.label, r.seq_parallel, r.data_parallel) for r in plan.runs if r.role == "grid"}
    assert grid == {
        ("lss", 4, 1),
        ("lss", 2, 2),
        ("nvidia-sp", 2, 2),
        ("ulysses", 2, 2),
        ("ring", 4, 1),
        ("ring", 2, 2),
        ("serial", 1, 4),
    }
    assert {r.world_size for r in plan.runs if r.role == "grid"} == {4}
    refs = [r for r in plan.runs if r.role == "reference"]
    assert [(r.mode, r.world_size) for r in refs] == [("serial", 1)]
    # the same global batch, l, kernel and recompute in every run
    for key in ("global-batch-size", "seq-length", "num-heads"):
        assert len({r.flags[key] for r in plan.runs}) == 1, key
    assert all(r.setting == "" for r in plan.runs)  # flash, no recompute everywhere
    # the head cap, in the trainer's own words
    skipped = dict(plan.skipped)
    assert set(skipped) == {"nvidia-sp_N4_D1_l2048", "ulysses_N4_D1_l2048"}
    assert "--num-heads 2 is not divisible by N = 4" in skipped["nvidia-sp_N4_D1_l2048"]
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)  # serial at P = 4 only once


def _row(mode, n, d, step, saved, **kw):
    return {
        "run_id": f"{mode}_N{n}_D{d}",
        "mode": mode,
        "variant": "",
        "status": "ok",
        "seq_parallel": n,
        "data_parallel": d,
        "world_size": n * d,
        "seq_length": 2048,
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 2,
        "ffn_hidden_size": 512,
        "vocab_size": 256,
        "global_batch_size": 4,
        "micro_batch_size": 1,
        "attention_kernel": "flash",
        "recompute": "none",
        "dtype": "fp32",
        "step_time_s": step,
        "tokens_per_s": 4 * 2048 / step,
        "activation_bytes": saved,
        "transient_peak_bytes": 2 * saved,
        **kw,
    }


def test_best_layouts_picks_the_fastest_layout_and_compares_best_with_best():
    df = pd.DataFrame(
        [
            _row("lss", 4, 1, 1.0, 100),
            _row("lss", 2, 2, 2.0, 150),
            _row("nvidia-sp", 2, 2, 1.5, 400),
            _row("ulysses", 2, 2, 3.0, 300),
            _row("lss", 4, 1, 9.0, 100, dtype="bf16"),  # another setting: never compared
            _row("lss", 4, 1, 5.0, 100, status="failed"),  # failed runs do not count
        ]
    )
    for c in tables.MODEL_KEY:
        if c not in df:
            df[c] = math.nan
    best = tables.best_layouts(df).set_index(["mode", "setting"])
    lss = best.loc[("lss", "flash")]
    assert lss["best_layout"] == "N4 x D1" and lss["layouts_tried"] == "N2 x D2, N4 x D1"
    assert lss["smallest_layout"] == "N4 x D1" and lss["smallest_activation_bytes"] == 100
    assert lss["speedup_vs_nvidia_sp_best"] == pytest.approx(1.5)  # 1.5 s / 1.0 s
    assert lss["activation_ratio_vs_nvidia_sp_best"] == pytest.approx(4.0)  # 400 / 100
    assert best.loc[("ulysses", "flash")]["speedup_vs_nvidia_sp_best"] == pytest.approx(0.5)
    assert best.loc[("nvidia-sp", "flash")]["speedup_vs_nvidia_sp_best"] == pytest.approx(1.0)
    bf16 = best.loc[("lss", "flash, bf16")]  # no nvidia-sp at bf16: no ratio
    assert math.isnan(bf16["speedup_vs_nvidia_sp_best"])
    text = tables.format_best_layouts(best.reset_index())
    assert "speedup_vs_nsp_best" in text and "N4 x D1" in text


# --- analysis.longest ---------------------------------------------------------------------------
MODEL = (
    "--num-layers",
    "2",
    "--hidden-size",
    "128",
    "--num-heads",
    "2",
    "--ffn-hidden-size",
    "512",
    "--vocab-size",
    "256",
)


def test_best_layout_is_the_largest_legal_degree():
    lss, _ = longest.best_layout("lss", 4, MODEL, 256)
    nsp, _ = longest.best_layout("nvidia-sp", 4, MODEL, 256)
    uly, _ = longest.best_layout("ulysses", 4, MODEL, 256)
    assert (lss.seq_parallel, lss.data_parallel) == (4, 1)
    assert (nsp.seq_parallel, nsp.data_parallel) == (2, 2)  # capped by the 2 heads
    assert (uly.seq_parallel, uly.data_parallel) == (2, 2)
    assert lss.step == 256 and longest.best_layout("lss", 4, MODEL, 6)[0].step == 12  # lcm(6, 4)
    args = lss.args(1024)
    assert args[args.index("--steps") + 1] == "1" and args[args.index("--seq-length") + 1] == "1024"
    assert args[args.index("--global-batch-size") + 1] == "1"  # one sequence per rank


def test_a_variant_adds_its_flags_to_its_own_mode_only():
    """`--modes` takes compare's variant labels: lss-local / lss-megatron-cp / lss-overlap set the
    LSS options on the lss runs, while nvidia-sp in the same search runs without them."""
    args, trainer = longest.parse(
        ["--ranks", "2", "--budget-mib", "48", "--out", "X", "--recompute", "none", *MODEL]
        + ["--modes", "lss", "lss-local", "lss-megatron-cp", "lss-overlap", "nvidia-sp"]
    )
    searches, refused = longest.plan(args, trainer)
    assert refused == [] and [s.label for s in searches] == args.modes
    by = {s.label: s for s in searches}

    def flag(label, name):
        a = by[label].args(1024)
        return a[a.index(name) + 1] if name in a else None

    assert by["lss-local"].mode == "lss" and by["lss-local"].seq_parallel == 2
    assert flag("lss-local", "--lss-save-kv") == "local" and flag("lss", "--lss-save-kv") is None
    assert flag("lss-megatron-cp", "--lss-kv-gather") == "separate"
    assert flag("lss-megatron-cp", "--lss-save-kv") == "local"
    assert "--lss-overlap" in by["lss-overlap"].args(1024)
    assert not any(a.startswith("--lss") for a in by["nvidia-sp"].args(1024))
    assert by["lss-local"].run_id(1024) == "lss-local_N2_D1_none_l1024"
    # the trainer's own validation checks a variant's flags: local K/V needs the flash kernel,
    # which the search always sets
    assert longest.trainer_verdict(by["lss-local"].args(1024), 2) is None


def _fake_runner(bytes_per_token: dict[str, float], base: float, fail_at: int | None = None):
    """A trainer stand-in: rank_bytes_max = base + per-token bytes x l (per mode)."""
    calls = []

    def run(search, length):
        calls.append((search.mode, length))
        status = "failed" if fail_at is not None and length >= fail_at else "ok"
        measured = int(base + bytes_per_token[search.mode] * length) if status == "ok" else None
        return {
            "variant": search.label,
            "mode": search.mode,
            "world_size": search.world_size,
            "seq_parallel": search.seq_parallel,
            "data_parallel": search.data_parallel,
            "recompute": search.recompute,
            "seq_length": length,
            "rank_bytes_max": measured,
            "status": status,
            "wall_s": 0.0,
            "error": "" if status == "ok" else "boom",
            "run_dir": f"runs/{search.run_id(length)}",
        }

    return run, calls


def test_search_finds_the_longest_fitting_multiple_and_its_run():
    search = longest.Search("lss", 4, 1, "none", MODEL, 256)
    run, calls = _fake_runner({"lss": 1000.0}, base=1_000_000)
    logged = []
    budget = 5_000_000  # (5e6 - 1e6) / 1000 = 4000 tokens -> 3840 (the largest multiple of 256)
    best, rec = longest.search_longest(search, budget, 1 << 16, run, logged.append)
    assert best == 3840 and rec["seq_length"] == 3840 and rec["fits"]
    assert rec["rank_bytes_max"] == 1_000_000 + 3_840_000 <= budget
    assert all(r["fits"] == (r["rank_bytes_max"] <= budget) for r in logged)
    # doubling stops at the first miss: nothing beyond 2 x the answer was launched
    assert max(length for _, length in calls) <= 2 * best
    assert len(calls) <= 2 * math.ceil(math.log2(best / 256)) + 1


def test_a_failed_run_does_not_fit_and_nothing_is_extrapolated():
    search = longest.Search("nvidia-sp", 2, 2, "none", MODEL, 256)
    run, _ = _fake_runner({"nvidia-sp": 10.0}, base=0, fail_at=1024)
    best, rec = longest.search_longest(search, 1 << 40, 1 << 16, run, lambda r: None)
    assert best == 768 and rec["status"] == "ok"  # 1024 failed (out of memory, say): not a fit
    run, _ = _fake_runner({"nvidia-sp": 10.0}, base=0, fail_at=256)
    assert longest.search_longest(search, 1 << 40, 1 << 16, run, lambda r: None) == (0, None)


def test_best_rows_keep_the_recompute_setting_reaching_furthest():
    rows = [
        {
            "mode": "lss",
            "world_size": 4,
            "longest_seq_length": n,
            "bytes_at_longest": b,
            "recompute": r,
        }
        for n, b, r in ((2048, 9, "none"), (4096, 7, "full"), (4096, 5, "selective"))
    ]
    (best,) = longest.best_rows(rows)
    assert best["recompute"] == "selective"  # same l as full, fewer bytes


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ranks", "0", "--budget-mib", "8", "--out", "X"], "--ranks 0"),
        (["--ranks", "4", "--budget-mib", "-1", "--out", "X"], "--budget-mib -1"),
        (["--ranks", "4", "--budget-mib", "8", "--out", "X", "--seq-length", "64"], "--seq-length"),
        (
            [
                "--ranks",
                "4",
                "--budget-mib",
                "8",
                "--out",
                "X",
                "--num-heads",
                "3",
                "--hidden-size",
                "128",
            ],
            "no legal layout",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    argv = [a.replace("X", str(tmp_path / "out")) for a in argv]
    assert longest.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("analysis.longest: error:") and words in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing launched, nothing written


def test_a_folder_holding_a_table_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "longest.csv").write_text("mode\nlss\n")
    argv = ["--ranks", "4", "--budget-mib", "8", "--out", str(tmp_path)]
    assert longest.main(argv) == 2
    assert "already holds the outputs of another search (longest.csv)" in capsys.readouterr().err
    assert (tmp_path / "longest.csv").read_text() == "mode\nlss\n"


def test_main_writes_the_table_the_searches_and_a_figure(tmp_path, monkeypatch):
    run, _ = _fake_runner(
        {"lss": 1000.0, "nvidia-sp": 2000.0, "ulysses": 2000.0, "ring": 1000.0}, base=0
    )
    monkeypatch.setattr(longest, "launch_one", lambda s, length, out, t: run(s, length))
    out = tmp_path / "out"
    argv = ["--ranks", "4", "--budget-mib", "4", "--out", str(out), "--recompute", "none", *MODEL]
    assert longest.main(argv) == 0
    with (out / "longest.csv").open() as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    assert list(rows["lss"])[:8] == list(longest.COLUMNS[:8])
    # 4 MiB / 1000 B = 4194 tokens -> 4096; / 2000 B = 2097 -> 2048 (multiples of 256)
    assert int(rows["lss"]["longest_seq_length"]) == 4096
    assert int(rows["nvidia-sp"]["longest_seq_length"]) == 2048
    assert (rows["nvidia-sp"]["seq_parallel"], rows["nvidia-sp"]["tensor_parallel"]) == ("2", "2")
    assert rows["lss"]["run_dir"].endswith("lss_N4_D1_none_l4096")
    assert (out / "searches.csv").is_file() and (out / "figures/longest_seq_length.png").is_file()
    # variants are rows of their own, keyed by their label
    out2 = tmp_path / "out2"
    argv = ["--ranks", "4", "--budget-mib", "4", "--out", str(out2), "--recompute", "none"]
    assert longest.main([*argv, "--modes", "lss", "lss-local", *MODEL]) == 0
    with (out2 / "longest.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lss", "lss-local"} and rows["lss-local"]["mode"] == "lss"
    assert rows["lss-local"]["run_dir"].endswith("lss-local_N4_D1_none_l4096")


# --- analysis.paper_figures ---------------------------------------------------------------------
@pytest.mark.slow  # over ~10 s: the fast tier stays under 5 min
def test_paper_figures_draw_measured_beside_modelled(tmp_path, monkeypatch):
    from analysis import paper_figures

    run, _ = _fake_runner(
        {"lss": 1000.0, "nvidia-sp": 2000.0, "ulysses": 2000.0, "ring": 1000.0}, base=0
    )
    monkeypatch.setattr(longest, "launch_one", lambda s, length, out, t: run(s, length))
    lg = tmp_path / "longest"
    assert (
        longest.main(
            [
                "--ranks",
                "2",
                "4",
                "--budget-mib",
                "4",
                "--out",
                str(lg),
                "--recompute",
                "none",
                *MODEL,
            ]
        )
        == 0
    )
    fixture = paper_figures.Path(__file__).resolve().parents[2] / "analysis" / "fixtures"
    out = tmp_path / "figs"
    argv = [
        "--out",
        str(out),
        "--compare",
        str(fixture),
        "--longest",
        str(lg),
        "--assumptions",
        "paper-2023",
    ]
    assert paper_figures.main(argv) == 0
    for name in paper_figures.FIGURES:
        assert (out / f"{name}.png").stat().st_size > 10_000, name
    # without measured inputs the figures still come, their left panels naming the command
    assert paper_figures.main(["--out", str(tmp_path / "bare"), "--assumptions", "modern"]) == 0
    assert len(list((tmp_path / "bare").glob("*.png"))) == len(paper_figures.FIGURES)


def test_paper_figures_bad_input_is_one_line(tmp_path, capsys):
    from analysis import paper_figures

    argv = ["--out", str(tmp_path / "o"), "--longest", str(tmp_path / "nowhere")]
    assert paper_figures.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("analysis.paper_figures: error:") and "longest.csv" in err
    assert "\n" not in err
