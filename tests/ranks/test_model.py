"""LSS GPTModel vs the one-process Megatron GPTModel: loss, every parameter gradient, token losses.

The reference is Megatron's stock local GPT spec (its own `DotProductAttention`) in one process,
with the same seed (same initial weights) and the same global batch. LSS runs on (N, D) in
{(2,1), (4,1), (2,2)}, with learned (sequence-distributed) and RoPE positions, GQA (h=4, h_kv=2)
and two micro-batches per replica (gradient accumulation).

Tolerance 1e-5 (fp32 on CPU), and 1e-3 of each gradient's largest entry: the two paths use
different attention kernels and reduction orders (the flash kernel and gloo sums versus
baddbmm+softmax in one process); observed differences are ~1e-7. (tests/ranks/test_like_for_like.py
checks every mode with each kernel and recompute setting against serial with the flash kernel.)
After double gradient averaging, each replicated gradient must equal the
reference gradient of the global per-token mean loss, and each rank's position slice gradient
must equal the matching rows of the reference table's gradient. The worker and the check are
`model_worker` and `check_model` in tests/support.py (test_ulysses.py runs them too).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import GLOBAL_BATCH, REL_TOL, TOL, check_model, model_worker, run_ranks


@pytest.fixture(scope="module")
def reference():
    """One process, Megatron's stock attention: learned and RoPE causal, learned bidirectional."""
    layouts = [
        (1, 1, "learned", "serial"),
        (1, 1, "rope", "serial"),
        (1, 1, "learned", "serial", False, None),
    ]
    res = run_ranks(model_worker, 1, layouts, timeout=120)[0]
    return {(r["layout"][2], len(r["layout"]) == 4): r for r in res}


# bidirectional attention, and gradient buckets of 4 KiB so averaging needs several all-reduces
SMALL_BUCKETS_NONCAUSAL = (2, 1, "learned", "lss", False, 4096)
# K/V kept local and re-gathered in backward (--lss-save-kv local), composed with chunked
# gathers, data parallelism and Megatron's all_gather CP (K and V gathered apart)
LOCAL_KV = (("lss_save_kv", "local"),)
OVERLAP = ("lss_overlap", True)  # --lss-overlap: the gathers behind the local blocks
KV_VARIANTS = [
    (2, 1, "rope", "lss", True, None, (*LOCAL_KV, ("kv_gather_chunks", 2), OVERLAP)),
    (4, 1, "rope", "lss", True, None, (*LOCAL_KV, OVERLAP)),
    (2, 1, "learned", "lss", True, None, (OVERLAP,)),
    (2, 2, "learned", "lss", True, None, (*LOCAL_KV, ("lss_kv_gather", "separate"))),
]
LAYOUTS_BY_WORLD = {
    2: [
        (2, 1, "learned", "lss"),
        (2, 1, "rope", "lss"),
        SMALL_BUCKETS_NONCAUSAL,
        (2, 1, "rope", "nvidia-sp"),
        KV_VARIANTS[0],
        KV_VARIANTS[2],
    ],
    4: [
        (4, 1, "learned", "lss"),
        (4, 1, "rope", "lss"),
        (2, 2, "learned", "lss"),
        (2, 2, "rope", "lss"),
        (4, 1, "learned", "nvidia-sp"),
        (2, 2, "rope", "nvidia-sp"),
        KV_VARIANTS[1],
        KV_VARIANTS[3],
    ],
}


class _Runs(dict):
    """(N, D, pos, mode[, causal, bucket_bytes]) -> the per-rank results of that layout; all the
    layouts of one world size run together, on first use (the 2-rank ones without the 4-rank)."""

    def __missing__(self, layout):
        world = layout[0] * layout[1]
        assert layout in LAYOUTS_BY_WORLD[world] and world not in self, layout
        self[world] = True
        for rank_results in run_ranks(model_worker, world, LAYOUTS_BY_WORLD[world], timeout=240):
            for r in rank_results:
                self.setdefault(r["layout"], []).append(r)
        return self[layout]


@pytest.fixture(scope="module")
def parallel_runs():
    return _Runs()


def tiered(layouts, unpack=True):
    """The 4-rank layouts (one 4-rank spawn, ~24 s idle) in the slow tier; every mode and option
    keeps its 2-rank check in the fast tier."""
    slow = pytest.mark.slow
    return [
        (pytest.param(*x, marks=slow) if unpack else pytest.param(x, marks=slow))
        if x[0] * x[1] == 4
        else x
        for x in layouts
    ]


LAYOUTS = tiered([(n, d, p) for n, d in ((2, 1), (4, 1), (2, 2)) for p in ("learned", "rope")])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n,d,pos", LAYOUTS)
def test_lss_model_matches_one_process(reference, parallel_runs, n, d, pos):
    check_model(reference[(pos, True)], parallel_runs[(n, d, pos, "lss")], n, d, pos)


@pytest.mark.timeout(400)
def test_noncausal_with_small_gradient_buckets(reference, parallel_runs):
    """Bidirectional attention matches too; 4 KiB buckets give several bucketed all-reduces,
    far fewer than one per parameter, with the same exact gradients."""
    ranks = parallel_runs[SMALL_BUCKETS_NONCAUSAL]
    check_model(reference[("learned", False)], ranks, 2, 1, "learned")
    for r in ranks:
        assert r["grad_calls"] == r["expected_grad_calls"]
        assert 1 < r["grad_calls"] < r["num_params"], (r["grad_calls"], r["num_params"])


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "layout", tiered(KV_VARIANTS, unpack=False), ids=lambda x: f"N{x[0]}D{x[1]}-{x[2]}"
)
def test_lss_kv_variants_match_one_process(reference, parallel_runs, layout):
    """--lss-save-kv local (with --kv-gather-chunks 2 and --lss-overlap, with --lss-overlap, with
    D = 2 and separate K/V gathers) and --lss-overlap alone: the same loss, gradients and token
    losses as the one-process model."""
    n, d, pos = layout[:3]
    check_model(reference[(pos, True)], parallel_runs[layout], n, d, pos)


NVIDIA_SP_LAYOUTS = tiered([(2, 1, "rope"), (4, 1, "learned"), (2, 2, "rope")])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n,d,pos", NVIDIA_SP_LAYOUTS)
def test_nvidia_sp_model_matches_one_process(reference, parallel_runs, n, d, pos):
    """The baseline (Megatron TP = N with sequence_parallel) on the same model: same initial
    master weights, same loss, and every step-1 gradient equal to the one-process model's once
    the tensor-parallel shards are concatenated (fp32, 1e-5 as above)."""
    ref = reference[(pos, True)]
    ranks = parallel_runs[(n, d, pos, "nvidia-sp")]
    assert len(ranks) == n * d and sorted(r["tp_rank"] for r in ranks) == sorted(list(range(n)) * d)
    per_replica = GLOBAL_BATCH // d
    for data_rank in range(d):
        shards = sorted(
            (r for r in ranks if r["data_rank"] == data_rank), key=lambda r: r["tp_rank"]
        )
        tag = f"nvidia-sp N={n} D={d} {pos} data_rank={data_rank}"
        assert all(r["seq_rank"] == 0 for r in shards), "TP ranks read whole sequences"
        assert shards[0]["tp_dims"], f"{tag}: no tensor-parallel parameters"
        for name, ref_g in ref["grads"].items():
            dim = shards[0]["tp_dims"].get(name)
            full_g = (
                np.concatenate([r["grads"][name] for r in shards], axis=dim)
                if dim is not None
                else shards[0]["grads"][name]
            )
            full_w = (
                np.concatenate([r["init"][name] for r in shards], axis=dim)
                if dim is not None
                else shards[0]["init"][name]
            )
            assert np.array_equal(full_w, ref["init"][name]), f"{tag}: initial {name} differs"
            err = np.abs(full_g - ref_g).max()
            assert err < TOL, f"{tag}: grad {name} max error {err:.3e}"
            assert err <= REL_TOL * np.abs(ref_g).max(), f"{tag}: grad {name} relative error"
            if dim is None:  # replicated over TP: every TP rank holds the same gradient
                for r in shards[1:]:
                    assert np.abs(r["grads"][name] - shards[0]["grads"][name]).max() < TOL, tag
        for r in shards:
            assert abs(r["loss"] - ref["loss"]) < TOL, f"{tag}: loss {r['loss']} vs {ref['loss']}"
            assert r["grad_calls"] == r["expected_grad_calls"], tag
            rows = slice(data_rank * per_replica, (data_rank + 1) * per_replica)
            err = np.abs(r["token_losses"] - ref["token_losses"][rows]).max()
            assert err < TOL, f"{tag}: token losses max error {err:.3e}"
