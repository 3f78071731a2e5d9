"""Collective counting on every torch the package supports (2.4-2.13), and comm timing.

torch 2.13 names the single-tensor all-gather and reduce-scatter ``all_gather_single`` and
``reduce_scatter_single`` (the older ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` call
them); torch 2.4-2.12 have only the older names, which talk to the process group directly, and
Megatron binds them at import (``dist_all_gather_func``). `_expose_only_old_names` makes this
torch look like that in a fresh rank process, before Megatron is imported; the trainer's counted
bytes and calls for lss and nvidia-sp must then be identical to a normal run's (and the
losses bitwise equal: the same collectives run).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tests.support import run_ranks

KEYS = (
    "sp_comm_bytes",
    "grad_comm_bytes",
    "other_comm_bytes",
    "sp_comm_calls",
    "grad_comm_calls",
    "other_comm_calls",
    "loss",
)
TRAIN = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-heads",
    "4",
    "--seq-length",
    "64",
    "--vocab-size",
    "64",
    "--steps",
    "2",
    "--progress",
    "off",
    "--global-batch-size",
    "2",
    "--seq-parallel",
    "2",
    "--optimizer",
    "adamw",
]
MODES = {
    "lss": ["--mode", "lss", "--num-kv-heads", "2", "--kv-gather-chunks", "2"],
    "nvidia-sp": ["--mode", "nvidia-sp", "--position-embedding", "learned"],
}


def _expose_only_old_names() -> None:
    """torch.distributed as in torch 2.4-2.12 (see module doc): no ``*_single`` names; the older
    names call the process group themselves; ``_all_gather_base`` / ``_reduce_scatter_base`` call
    the older names through the module (as 2.4's do)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives  # noqa: F401 - binds the 2.13 names at
    import torch.distributed.distributed_c10d as c10d  # import: import it before they go away

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        opts = c10d.AllgatherOptions()
        opts.asyncOp = async_op
        pg = group if group is not None else c10d._get_default_group()
        work = pg._allgather_base(output_tensor, input_tensor, opts)
        if async_op:
            return work
        work.wait()

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        opts = c10d.ReduceScatterOptions()
        opts.reduceOp, opts.asyncOp = op, async_op
        pg = group if group is not None else c10d._get_default_group()
        work = pg._reduce_scatter_base(output, input, opts)
        if async_op:
            return work
        work.wait()

    def _all_gather_base(output_tensor, input_tensor, group=None, async_op=False):
        return c10d.all_gather_into_tensor(output_tensor, input_tensor, group, async_op)

    def _reduce_scatter_base(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        return c10d.reduce_scatter_tensor(output, input, op, group, async_op)

    for ns in (dist, c10d):
        for name in ("all_gather_single", "reduce_scatter_single"):
            if hasattr(ns, name):
                delattr(ns, name)
        ns.all_gather_into_tensor, ns.reduce_scatter_tensor = (
            all_gather_into_tensor,
            reduce_scatter_tensor,
        )
        ns._all_gather_base, ns._reduce_scatter_base = _all_gather_base, _reduce_scatter_base


def _train_counts(rank, world, out, old):
    import warnings

    warnings.filterwarnings("ignore")
    if old:
        _expose_only_old_names()
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from lss_megatron.train import config_from_args, parse_args
    from lss_megatron.training.loop import run

    # the simulation really is in place, where Megatron bound the function at import included
    assert hasattr(dist, "all_gather_single") is not old
    assert (mappings.dist_all_gather_func.__qualname__.startswith("_expose_only_old_names")) is old
    result = {}
    for mode, flags in MODES.items():
        path = Path(out) / mode
        args = parse_args([*TRAIN, *flags, "--out", str(path)])
        assert run(config_from_args(args, world).validate(), rank).exit_code == 0
        if rank == 0:
            rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
            result[mode] = [{k: r[k] for k in KEYS} for r in rows]
    return result


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_older_torch_names_count_the_same_bytes(tmp_path):
    new = run_ranks(_train_counts, 2, str(tmp_path / "new"), False, timeout=300)[0]
    old = run_ranks(_train_counts, 2, str(tmp_path / "old"), True, timeout=300)[0]
    assert new["lss"][0]["sp_comm_bytes"] > 0 and new["nvidia-sp"][0]["sp_comm_bytes"] > 0
    assert old == new


# --- the wrapper itself: one count per call, start-to-completion time --------------------------
def _old_names_counted_once(rank, world):
    _expose_only_old_names()
    import torch
    import torch.distributed as dist

    from lss_megatron.parallel import comm

    x = torch.ones(3, 4)  # 48 bytes
    out = torch.empty(6, 4)
    with comm.record() as log:
        dist._all_gather_base(out, x)  # -> all_gather_into_tensor (wrapped too): counted once
        dist.reduce_scatter_tensor(x, out)
    return dict(log.calls), dict(log.bytes)


def test_older_names_are_counted_once_under_the_canonical_op():
    for calls, nbytes in run_ranks(_old_names_counted_once, 2, timeout=120):
        assert calls == {("all_gather", "other"): 1, ("reduce_scatter", "other"): 1}
        assert nbytes == {("all_gather", "other"): 48, ("reduce_scatter", "other"): 48}


DELAY_S = 0.6


def _never_waited(rank, world):
    import torch
    import torch.distributed as dist

    from lss_megatron.parallel import comm

    x, out = torch.ones(4), torch.empty(8)
    with comm.record() as log:
        dist.all_gather_into_tensor(out, x)
        done = log.time_s()
        pending = dist.all_gather_into_tensor(out, x, async_op=True)
        total = log.time_s()  # read before it is waited on
    pending.wait()
    return done, total, log.count(), out.tolist()


def test_a_handle_never_waited_on_has_no_time():
    """Its completion is unknown: NaN, not its launch time."""
    for done, total, calls, out in run_ranks(_never_waited, 2, timeout=120):
        assert calls == 2 and out == [1.0] * 8
        assert done >= 0 and math.isnan(total)


def _sync_and_async_time(rank, world):
    import torch
    import torch.distributed as dist

    from lss_megatron.parallel import comm

    x, out = torch.ones(4), torch.empty(8)
    times = []
    for async_op in (False, True):
        dist.barrier()
        with comm.record() as log:
            if rank == 1:
                time.sleep(DELAY_S)
            t0 = time.perf_counter()
            work = dist.all_gather_into_tensor(out, x, async_op=async_op)
            launch = time.perf_counter() - t0
            if async_op:
                work.wait()
        times.append((launch, log.time_s()))
    return times


def test_comm_time_includes_the_wait_sync_and_async():
    """Rank 0 starts an all-gather that cannot complete before rank 1 joins DELAY_S later: the
    recorded time includes the wait, for a blocking call and for an async one (whose launch
    returns at once; its `wait()` ends the interval)."""
    times, _ = run_ranks(_sync_and_async_time, 2, timeout=120)
    (sync_launch, sync_t), (async_launch, async_t) = times
    assert sync_t >= 0.8 * DELAY_S and abs(sync_t - sync_launch) < 0.1  # blocking: the call
    assert async_t >= 0.8 * DELAY_S and async_launch < 0.5 * DELAY_S  # async: launch .. wait()
