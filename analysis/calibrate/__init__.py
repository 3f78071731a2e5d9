"""Measure this machine for the cost model: ``python -m analysis.calibrate``.

Writes a device file (analysis/data/cpu/<host>.json) that `analysis.costmodel` reads
(`costmodel.calibrated`): linear-layer and attention throughput of one single-thread process at
several sizes, elementwise bandwidth, gloo latency and bandwidth of the trainer's collectives at
each rank count, the slowdown when several ranks share the cores, and the trainer's fixed costs
(tiny trainer runs; ``--quick``: a plain PyTorch stand-in). The load average is recorded before
and after: the machine may be shared, and a loaded machine measures slow.
"""

from __future__ import annotations

import os
import socket
import time

import torch

from ..costmodel.calibrated import SCHEMA, cpu_name, device_from_dict
from . import collectives, compute, overheads


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 8e9


def measure_compute(kind: str, ranks: list[int]) -> dict:
    """The in-process part of a record (one thread, as each trainer rank runs)."""
    torch.set_num_threads(1)
    min_time = 0.2 if kind == "full" else 0.03
    return {
        "gemm": compute.linear_rates(kind, min_time),
        "attention": compute.attention_rates(kind, min_time),
        "elementwise": compute.elementwise_rates(kind, min_time),
        "concurrency": compute.concurrency(ranks, 1.0 if kind == "full" else 0.3),
    }


def measure_collectives(kind: str, ranks: list[int]) -> tuple[dict, list]:
    fits: dict = {op: {} for op in collectives_ops()}
    raw = []
    for n in ranks:
        rows = collectives.measure(n, kind)
        raw += [[n, *r] for r in rows]
        for op, pair in collectives.fit(rows).items():
            fits[op][str(n)] = pair
    return fits, raw


def collectives_ops() -> tuple[str, ...]:
    return ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


def calibrate(ranks: list[int], quick: bool = False, modes=("lss", "nvidia-sp", "ulysses")) -> dict:
    """A complete, checked device record of this machine."""
    kind = "quick" if quick else "full"
    t0, load0 = time.time(), os.getloadavg()
    record = {
        "schema": SCHEMA,
        "kind": "cpu-calibration",
        "device": cpu_name(),
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": quick,
        "cores": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_bytes(),
        "torch": torch.__version__,
        "threads_per_rank": 1,
    }
    record.update(measure_compute(kind, ranks))
    record["collectives"], record["collective_timings"] = measure_collectives(kind, ranks)
    if quick:
        record["overheads"] = overheads.quick()
        record["overheads_source"] = "quick: plain PyTorch layers (a stand-in, not the trainer)"
    else:
        record["overheads"], record["overhead_runs"] = overheads.from_trainer(record, modes)
        record["overheads_source"] = "tiny trainer runs minus the modelled compute and collectives"
    record["load_avg"] = [list(load0), list(os.getloadavg())]
    record["seconds"] = round(time.time() - t0, 1)
    device_from_dict(record, "calibration")  # what we write must read back
    return record
