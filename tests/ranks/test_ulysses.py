"""DeepSpeed-Ulysses (`--mode ulysses`) on the same Megatron GPT model: exactness and traffic.

* Model parity: from the same seed, the loss, every per-token loss and EVERY parameter gradient
  after double gradient averaging equal the one-process Megatron model within 1e-5 (fp32), at
  (N, D) = (2, 1), (4, 1), (2, 2), learned and RoPE positions, GQA h = 8, h_kv = 4 (one key/value
  head per rank at N = 4). The worker and the checks are tests/support.py's (`model_worker`,
  `check_model`), as in tests/ranks/test_model.py.
* Traffic: per layer and micro-batch, exactly four all-to-alls forward (q, k, v, out) and four
  backward, all on the sequence group (category ``sp``), with the bytes of
  `baselines.ulysses.sp_bytes_per_layer` each way; DeepSpeed's collectives reach
  torch.distributed (so `comm.record()` sees them) and nothing is JIT-compiled.

The trainer under torchrun and the command-line failure: tests/e2e/test_ulysses.py; the head
limits: tests/unit/test_ulysses.py.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lss_megatron.baselines.ulysses import sp_bytes_per_layer
from lss_megatron.config import ModelConfig
from tests.support import MODEL, check_model, model_worker, run_ranks

LAYOUTS2 = [(2, 1, "learned", "ulysses"), (2, 1, "rope", "ulysses")]
LAYOUTS4 = [(n, d, p, "ulysses") for n, d in ((4, 1), (2, 2)) for p in ("learned", "rope")]


def _recording_worker(rank, world, layouts, ext_dir):
    """`model_worker`, with every forward/backward recorded by `comm.record()`; also reports
    which deepspeed.comm backend ran, and points TORCH_EXTENSIONS_DIR at `ext_dir` so that any
    JIT build would show there."""
    os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir
    import lss_megatron.training.micro_batches as step
    from lss_megatron.parallel import comm

    logs, inner = [], step.forward_backward

    def recorded(*args, **kwargs):
        with comm.record() as log:
            result = inner(*args, **kwargs)
        logs.append({"calls": dict(log.calls), "bytes": dict(log.bytes)})
        return result

    step.forward_backward = recorded  # model_worker imports it at call time
    results = model_worker(rank, world, layouts)
    for r, log in zip(results, logs, strict=True):
        r["comm"] = log
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    return {
        "results": results,
        "backend": type(backend).__name__,
        "shm_op": getattr(backend, "shm_comm_op", "missing"),
    }


class _Runs(dict):
    """Keys "ref" (the 1-process runs), "ext" (the extension folder) and (N, D, pos) (that layout's
    per-rank results); the 4-rank layouts run on first use, so the 2-rank checks need not."""

    def add(self, ranks):
        for rank in ranks:
            assert (rank["backend"], rank["shm_op"]) == ("TorchBackendNoShm", None), rank
            for r in rank["results"]:
                self.setdefault(r["layout"][:3], []).append(r)

    def __missing__(self, key):
        assert key[0] * key[1] == 4 and "ran4" not in self, key
        self["ran4"] = True
        self.add(run_ranks(_recording_worker, 4, LAYOUTS4, str(self["ext"]), timeout=180))
        return self[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ext = str(tmp_path_factory.mktemp("ext") / "torch_extensions")
    serial = [(1, 1, "learned", "serial"), (1, 1, "rope", "serial")]
    with ThreadPoolExecutor(2) as pool:  # the 1-process reference alongside the 2 ranks
        ref = pool.submit(run_ranks, model_worker, 1, serial, timeout=120)
        ranks = pool.submit(run_ranks, _recording_worker, 2, LAYOUTS2, ext, timeout=120).result()
        ref = ref.result()[0]
    out = _Runs(ref={r["layout"][2]: r for r in ref}, ext=Path(ext))
    out.add(ranks)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "n,d,pos",
    [x[:3] for x in LAYOUTS2]
    + [pytest.param(*x[:3], marks=pytest.mark.slow) for x in LAYOUTS4],  # one 4-rank spawn: ~19 s
)
def test_ulysses_model_matches_one_process(runs, n, d, pos):
    """Loss, per-token losses and every gradient (position slices included) within 1e-5."""
    check_model(runs["ref"][pos], runs[(n, d, pos)], n, d, pos)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "n,d", [(2, 1), *(pytest.param(*x, marks=pytest.mark.slow) for x in ((4, 1), (2, 2)))]
)
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
