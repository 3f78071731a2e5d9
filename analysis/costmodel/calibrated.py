"""A CPU measured by ``python -m analysis.calibrate``, and the step time of a trainer run on it.

The device file (JSON, ``analysis/data/cpu/<host>.json``) holds only measurements of this
machine, each a table the model interpolates (linear in log-log between measured points, the
nearest point outside their range):

* ``gemm``: [flops per call, FLOP/s] of ``nn.functional.linear`` forward + backward (3 GEMMs)
  at several shapes, one process, one thread (the trainer's OMP_NUM_THREADS=1);
* ``attention``: {``flash``, ``dense``}: [executed FLOPs per call, FLOP/s] of the trainer's
  attention kernels (``lss.kernel.partial_attention``, ``lss.dense_attention``), fwd + bwd, at
  head dimension `BASE_HEAD_DIM` (and ``flash_d32``, ``dense_d32``: at d = 32; the nearest d is used);
* ``elementwise``: [bytes per tensor, bytes/s] of a fused-free elementwise chain, fwd + bwd;
* ``collectives``: {op: {ranks: [alpha s, bytes/s]}} fitted to gloo timings of the comm module's
  all-gather, reduce-scatter, all-reduce and all-to-all (bytes as the trainer counts them);
* ``concurrency``: {ranks: slowdown} of a matmul when that many single-thread processes run at
  once, a record; the model shares max(1, ranks / cores), cores = ``len(os.sched_getaffinity(0))``;
* ``overheads``: fixed seconds per step, per step and layer, per micro-batch and per micro-batch
  and layer (the last two per mode), fitted by calibrate to tiny trainer runs after subtracting
  this model's compute and communication (Python, autograd and kernel-launch costs).

Step time (slowest rank): ``share(P) x [M (GEMMs + attention + elementwise + per-micro + L x
per-layer) + per-step + L x per-step-layer + optimizer] + M x activation traffic + gradient
sync + small all-reduces``, no overlap (the trainer communicates synchronously).
"""

from __future__ import annotations

import bisect
import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from lss_megatron.resources import source_root, user_data_dir

from ..inputs import InputError, read_json_file
from .hw import Assumptions

BASE_HEAD_DIM = 16
"""The head dimension of a calibration's plain ``flash`` / ``dense`` tables; tables measured at
other head dimensions are named ``flash_d32``, ``dense_d32``, ..."""

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "cpu"
"""The device files beside the code (``analysis/data/cpu``): written only in a checkout."""


def writable_dir() -> Path:
    """Where calibrate writes by default: `DATA_DIR` in a source checkout, else (an installed
    package, whose folder may be read-only site-packages) ``cpu/`` under the user's data folder
    (`lss_megatron.resources.user_data_dir`)."""
    return DATA_DIR if source_root() is not None else user_data_dir() / "cpu"


SCHEMA = 1
OPS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


class NotCalibrated(ValueError):
    """The calibration did not measure what the run needs (e.g. bf16 rates)."""


def default_path(directory: Path | None = None) -> Path:
    """Where calibrate writes by default: <host>.json (this-machine.json without a hostname) in
    `directory` (default `writable_dir`)."""
    directory = writable_dir() if directory is None else directory
    return directory / f"{socket.gethostname() or 'this-machine'}.json"


def find_device_file(directory: Path | None = None) -> Path | None:
    """This machine's calibration (`default_path`), else this-machine.json, else None; in
    `directory`, or by default in `writable_dir` and then `DATA_DIR`."""
    folders = (
        [directory] if directory is not None else list(dict.fromkeys([writable_dir(), DATA_DIR]))
    )
    for folder in folders:
        for path in (default_path(folder), folder / "this-machine.json"):
            if path.is_file():
                return path
    return None


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear in log-log between the measured (x, y) points; the nearest point outside."""
    pts = sorted(points)
    xs = [p[0] for p in pts]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return pts[0][1]
    if i == len(pts):
        return pts[-1][1]
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    w = math.log(x / x0) / math.log(x1 / x0)
    return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))


@dataclass(frozen=True)
class CpuNetwork:
    """gloo collectives as measured: one call costs alpha(op, n) + bytes / bw(op, n)."""

    fits: dict  # op -> {n: (alpha, bw)}

    def _fit(self, op: str, n: int) -> tuple[float, float]:
        if op == "p2p":  # one step of an all-gather ring on the same n ranks (bandwidth as
            alpha, bw = self._fit("all_gather", n)  # measured with all n ranks sending)
            return alpha / max(1, n - 1), bw
        table = self.fits[op]
        if n in table:
            return table[n]
        m = min(table, key=lambda k: abs(k - n))  # extrapolate latency by ring steps
        alpha, bw = table[m]
        return alpha * (n - 1) / (m - 1), bw

    def link(self, n: int, stride: int = 1) -> tuple[float, float]:
        return self._fit("all_gather", n)

    def time(self, op: str, nbytes: float, n: int, stride: int = 1) -> float:
        if n <= 1 or (op == "p2p" and nbytes <= 0):  # a receive: its sender pays the transfer
            return 0.0
        alpha, bw = self._fit(op, n)
        return alpha + max(nbytes, 0) / bw


@dataclass(frozen=True)
class CalibratedDevice:
    """A measured CPU (one process per rank, one thread each)."""

    name: str
    cores: int
    memory_bytes: float
    gemm: list
    attention: dict
    elementwise: list
    network: CpuNetwork
    concurrency: dict
    overheads: dict
    source: str = ""
    load_avg: list = field(default_factory=list)
    assumptions: Assumptions = field(default_factory=Assumptions)
    """Only its elementwise passes and overlaps apply here (the rates are measured)."""

    def share(self, ranks: int) -> float:
        """Slowdown of each rank's compute when `ranks` single-thread processes share the cores:
        max(1, ranks / cores). The measured ``concurrency`` table is kept as a record only: on a
        shared machine it measures the other users' load as much as this machine."""
        return max(1.0, ranks / self.cores)

    # --- the device interface the step time reads (`hw.Device` has the same) -------------------
    def precision(self, elem_bytes: int) -> str:
        return "fp32" if elem_bytes == 4 else "bf16"

    def gemm_rate(self, flops: float, elem_bytes: int = 4) -> float:
        """FLOP/s measured at this many FLOPs per call. The tables are fp32: a 16-bit run raises
        `NotCalibrated` (the trainer's CPU bf16 was not measured, so its time is not priced)."""
        if elem_bytes != 4:
            raise NotCalibrated(
                f"this calibration ({self.source or self.name}) measured fp32 rates only; a "
                f"{8 * elem_bytes}-bit run's step time is not predicted on it"
            )
        return interpolate(self.gemm, flops)

    def attention_fraction(self, queries: int, elem_bytes: int = 4) -> None:
        """No fraction of a peak: the CPU's attention rates are measured."""
        return None

    def attention_rate(
        self,
        kernel: str,
        flops: float,
        head_dim: int = BASE_HEAD_DIM,
        queries: int = 0,
        elem_bytes: int = 4,
    ) -> float:
        """FLOP/s of `kernel` at `flops` per call, from the table measured at the head dimension
        nearest `head_dim` (on a log scale; files without per-d tables: the one table); the
        dense tables include the score traffic."""
        name = "dense" if kernel == "materialized" else "flash"
        dims = {BASE_HEAD_DIM: name} | {
            int(k.rsplit("_d", 1)[1]): k for k in self.attention if k.startswith(f"{name}_d")
        }
        nearest = min(dims, key=lambda d: abs(math.log(d / head_dim)))
        return interpolate(self.attention[dims[nearest]], flops)

    def score_time(self, score_bytes: float) -> float:
        """In the measured dense rates already."""
        return 0.0

    def elementwise_bw(self, nbytes: float) -> float:
        """Bytes/s of an elementwise chain over tensors of `nbytes`, measured."""
        return interpolate(self.elementwise, nbytes)

    def collective_time(self, op: str, nbytes: float, n: int, stride: int = 1) -> float:
        return self.network.time(op, nbytes, n, stride)

    def overhead(self, key: str, mode: str) -> float:
        """Fixed seconds the calibration fitted (per mode where it fitted one, else serial's)."""
        v = self.overheads[key]
        return float(v.get(mode, v["serial"]) if isinstance(v, dict) else v)

    def report(self, gemm_calls: list[float], elem_bytes: int) -> dict:
        return {"gemm_flops_per_s": [self.gemm_rate(f, elem_bytes) for f in gemm_calls]}


# --- reading and checking a device file -----------------------------------------------------------
def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where}: {value!r} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: {value!r} is not a positive finite number")
    return float(value)


def _table(rows, where: str) -> list[tuple[float, float]]:
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{where}: expected a non-empty list of [x, y] pairs")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list | tuple) or len(row) != 2:
            raise InputError(f"{where}[{i}]: {row!r} is not an [x, y] pair")
        out.append((_positive(row[0], f"{where}[{i}][0]"), _positive(row[1], f"{where}[{i}][1]")))
    return out


def _ranks_table(d, where: str, check) -> dict:
    if not isinstance(d, dict) or not d:
        raise InputError(f"{where}: expected an object keyed by rank count")
    out = {}
    for k, v in d.items():
        if not str(k).isdigit() or int(k) < 1:
            raise InputError(f"{where}: key {k!r} is not a rank count")
        out[int(k)] = check(v, f"{where}.{k}")
    return out


def _overheads(d, where: str) -> dict:
    out = {}
    for key in ("per_step", "per_step_layer", "per_micro", "per_micro_layer"):
        v = d.get(key) if isinstance(d, dict) else None
        if isinstance(v, dict):
            if "serial" not in v:
                raise InputError(f"{where}.{key}: needs a 'serial' entry")
            out[key] = {m: _nonneg(x, f"{where}.{key}.{m}") for m, x in v.items()}
        else:
            out[key] = _nonneg(v, f"{where}.{key}")
    return out


def _nonneg(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{where}: {value!r} is not a finite number")
    if value < 0:
        raise InputError(f"{where}: {value!r} is negative")
    return float(value)


def device_from_dict(data: dict, source: str = "") -> CalibratedDevice:
    """Check a calibration record and build the device; InputError naming the bad field."""
    where = source or "device file"
    if data.get("schema") != SCHEMA or data.get("kind") != "cpu-calibration":
        raise InputError(
            f"{where}: not a calibration file of schema {SCHEMA} "
            f"(kind {data.get('kind')!r}, schema {data.get('schema')!r})"
        )
    for key in ("gemm", "attention", "elementwise", "collectives", "concurrency", "overheads"):
        if key not in data:
            raise InputError(f"{where}: missing {key!r}")
    att = data["attention"]
    if not isinstance(att, dict) or not {"flash", "dense"} <= set(att):
        raise InputError(f"{where}: attention needs 'flash' and 'dense' tables")
    coll = data["collectives"]
    if not isinstance(coll, dict) or set(OPS) - set(coll):
        raise InputError(f"{where}: collectives needs {list(OPS)}")

    def pair(v, w):
        return tuple(_positive(x, f"{w}[{i}]") for i, x in enumerate(_pairlist(v, w)))

    return CalibratedDevice(
        name=str(data.get("device", "calibrated CPU")),
        cores=int(_positive(data.get("cores"), f"{where}: cores")),
        memory_bytes=_positive(data.get("memory_bytes"), f"{where}: memory_bytes"),
        gemm=_table(data["gemm"], f"{where}: gemm"),
        attention={
            k: _table(v, f"{where}: attention.{k}")
            for k, v in att.items()
            if k in ("flash", "dense") or re.fullmatch(r"(flash|dense)_d[1-9][0-9]*", k)
        },
        elementwise=_table(data["elementwise"], f"{where}: elementwise"),
        network=CpuNetwork(
            {op: _ranks_table(coll[op], f"{where}: collectives.{op}", pair) for op in OPS}
        ),
        concurrency=_ranks_table(data["concurrency"], f"{where}: concurrency", _positive),
        overheads=_overheads(data["overheads"], f"{where}: overheads"),
        source=source,
        load_avg=list(data.get("load_avg", [])),
    )


def _pairlist(v, where: str) -> list:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise InputError(f"{where}: {v!r} is not an [alpha, bandwidth] pair")
    return list(v)


def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``'s model name), as a calibration records it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def foreign_cpu_note(device: CalibratedDevice, where: str) -> str | None:
    """One line when `device` was measured on another CPU model than this machine's: a virtual
    machine moved to another host keeps its host name, and a stale calibration then mispredicts
    every step (2026-12-06: an Intel calibration on an AMD host predicted 0.3-0.5x the steps)."""
    here = cpu_name()
    if device.name in (here, "calibrated CPU"):
        return None
    return (
        f"note: {where} was measured on {device.name!r}, this machine is {here!r}: its step times "
        "do not apply here; recalibrate (python -m analysis.calibrate)"
    )


def load_device_file(path: str | Path) -> CalibratedDevice:
    path = Path(path)
    return device_from_dict(
        read_json_file(path, "a calibration from analysis.calibrate"), str(path)
    )
