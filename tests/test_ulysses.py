"""DeepSpeed-Ulysses (`--mode ulysses`) on the same Megatron GPT model: exactness, traffic, limits.

* Model parity: from the same seed, the loss, every per-token loss and EVERY parameter gradient
  after double gradient averaging equal the one-process Megatron model within 1e-5 (fp32), at
  (N, D) = (2, 1), (4, 1), (2, 2), learned and RoPE positions, GQA h = 8, h_kv = 4 (one key/value
  head per rank at N = 4). The worker and the checks are tests/test_model.py's.
* Traffic: per layer and micro-batch, exactly four all-to-alls forward (q, k, v, out) and four
  backward, all on the sequence group (category ``sp``), with the bytes of
  `baselines.ulysses.sp_bytes_per_layer` each way; DeepSpeed's collectives reach
  torch.distributed (so `comm.record()` sees them) and nothing is JIT-compiled.
* Trainer parity: 10 SGD steps of `--mode ulysses` under torchrun equal `--mode serial`, and
  `sp_comm_bytes` per step is the derived all-to-all volume.
* Limits: heads or key/value heads not divisible by N fail fast with a clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dist_utils import read_metrics, run_ranks, torchrun_train
from test_model import MODEL, _check, _model_worker

from baselines.ulysses import sp_bytes_per_layer
from lss_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
LAYOUTS2 = [(2, 1, "learned", "ulysses"), (2, 1, "rope", "ulysses")]
LAYOUTS4 = [(n, d, p, "ulysses") for n, d in ((4, 1), (2, 2)) for p in ("learned", "rope")]


def _recording_worker(rank, world, layouts, ext_dir):
    """test_model's worker, with every forward/backward recorded by `comm.record()`; also reports
    which deepspeed.comm backend ran, and points TORCH_EXTENSIONS_DIR at `ext_dir` so that any
    JIT build would show there."""
    os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir
    import lss_megatron.step as step
    from lss_megatron import comm

    logs, inner = [], step.forward_backward

    def recorded(*args, **kwargs):
        with comm.record() as log:
            result = inner(*args, **kwargs)
        logs.append({"calls": dict(log.calls), "bytes": dict(log.bytes)})
        return result

    step.forward_backward = recorded  # _model_worker imports it at call time
    results = _model_worker(rank, world, layouts)
    for r, log in zip(results, logs, strict=True):
        r["comm"] = log
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    return {"results": results, "backend": type(backend).__name__,
            "shm_op": getattr(backend, "shm_comm_op", "missing")}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ext = str(tmp_path_factory.mktemp("ext") / "torch_extensions")
    serial = [(1, 1, "learned", "serial"), (1, 1, "rope", "serial")]
    with ThreadPoolExecutor(2) as pool:  # the 1-process reference alongside the 2 ranks
        ref = pool.submit(run_ranks, _model_worker, 1, serial, timeout=120)
        ranks = pool.submit(run_ranks, _recording_worker, 2, LAYOUTS2, ext, timeout=120).result()
        ref = ref.result()[0]
    ranks += run_ranks(_recording_worker, 4, LAYOUTS4, ext, timeout=180)
    out = {"ref": {r["layout"][2]: r for r in ref}, "ext": Path(ext)}
    for rank in ranks:
        assert (rank["backend"], rank["shm_op"]) == ("TorchBackendNoShm", None), rank
        for r in rank["results"]:
            out.setdefault(r["layout"][:3], []).append(r)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,d,pos", [layout[:3] for layout in LAYOUTS2 + LAYOUTS4])
def test_ulysses_model_matches_one_process(runs, n, d, pos):
    """Loss, per-token losses and every gradient (position slices included) within 1e-5."""
    _check(runs["ref"][pos], runs[(n, d, pos)], n, d, pos)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,d", [(2, 1), (4, 1), (2, 2)])
def test_ulysses_all_to_all_traffic(runs, n, d):
    """4 all-to-alls per layer forward and 4 backward per micro-batch, on the sequence group,
    (N-1)/N of the local q, k, v and output tensors; no other activation traffic; no JIT build."""
    model = ModelConfig(**MODEL)
    micro = 4 // d  # micro-batches of one sequence per replica (test_model: G = 4, B = 1)
    layers = model.num_layers
    # q and out: (l/N) b h d floats, k and v: (l/N) b h_kv d; (N-1)/N of each is sent
    seg = model.seq_length // n
    expected = (n - 1) * seg * model.head_dim * 4 * 2 * (model.num_heads + model.kv_heads) // n
    assert sp_bytes_per_layer(model, n, micro_batch=1) == expected
    for r in runs[(n, d, "learned")]:
        calls, nbytes = r["comm"]["calls"], r["comm"]["bytes"]
        assert calls == {("all_to_all", "sp"): 2 * 4 * layers * micro}, calls
        assert nbytes[("all_to_all", "sp")] == 2 * layers * micro * expected, nbytes
    assert not runs["ext"].exists(), "DeepSpeed JIT-compiled an extension"


COMMON = [
    "--num-layers", "2", "--hidden-size", "32", "--num-heads", "8", "--num-kv-heads", "4",
    "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "1",
    "--vocab-size", "64", "--steps", "10", "--optimizer", "sgd", "--lr", "0.5", "--seed", "11",
    "--dtype", "fp32", "--data", "synthetic", "--dist-timeout", "60", "--progress", "off",
    "--eval-interval", "5", "--eval-steps", "1",
]  # fmt: skip


@pytest.mark.timeout(300)
def test_ulysses_trainer_matches_serial(tmp_path):
    """torchrun, 10 SGD steps: every step's loss, gradient norm and validation loss equal
    serial's within 1e-5, replicas stay bitwise equal, and sp_comm_bytes per step is the
    all-to-all volume."""
    ext = tmp_path / "torch_extensions"
    outs = {m: tmp_path / m for m in ("serial", "ulysses")}
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    with ThreadPoolExecutor(2) as pool:  # both launches at once
        futures = {
            mode: pool.submit(torchrun_train, nproc, ["--mode", mode, "--seq-parallel", str(nproc),
                              "--out", str(outs[mode]), *COMMON], 240, env)
            for mode, nproc in (("serial", 1), ("ulysses", 2))
        }  # fmt: skip
        for mode, future in futures.items():
            res = future.result()
            assert res.returncode == 0, f"{mode}: {res.stderr[-3000:]}"
    ser, uly = read_metrics(outs["serial"]), read_metrics(outs["ulysses"])
    assert len(ser) == len(uly) == 10
    for a, b in zip(uly, ser, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * max(1.0, b["grad_norm"])
        assert ("valid_loss" in a) == ("valid_loss" in b) == (a["step"] % 5 == 0)
        if "valid_loss" in a:  # eval mode, no grad, at steps 5 and 10
            assert abs(a["valid_loss"] - b["valid_loss"]) < TOL, (a["step"], a, b)
    config = json.loads((outs["ulysses"] / "config.json").read_text())
    rt = config["runtime"]
    assert (rt["core_attention"], rt["context_parallel"], rt["tensor_parallel"]) == (
        "UlyssesCoreAttention", 2, 1)  # fmt: skip
    assert json.loads((outs["ulysses"] / "summary.json").read_text())["replicas"]["bitwise_equal"]
    # 4 micro-batches of 1 sequence, 2 layers, 4 all-to-alls forward + 4 backward
    model = ModelConfig(num_layers=2, hidden_size=32, num_heads=8, num_kv_heads=4, seq_length=32)
    per_layer = sp_bytes_per_layer(model, 2, micro_batch=1)
    assert per_layer == (2 - 1) * (32 // 2) * 1 * 4 * 4 * (2 * 8 + 2 * 4) // 2  # = 3072
    for row in uly:
        assert row["sp_comm_calls"] == 4 * 2 * 8, row
        assert row["sp_comm_bytes"] == 4 * 2 * 2 * per_layer, row  # = 49152
        assert row["grad_comm_calls"] == 1, row  # D = 1: one bucket over the 2 ranks
    assert not ext.exists(), "DeepSpeed JIT-compiled an extension"


def _run_config(n, heads, kv_heads, mode="ulysses"):
    return RunConfig(
        model=ModelConfig(hidden_size=8 * heads, num_heads=heads, num_kv_heads=kv_heads),
        parallel=ParallelConfig(mode=mode, world_size=n, seq_parallel=n),
    ).validate()


@pytest.mark.parametrize(
    "n,heads,kv_heads,fragments",
    [
        (4, 6, 2, ["--num-heads 6 is not divisible by N = 4", "--num-kv-heads 2 is not divisible"]),
        (2, 6, 3, ["--num-kv-heads 3 is not divisible by N = 2"]),
        (4, 8, 2, ["--num-kv-heads 2 is not divisible by N = 4"]),
    ],
)
def test_ulysses_head_limits(n, heads, kv_heads, fragments):
    """Config-level: Ulysses names the offending head counts and points at LSS, which runs the
    same configuration."""
    with pytest.raises(ConfigError) as err:
        _run_config(n, heads, kv_heads)
    for frag in [*fragments, "--mode ulysses", "try --mode lss"]:
        assert frag in str(err.value), str(err.value)
    _run_config(n, heads, kv_heads, mode="lss")  # no head cap
    _run_config(n, 8 * n, 4 * n)  # divisible heads are fine


def test_ulysses_cli_fails_fast():
    """The trainer exits 2 with the message before any process group (none could be built:
    WORLD_SIZE is set but MASTER_ADDR is not)."""
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "lss_megatron.train", "--mode", "ulysses", "--seq-parallel", "4",
         "--num-heads", "6", "--num-kv-heads", "3", "--hidden-size", "48"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "--num-heads 6 is not divisible by N = 4" in res.stderr, res.stderr
    assert "--num-kv-heads 3 is not divisible by N = 4" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 10
