"""Packed documents, one process: the JSONL / EOD converter, the document starts against
Megatron's own masks and position ids, the document kernel against a masked oracle, and the
one-line refusals. Every mode against serial: tests/ranks/test_packed.py."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lss_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from lss_megatron.data.documents import document_starts, megatron_masks
from lss_megatron.data.make_indexed import EOD_TOKEN, make_indexed
from lss_megatron.lss.documents import document_attention, document_mask, document_pairs
from tests.support import attention_inputs, run_cmd

TOL = 1e-5  # fp32 kernels against a float64 oracle: rounding only


def test_jsonl_documents_end_in_eod_and_empty_ones_are_counted(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = ["héllo", "", "ab", "", "", "x" * 300]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    stats: dict = {}
    n_docs, n_tokens = make_indexed(
        src, tmp_path / "d", json_key="text", append_eod=True, stats=stats
    )
    ds = IndexedDataset(str(tmp_path / "d"))
    want = [list(t.encode()) + [EOD_TOKEN] for t in texts if t]
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert ds[0].dtype == np.uint16 and EOD_TOKEN == 256
    assert (n_docs, n_tokens, stats["empty_documents"]) == (3, sum(map(len, want)), 3)
    # byte input split at a separator (enwik8's pages: '</page>') with EOD after each page
    raw = tmp_path / "pages.xml"
    raw.write_bytes(b"<page>a</page>\n<page>bc</page>\n")
    make_indexed(raw, tmp_path / "p", separator=b"</page>", append_eod=True)
    pages = IndexedDataset(str(tmp_path / "p"))
    assert [bytes(pages[i][:-1].astype(np.uint8)) for i in range(len(pages))] == [
        b"<page>a</page>",
        b"\n<page>bc</page>",
        b"\n",
    ]
    assert all(pages[i][-1] == EOD_TOKEN for i in range(len(pages)))


def _cli(*args):
    return run_cmd([sys.executable, "-m", "lss_megatron.data.make_indexed", *args], timeout=120)


@pytest.mark.slow  # over ~10 s: the fast tier stays under 5 min
def test_converter_refuses_in_one_line(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a"}\n{"body": "b"}\n')
    res = _cli("--input", src, "--json-keys", "text", "--output-prefix", tmp_path / "o")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "line 2" in res.stderr and "'text'" in res.stderr
    res = _cli("--input", src, "--output-prefix", tmp_path / "o")
    assert res.returncode == 2 and "--json-keys" in res.stderr.splitlines()[-1]


def test_document_starts_are_megatrons_masks_and_positions():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (3, 40), generator=g)  # id 0 plays EOD: ~1 in 6 tokens
    tokens[1, 0] = tokens[1, -1] = 0  # EOD first and last
    mask, loss, pos = megatron_masks(tokens, 0, True, True, True)
    ds = document_starts(tokens, 0)
    assert torch.equal(document_mask(ds, 0, 40, 40), mask[:, 0])
    assert torch.equal(torch.arange(40)[None] - ds, pos)
    assert torch.equal(loss, (tokens != 0).float())
    # a query range in the middle (a rank's segment) sees the same rows of the mask
    assert torch.equal(document_mask(ds, 16, 8, 24), mask[:, 0, 16:24, :24])
    # attended pairs = the mask's visible entries
    assert document_pairs(ds, torch.arange(40)) == int((~mask).sum())


def _masked_reference(q, k, v, dout, doc_start, q_offset):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    sq, sk, g = q.shape[0], q_offset + q.shape[0], q.shape[2] // k.shape[2]
    kk = k[:sk].repeat_interleave(g, 2)  # [sk, b, h, d]
    vv = v[:sk].repeat_interleave(g, 2)
    scores = torch.einsum("ibhd,jbhd->bhij", q, kk) / q.shape[3] ** 0.5  # [b, h, sq, sk]
    scores = scores.masked_fill(document_mask(doc_start, q_offset, sq, sk)[:, None], -torch.inf)
    out = torch.einsum("bhij,jbhd->ibhd", scores.softmax(-1), vv)  # [sq, b, h, d]
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", ["cpu_flash", "dense", "sdpa"])
def test_document_kernel_matches_masked_attention(backend):
    q, k, v, dout = attention_inputs((True, 4, 2, 8, 48, 2), seed=1)
    tokens = torch.randint(0, 7, (2, 48), generator=torch.Generator().manual_seed(2))
    ds = document_starts(tokens, 0)
    for q_offset, sq in ((0, 48), (16, 16), (40, 8)):
        qs = slice(q_offset, q_offset + sq)
        ref = _masked_reference(q[qs], k, v, dout[qs], ds, q_offset)
        lq, lk, lv = (t.float().clone().requires_grad_(True) for t in (q[qs], k, v))
        out = document_attention(lq, lk, lv, q_offset=q_offset, doc_start=ds, backend=backend)
        out.backward(dout[qs].float())
        for name, got, want in zip(
            ("out", "dq", "dk", "dv"), (out, lq.grad, lk.grad, lv.grad), ref, strict=True
        ):
            err = (got.double() - want).abs().max().item()
            assert err < TOL, f"{backend} q_offset={q_offset}: {name} error {err:.2e}"


def test_attention_work_falls_with_document_length():
    length, pos = 64, torch.arange(64)
    pairs = []
    for doc in (64, 16, 4):
        tokens = torch.ones(1, length, dtype=torch.long)
        tokens[0, doc - 1 :: doc] = 0
        pairs.append(document_pairs(document_starts(tokens, 0), pos))
    assert pairs == [64 * 65 // 2, 4 * 16 * 17 // 2, 16 * 4 * 5 // 2]


def _config(**train):
    return RunConfig(
        model=ModelConfig(vocab_size=train.pop("vocab", 257), causal=train.pop("causal", True)),
        parallel=ParallelConfig(mode="serial", world_size=1),
        train=TrainConfig(**train),
    )


def test_document_flags_refused_in_one_line(tmp_path):
    def problems(**kw):
        with pytest.raises(ConfigError) as e:
            _config(**kw).validate()
        return str(e.value).splitlines()[1:]

    msgs = problems(reset_attention_mask=True, data="synthetic", vocab=300)
    assert any("--reset-attention-mask needs --data megatron" in m for m in msgs), msgs
    (msg,) = [m for m in problems(eod_mask_loss=True, vocab=256) if "is outside" in m]
    assert "--eod-token 256 is outside --vocab-size 256" in msg and ">= 257" in msg
    msgs = problems(reset_attention_mask=True, causal=False, vocab=300)
    assert any("--reset-attention-mask needs causal attention" in m for m in msgs)


def test_a_core_attention_without_document_support_refuses():
    from lss_megatron.lss.core_attention import SequenceCoreAttention

    core = SequenceCoreAttention.__new__(SequenceCoreAttention)
    torch.nn.Module.__init__(core)
    with pytest.raises(NotImplementedError, match="cannot honour --reset-attention-mask"):
        core._doc_start(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="not a torch.bool tensor"):
        core._doc_start(torch.zeros(1, 1, 4, 4, dtype=torch.bool))


def test_needed_remote_keys_are_the_other_ranks_keys_some_query_sees():
    from lss_megatron.lss.documents import needed_remote_keys

    # documents [0, 4), [4, 8), [8, 14), [14, 16); rank 3 of 4 holds 12..15
    ds = torch.tensor([[0] * 4 + [4] * 4 + [8] * 6 + [14] * 2])
    assert needed_remote_keys(ds, torch.arange(12, 16)) == 4  # keys 8..11 of rank 2
    assert needed_remote_keys(ds, torch.arange(4, 8)) == 0  # a document of its own
    two_rows = torch.cat([ds, torch.zeros_like(ds)])  # row 2: one document: everything before
    assert needed_remote_keys(two_rows, torch.arange(12, 16)) == 12


def test_cost_model_document_fraction_matches_counted_pairs():
    from analysis.costmodel.counts import document_attention_fraction

    rng = np.random.default_rng(0)
    for lo, hi, seq in ((2, 60, 256), (100, 900, 512)):
        lengths = rng.integers(lo, hi, 2000)
        stream = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))  # offsets
        rows = stream[: len(stream) // seq * seq].view(-1, seq)  # sequences cut from the stream
        ds = torch.arange(seq)[None] - torch.minimum(rows, torch.arange(seq)[None])  # [r, seq]
        counted = document_pairs(ds, torch.arange(seq)) / (rows.shape[0] * seq * (seq + 1) / 2)
        model = document_attention_fraction(lengths, seq)
        # the model is an expectation; ~1,000 sequences of random documents: within 3 %
        assert abs(model / counted - 1) < 0.03, (lo, hi, model, counted)


def test_cpu_packed_runs_are_ones_the_trainer_accepts(tmp_path):
    from analysis import packed
    from analysis.trainer_config import problems, run_config

    prefix, lengths = packed.make_mix(tmp_path, "short", tokens=20_000)
    assert sum(lengths) >= 20_000 and min(lengths) >= packed.MIXES["short"][0] + 1
    for label, (mode, n, extra) in packed.MODES.items():
        for flags in (packed.FLAGS, {}):
            cmd = packed.trainer_command(mode, n, {**extra, **flags}, prefix, tmp_path / "o", 3)
            args = cmd[cmd.index("lss_megatron.train") + 1 :]
            cfg = run_config(args, n)
            assert problems(cfg) == [], (label, flags, problems(cfg))
            assert cfg.train.reset_attention_mask == bool(flags)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_document_tiles_cover_exactly_the_document_mask(layout):
    """The ring's kernel calls under documents (`document_step_tasks`), over the N steps of
    each rank, cover every visible (query, key) pair once and nothing else: the attention work
    is the document pairs the metrics count, and blocks no local query sees are skipped."""
    from baselines.ring_attention import chunk_ids, document_step_tasks
    from lss_megatron.lss.positions import local_positions

    length, n = 48, 3
    tokens = torch.randint(0, 9, (2, length), generator=torch.Generator().manual_seed(5))
    tokens[1] = 1  # row 2: one document crossing every segment and chunk
    ds = document_starts(tokens, 0)
    c = length // (n * (1 if layout == "contiguous" else 2))
    skipped = 0
    for r in range(n):
        held = local_positions(length, r, n, layout)  # [l/N] global positions
        covered = torch.zeros(2, len(held), length, dtype=torch.long)  # [b, l/N, l]
        for src in range(n):
            keys = local_positions(length, src, n, layout)  # the block in hand, local order
            tasks = document_step_tasks(chunk_ids(r, n, layout), chunk_ids(src, n, layout), c, ds)
            skipped += not any(t[0].start == 0 for t in tasks)  # row 1 sees none of this block
            for bs, rows, ks, diag in tasks:
                q_glob, k_glob = held[rows], keys[ks]
                see = torch.ones(len(q_glob), len(k_glob), dtype=torch.long)
                if diag:  # the square diagonal: query i sees keys j <= i
                    assert torch.equal(q_glob, k_glob)
                    see = see.tril()
                covered[bs, rows.start : rows.stop, k_glob] += see
        want = (~document_mask(ds, 0, length, length))[:, held].long()  # [b, l/N, l]
        assert torch.equal(covered, want), f"rank {r}: tiles differ from the document mask"
        assert int(covered.sum()) == document_pairs(ds, held)
    assert skipped > 0, "some block is skipped for a row whose queries see none of it"


def test_cpu_packed_preset_plans_every_mode_packed_and_unpacked_and_tabulates_ratios(tmp_path):
    """The cpu-packed compare preset: every mode (serial the reference) on both document mixes,
    packed and unpacked, the trainer accepting each run; the summary's packed / unpacked ratios
    (synthetic measurements, no launch) and the printed columns; bad document keys refused."""
    import math

    from analysis import compare, presets, repeats, tables

    preset = presets.get_preset("cpu-packed")
    assert [m for m, _, _ in preset.documents] == ["short", "long"]
    plan = presets.make_plan(preset, repeats=1, data_dir=tmp_path)
    assert plan.skipped == ()
    want = {
        f"{mode}_N{n}_D1_l1024_{mix}_{kind}"
        for mode, n in [("serial", 1), ("lss", 2), ("nvidia-sp", 2), ("ulysses", 2), ("ring", 2)]
        for mix in ("short", "long")
        for kind in ("packed", "unpacked")
    }
    assert set(plan.configs) == want and len(plan.runs) == 20
    rows = []
    for run in plan.runs:
        f = run.flags
        assert f["data"] == "megatron" and f["data-path"] == str(tmp_path / run.documents)
        assert all(f.get(x) is (True if run.packed else None) for x in presets.PACKED_FLAGS)
        assert "attention-kernel" not in f and f["dtype"] == "fp32"  # flash, no recompute
        config = compare.effective_config(run)
        assert config["train"]["reset_attention_mask"] == run.packed
        row = tables.identity_row(
            config, run.run_id, run.role, 0, preset.name, run.label, run.documents
        )
        mean = 4e8 if run.packed else 1e9  # synthetic: packing cuts attention work and time
        row.update(
            status="ok",
            config_id=run.config_id,
            step_time_s=(1.0 if run.packed else 2.0) * (1 + (run.mode == "lss")),
            attention_flops_max=1.5 * mean,
            attention_flops_mean=mean,
            activation_bytes=2**20,
            sp_comm_bytes=2**21,
            kv_needed_fraction=0.25 if run.mode == "lss" and run.packed else math.nan,
        )
        row["kv_unneeded_bytes"] = (1 - row["kv_needed_fraction"]) * row["sp_comm_bytes"]
        rows.append(row)
    runs = tables.finish(rows, "strong")
    df = repeats.aggregate(runs, "strong", order=plan.configs).set_index("run_id")
    for config in want:
        ratio_f, ratio_t = df.loc[config, ["attention_flops_vs_unpacked", "step_time_vs_unpacked"]]
        if config.endswith("_packed"):
            assert (ratio_f, ratio_t) == (pytest.approx(0.4), pytest.approx(0.5)), config
        else:
            assert math.isnan(ratio_f) and math.isnan(ratio_t), config
    # serial packed is compared with serial packed, never with an unpacked run of another mix
    assert df.loc["lss_N2_D1_l1024_short_packed", "speedup_vs_nvidia_sp"] == pytest.approx(0.5)
    assert df.loc["lss_N2_D1_l1024_long_packed", "kv_unneeded_bytes"] == 0.75 * 2**21
    text = tables.format_table(df.reset_index())
    for column in ("docs", "packed", "attnGF_max", "attnGF_mean", "attnF_vs_unp", "time_vs_unp"):
        assert column in text.splitlines()[0], column
    assert "act_MiB" in text and "step_s" in text and "kv_unneeded_MiB" in text
    # a document preset owns its data flags; mix names and lengths are checked
    src = (presets.compare_presets_dir() / "cpu-packed.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("  steps: 3", "  steps: 3\n  data-path: x\n  eod-mask-loss: true"))
    with pytest.raises(presets.PresetError, match="train.data-path: set by the plan"):
        presets.load_preset(bad)
    bad.write_text(src.replace("[long, 256, 767]", "[long, 767, 256]"))
    with pytest.raises(presets.PresetError, match="need 1 <= 767 <= 256"):
        presets.load_preset(bad)
