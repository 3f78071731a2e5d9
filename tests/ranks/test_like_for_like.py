"""Like for like: every mode x attention kernel x recompute against serial with the flash kernel,
and what the kernel, recompute and bf16 do to the bytes saved for backward and communicated.

Each mode runs once (CPU, gloo; serial on 1 rank, lss / nvidia-sp / ulysses / ring at N = 2) through a
list of jobs on a tiny GQA model (2 layers, E 32, 4 heads, 2 key/value heads, learned positions,
G 2, B 1: two micro-batches), one step each:

* parity: {flash, dense} x {none, selective, full} in fp32. Loss and every parameter gradient
  (after gradient averaging, tensor-parallel shards and position slices put back together)
  equal serial-flash's within 1e-5 absolute AND 1e-3 relative to the tensor's largest gradient.
  fp32 on CPU: the kernels and gloo sums add in different orders, which moves values by ~1e-7;
  the relative bound keeps small gradients (LayerNorm) from hiding behind the absolute one.
* growth in l: bytes saved for backward (`metrics.SavedBytes`, counted over unique storages) at
  l = 16, 32, 48, 64 are exactly linear in l with flash (second difference 0) and exactly
  quadratic with dense (third difference 0, second difference > 0), in every mode but the ring,
  whose dense blocks are recomputed in backward (linear with both kernels).
* recompute through Megatron's own checkpointing: LSS, Ulysses and the ring repeat their forward
  communication in backward (sp bytes exactly 1.5x, one more all-gather / four more all-to-alls
  per layer and micro-batch; the ring 4/3x, N-1 more K/V shifts) and save fewer bytes (not the
  ring: it saves no length-l tensor, and Megatron's checkpoint keeps more than it does).
* bf16 (Megatron mixed precision, fp32 master weights): sp and saved bytes exactly half of fp32's
  where the tensors are bf16 (counted per dtype), and loss / gradients track serial bf16.
* the cost model (analysis.costmodel.predict) reproduces every counted byte exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.support import run_ranks

pytestmark = pytest.mark.slow  # ~40 s of CPU for the four modes; minutes on a loaded machine

MODEL = dict(
    num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, seq_length=16, vocab_size=64
)
WORLD = {"serial": 1, "lss": 2, "nvidia-sp": 2, "ulysses": 2, "ring": 2}
VARIANTS = {"lss-local": ("lss", (("lss_save_kv", "local"),))}
"""LSS configurations run like a mode here: (mode, ParallelConfig fields); flash kernel only."""
SETTINGS = list(itertools.product(("flash", "dense"), ("none", "selective", "full")))
LENGTHS = (16, 32, 48, 64)
ABS_TOL, REL_TOL = 1e-5, 1e-3
BF16_LOSS_TOL, BF16_REL_TOL = 2e-3, 5e-2
"""bf16 keeps 8 mantissa bits (relative rounding 2^-9): parameters, activations and the K/V that
travel are rounded in different orders per mode, so losses agree to ~1e-4 and gradients to a few
percent of the tensor's largest entry; 2e-3 / 5e-2 bound that with margin."""


def _config(mode: str, world: int, kernel="flash", recompute="none", dtype="fp32", length=16):
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig

    mode, extra = VARIANTS.get(mode, (mode, ()))
    return RunConfig(
        model=ModelConfig(**{**MODEL, "seq_length": length}),
        parallel=ParallelConfig(mode=mode, world_size=world, seq_parallel=world, **dict(extra)),
        train=TrainConfig(
            global_batch_size=2,
            micro_batch_size=1,
            seed=3,
            dtype=dtype,
            attention_kernel=kernel,
            recompute=recompute,
        ),
    ).validate()


def _full_gradients(trainable, grid) -> dict:
    """Every gradient as the one-process model's tensor: tensor-parallel shards concatenated
    along their partition dim, sequence-local position slices put at their global rows."""
    import torch

    from lss_megatron.parallel import comm
    from lss_megatron.parallel.params import ROWS_ATTR, is_sequence_local

    out = {}
    for name, p in trainable.named_parameters():
        g = p.grad.detach().float()
        if getattr(p, "tensor_model_parallel", False) and grid.tp_size > 1:
            dim = p.partition_dim
            parts = comm.all_gather_dim0(
                g.movedim(dim, 0).contiguous(), grid.tp_group, category="other"
            )
            g = parts.movedim(0, dim)
        if is_sequence_local(p):
            rows = comm.all_gather_dim0(getattr(p, ROWS_ATTR), grid.seq_group, category="other")
            local = comm.all_gather_dim0(g.contiguous(), grid.seq_group, category="other")
            g = torch.empty_like(local)
            g[rows] = local
        out[name] = g.numpy().copy()
    return out


def _saved_by_dtype(model, micro):
    """(total bytes, {dtype: bytes}) autograd saves in the forward of the first micro-batch
    (unique storages, parameters excluded, as `metrics.SavedBytes`)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, str]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = (st.nbytes(), str(t.dtype).removeprefix("torch."))
        return t

    tokens, labels, positions = micro[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, labels=labels)
    by: dict[str, int] = {}
    for nbytes, dtype in storages.values():
        by[dtype] = by.get(dtype, 0) + nbytes
    return sum(by.values()), by


def _job(mode, world, kernel, recompute, dtype, length, want_grads):
    from lss_megatron.lss.grad_sync import GradientAverager
    from lss_megatron.model import build_model, model_settings
    from lss_megatron.parallel import comm
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training.metrics import SavedBytes
    from lss_megatron.training.micro_batches import (
        forward_backward,
        global_mean_loss,
        step_micro_batches,
    )
    from lss_megatron.training.optim import MasterWeights

    cfg = _config(mode, world, kernel, recompute, dtype, length)
    mode = cfg.parallel.mode
    grid = initialize_grid(cfg.parallel)
    model = build_model(
        cfg.model, grid, mode=mode, seed=3, kernel=kernel, recompute=recompute, dtype=dtype
    )
    trainable = MasterWeights(model) if dtype == "bf16" else model
    micro = step_micro_batches(cfg, grid, step=1)
    saved = SavedBytes(model)
    with comm.record() as log:
        local, _ = forward_backward(model, micro, saved=saved)
    GradientAverager(trainable, grid)()
    total, by_dtype = _saved_by_dtype(model, micro)
    result = {
        "settings": model_settings(model),
        "loss": global_mean_loss(local, grid),
        "saved": saved.peak,
        "saved_again": total,
        "saved_by_dtype": by_dtype,
        "sp_bytes": log.nbytes("sp"),
        "sp_calls": log.count(category="sp"),
        "sp_all_gathers": log.count("all_gather", "sp"),
        "sp_all_to_alls": log.count("all_to_all", "sp"),
        "config": cfg.to_dict(),
        "grads": _full_gradients(trainable, grid) if want_grads else None,
    }
    destroy_grid()
    return result


def _worker(rank, world, mode, jobs):
    return {job: _job(mode, world, *job) for job in jobs}


def _jobs(mode: str) -> list[tuple]:
    kernels = ("flash",) if mode in VARIANTS else ("flash", "dense")
    jobs = [(k, r, "fp32", 16, True) for k, r in SETTINGS if k in kernels]
    jobs += [("flash", "none", "bf16", 16, True)]
    jobs += [
        (k, "none", "fp32", length, False) for k in kernels for length in LENGTHS if length != 16
    ]
    return jobs


_RESULTS: dict[str, dict] = {}


def results(mode: str) -> dict:
    """{(kernel, recompute, dtype, l, grads?): result} of `mode` (rank 0), computed once."""
    if mode not in _RESULTS:
        world = WORLD[VARIANTS.get(mode, (mode,))[0]]
        _RESULTS[mode] = run_ranks(_worker, world, mode, _jobs(mode), timeout=240)[0]
    return _RESULTS[mode]


def _get(mode, kernel="flash", recompute="none", dtype="fp32", length=16):
    res = results(mode)
    want = (kernel, recompute, dtype, length)
    return next(v for k, v in res.items() if k[:4] == want)


def _assert_grads_close(got: dict, ref: dict, abs_tol: float, rel_tol: float, tag: str):
    assert set(got) == set(ref), tag
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, (tag, name)
        err, scale = float(np.abs(g - r).max()), float(np.abs(r).max())
        assert err <= abs_tol, f"{tag}: grad {name}: max error {err:.3e} > {abs_tol}"
        assert err <= rel_tol * scale, (
            f"{tag}: grad {name}: max error {err:.3e} > {rel_tol} x its largest entry {scale:.3e}"
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(WORLD))
def test_every_kernel_and_recompute_matches_serial_flash(mode):
    ref = _get("serial")
    for kernel, recompute in SETTINGS:
        got = _get(mode, kernel, recompute)
        tag = f"{mode} {kernel} recompute={recompute}"
        assert got["settings"] == {
            "attention_kernel": kernel,
            "recompute": recompute,
            "dtype": "fp32",
        }, tag
        assert abs(got["loss"] - ref["loss"]) <= ABS_TOL, (tag, got["loss"], ref["loss"])
        _assert_grads_close(got["grads"], ref["grads"], ABS_TOL, REL_TOL, tag)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(WORLD))
def test_saved_bytes_linear_with_flash_quadratic_with_dense(mode):
    for kernel in ("flash", "dense"):
        a = [_get(mode, kernel, length=length)["saved"] for length in LENGTHS]  # equal steps in l
        d1 = np.diff(a)
        d2 = np.diff(a, 2)
        d3 = np.diff(a, 3)
        assert (d1 > 0).all(), (mode, kernel, a)
        if kernel == "flash" or mode == "ring":  # the ring recomputes dense blocks in backward
            assert (d2 == 0).all(), f"{mode} {kernel}: saved bytes {a} not linear in l"
        else:
            assert (d3 == 0).all() and (d2 > 0).all(), f"{mode} dense: {a} not quadratic in l"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(WORLD))
def test_cost_model_predicts_every_count_exactly(mode):
    from analysis.costmodel import predict

    for key, got in results(mode).items():
        config = {**got["config"], "runtime": {"backend": "gloo"}}
        pred = predict(config)
        assert got["saved"] == got["saved_again"], key  # both counters agree
        assert (pred["activation_bytes"], pred["sp_comm_bytes"], pred["sp_comm_calls"]) == (
            got["saved"],
            got["sp_bytes"],
            got["sp_calls"],
        ), (mode, key)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["lss", "ulysses", "ring"])
def test_selective_recompute_repeats_the_forward_communication(mode):
    """LSS keeps no gathered K/V: its fused gather runs again in backward (Ulysses: its four
    all-to-alls). sp bytes exactly 1.5x, one more gather (four more all-to-alls) per layer and
    micro-batch, fewer bytes saved; the result is exact against serial (the parity test). The
    ring's forward passes K/V N-1 times again: its 3 (N-1) blocks become 4 (N-1), 4/3x."""
    layers, micro = MODEL["num_layers"], 2
    for kernel in ("flash", "dense"):
        none, sel = _get(mode, kernel, "none"), _get(mode, kernel, "selective")
        if mode == "ring":  # it saves nothing of length l, so recompute buys it no memory:
            # Megatron's checkpoint keeps q, k, v and the projection input, more than the ring's
            # q, one [K | V] block, output and lse (both counts: the cost-model test, exactly)
            assert 3 * sel["sp_bytes"] == 4 * none["sp_bytes"] > 0, (mode, kernel)
            continue
        assert 2 * sel["sp_bytes"] == 3 * none["sp_bytes"] > 0, (mode, kernel)
        if mode == "lss":
            assert sel["sp_all_gathers"] == none["sp_all_gathers"] + layers * micro
        else:
            assert sel["sp_all_to_alls"] == none["sp_all_to_alls"] + 4 * layers * micro
        assert sel["saved"] < none["saved"], (mode, kernel, sel["saved"], none["saved"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(WORLD))
def test_bf16_halves_the_bytes_of_bf16_tensors(mode):
    """Flash kernel: every saved tensor is either bf16 in the bf16 run and fp32 (same size) in the
    fp32 run, or fp32 in both (the log-sum-exp, the cross-entropy softmax), or an integer. So
    2 x bf16 bytes + fp32 bytes of the bf16 run = fp32 bytes of the fp32 run, exactly. sp bytes:
    exactly half, except nvidia-sp's three fp32 cross-entropy all-reduces (Megatron computes the
    loss in fp32)."""
    fp32, bf16 = _get(mode), _get(mode, dtype="bf16")
    assert bf16["settings"]["dtype"] == "bf16"
    f, h = fp32["saved_by_dtype"], bf16["saved_by_dtype"]
    assert h.get("bfloat16", 0) > 0 and "bfloat16" not in f
    assert 2 * h["bfloat16"] + h.get("float32", 0) == f["float32"], (mode, f, h)
    ints = {k: v for k, v in h.items() if k not in ("bfloat16", "float32")}
    assert ints == {k: v for k, v in f.items() if k != "float32"}, (mode, f, h)
    assert bf16["saved"] < fp32["saved"]
    if mode == "nvidia-sp":
        n, tokens = WORLD[mode], MODEL["seq_length"]  # b = 1
        cross_entropy = 3 * 2 * (n - 1) * tokens * 4 // n * 2  # 3 all-reduces x 2 micro-batches
        assert 2 * bf16["sp_bytes"] - fp32["sp_bytes"] == cross_entropy
    else:
        assert 2 * bf16["sp_bytes"] == fp32["sp_bytes"]
    if mode == "lss":  # K/V travel in bf16: exactly half
        assert bf16["sp_bytes"] > 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["lss", "nvidia-sp", "ulysses", "ring"])
def test_bf16_tracks_serial_bf16(mode):
    ref, got = _get("serial", dtype="bf16"), _get(mode, dtype="bf16")
    assert abs(got["loss"] - ref["loss"]) <= BF16_LOSS_TOL, (mode, got["loss"], ref["loss"])
    _assert_grads_close(got["grads"], ref["grads"], float("inf"), BF16_REL_TOL, f"{mode} bf16")
    fp32 = _get("serial")
    assert abs(ref["loss"] - fp32["loss"]) > 0, "bf16 must change the numerics"


@pytest.mark.timeout(300)
def test_local_kv_is_exact_and_trades_a_gather_for_the_gathered_kv():
    """--lss-save-kv local against serial-flash (loss, every gradient) under every recompute
    setting and against lss (the paper's form): without recompute, sp bytes exactly 1.5x (the
    K/V re-gathered in backward) and the bytes saved for backward exactly (N-1)/N of the
    gathered K/V [l, b, 2 h_kv, d] fewer per layer; under Megatron's recompute the gathered K/V
    are used at once in backward, so local changes nothing there (same bytes, same saved);
    linear in l; bf16 halves its bytes."""
    ref, n = _get("serial"), WORLD["lss"]
    for recompute in ("none", "selective", "full"):
        got, paper = _get("lss-local", recompute=recompute), _get("lss", recompute=recompute)
        tag = f"lss-local recompute={recompute}"
        assert abs(got["loss"] - ref["loss"]) <= ABS_TOL, (tag, got["loss"], ref["loss"])
        _assert_grads_close(got["grads"], ref["grads"], ABS_TOL, REL_TOL, tag)
        if recompute != "none":
            assert (got["sp_bytes"], got["saved"]) == (paper["sp_bytes"], paper["saved"]), tag
    got, paper = _get("lss-local"), _get("lss")
    assert 2 * got["sp_bytes"] == 3 * paper["sp_bytes"] > 0
    layers, kv_heads, d = MODEL["num_layers"], MODEL["num_kv_heads"], MODEL["hidden_size"] // 4
    gathered_kv = 16 * 1 * 2 * kv_heads * d * 4  # [l, b, 2 h_kv, d] fp32, per layer
    assert paper["saved"] - got["saved"] == layers * (n - 1) * gathered_kv // n
    assert got["saved"] == got["saved_again"]
    a = [_get("lss-local", length=length)["saved"] for length in LENGTHS]
    assert (np.diff(a) > 0).all() and (np.diff(a, 2) == 0).all(), a
    bf16 = _get("lss-local", dtype="bf16")
    assert 2 * bf16["sp_bytes"] == got["sp_bytes"]
    assert abs(bf16["loss"] - _get("serial", dtype="bf16")["loss"]) <= BF16_LOSS_TOL


def _variants_worker(rank, world, jobs):
    from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel import comm
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.training.metrics import SavedBytes
    from lss_megatron.training.micro_batches import forward_backward, step_micro_batches

    out = []
    for pos, kv_heads, options, recompute in jobs:
        cfg = RunConfig(
            model=ModelConfig(
                **{**MODEL, "num_kv_heads": kv_heads, "seq_length": 32},
                position_embedding=pos,
            ),
            parallel=ParallelConfig(
                mode="lss", world_size=world, seq_parallel=world, **dict(options)
            ),
            train=TrainConfig(global_batch_size=2, micro_batch_size=1, seed=3, recompute=recompute),
        ).validate()
        grid = initialize_grid(cfg.parallel)
        model = build_model(cfg.model, grid, mode="lss", seed=3, recompute=recompute)
        saved = SavedBytes(model)
        with comm.record() as log:
            forward_backward(model, step_micro_batches(cfg, grid, step=1), saved=saved)
        counted = (saved.peak, log.nbytes("sp"), log.count(category="sp"))
        out.append((pos, kv_heads, options, recompute, cfg.to_dict(), counted))
        destroy_grid()
    return out


@pytest.mark.timeout(600)
def test_cost_model_counts_every_lss_variant_exactly():
    """The cost model's saved bytes, sp bytes and sp calls equal the counted ones for local K/V,
    overlap, separate gathers, zigzag and chunks, alone and combined, learned and RoPE, GQA and
    MHA (where local k, v are views of q's buffer), and under recompute."""
    from analysis.costmodel import predict

    local, over = ("lss_save_kv", "local"), ("lss_overlap", True)
    sep, zig, c2 = ("lss_kv_gather", "separate"), ("lss_layout", "zigzag"), ("kv_gather_chunks", 2)
    options = [(), (local,), (over,), (local, sep), (zig, local, over), (c2, over), (c2, local)]
    jobs = [(p, k, o, "none") for p in ("learned", "rope") for k in (2, 4) for o in options]
    jobs += [("learned", 2, (local,), "selective"), ("rope", 4, (local, over), "full")]
    for pos, kv_heads, opts, recompute, config, counted in run_ranks(
        _variants_worker, 2, jobs, timeout=540
    )[0]:
        pred = predict({**config, "runtime": {"backend": "gloo"}})
        want = (pred["activation_bytes"], pred["sp_comm_bytes"], pred["sp_comm_calls"])
        assert counted == want, (pos, kv_heads, dict(opts), recompute, counted, want)
