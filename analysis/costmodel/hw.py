"""Devices and an alpha-beta network that knows intra-node and inter-node links.

A collective on a group of n ranks costs ``steps * alpha + bytes / bandwidth`` (ring algorithms:
n - 1 steps for all-gather, reduce-scatter and all-to-all, 2 (n - 1) for all-reduce), where
``bytes`` is what one rank sends (`lss_megatron.parallel.comm`'s convention) and ``bandwidth``
the slowest link a ring over the group's placement uses:

* a group inside one node uses the intra-node link: NVLink GPU to GPU, or, on nodes with several
  sockets (Summit: 3 GPUs per POWER9 socket), the slower socket link once the group spans sockets;
* a group spanning nodes is a ring that enters and leaves every node once, so each node's network
  interface carries one stream per group; every group of the same kind runs at the same time (all
  data groups reduce together), so a node's interface bandwidth is shared by the
  ``gpus_per_node / members_per_node`` groups that cross it. The link is the slower of that share
  and the intra-node link (when the group has several members per node).

All-reduces take the cheaper of a ring and a tree (``2 ceil(log2 n)`` latency steps, about the
ring's bytes), as NCCL picks trees when latency dominates. Ranks are placed in order (rank r on
node r // gpus_per_node), as Megatron orders them (tp-cp-ep-dp-pp): a sequence or
tensor-parallel group is consecutive, a data group strided by N.
Figures are datasheet values or stated assumptions (docs/costmodel.md, docs/hardware.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Assumptions:
    """Efficiencies of the GPU time model (fractions of datasheet peaks) and what overlaps."""

    gemm_efficiency: float = 0.7
    attention_efficiency: float = 0.5
    score_passes: int = 15
    elementwise_passes_hidden: int = 30
    elementwise_passes_ffn: int = 10
    overlap_ring: bool = True
    overlap_kv_gather: bool = False


@dataclass(frozen=True)
class Network:
    """Alpha-beta links of one kind of node. Bandwidths are bytes/s per direction."""

    gpus_per_node: int
    intra_bw: float  # GPU to GPU inside a socket / NVSwitch domain
    inter_bw_per_node: float  # the node's network interface(s), shared by its GPUs
    intra_alpha: float = 5e-6  # seconds per ring step inside a node
    inter_alpha: float = 10e-6  # seconds per ring step between nodes
    gpus_per_socket: int = 0  # 0: one domain per node (NVSwitch)
    cross_socket_bw: float = 0.0  # per direction, between the sockets of a node

    def placement(self, n: int, stride: int = 1) -> tuple[int, int]:
        """(members per node, nodes spanned) of a group of n ranks spaced `stride` apart, the
        group starting on a node boundary."""
        per_node = max(1, min(n, self.gpus_per_node // max(1, stride)))
        return per_node, math.ceil(n / per_node)

    def concurrent(self, n: int, stride: int = 1) -> int:
        """Groups of this kind whose rings cross one node's interface at the same time."""
        return max(1, self.gpus_per_node // self.placement(n, stride)[0])

    def link(self, n: int, stride: int = 1) -> tuple[float, float]:
        """(alpha, bandwidth) of the slowest link a ring over this group uses."""
        per_node, nodes = self.placement(n, stride)
        intra = self.intra_bw
        if self.gpus_per_socket and (per_node - 1) * max(1, stride) >= self.gpus_per_socket:
            intra = min(intra, self.cross_socket_bw)  # the ring crosses the socket link
        if nodes == 1:
            return self.intra_alpha, intra
        share = self.inter_bw_per_node / self.concurrent(n, stride)
        return self.inter_alpha, min(share, intra) if per_node > 1 else share

    def time(self, op: str, nbytes: float, n: int, stride: int = 1) -> float:
        """Seconds for one collective: `op` in all_gather, reduce_scatter, all_reduce,
        all_to_all, p2p (one send of `nbytes`); `nbytes` is what one rank sends."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        alpha, bw = self.link(n, stride)
        steps = {"all_reduce": 2 * (n - 1), "p2p": 1}.get(op, n - 1)
        per_node, nodes = self.placement(n, stride)
        if op == "all_to_all" and nodes > 1:
            # the off-node share of every rank's data leaves through the node's interface
            off_node = nbytes * (n - per_node) / (n - 1)
            node_out = off_node * per_node * self.concurrent(n, stride)
            return steps * alpha + max(node_out / self.inter_bw_per_node, nbytes / self.intra_bw)
        ring = steps * alpha + nbytes / bw
        if op == "all_reduce":  # NCCL switches to (double binary) trees when latency dominates
            tree = 2 * math.ceil(math.log2(n)) * alpha + nbytes * n / (n - 1) / bw
            return min(ring, tree)
        return ring


@dataclass(frozen=True)
class Device:
    """One accelerator and the network of its nodes."""

    name: str
    memory_bytes: float
    hbm_bw: float  # bytes/s
    peak_flops: dict  # precision -> dense FLOP/s ("fp32", "fp16", "bf16")
    network: Network
    note: str = ""
    attention_efficiency: tuple = ()
    """Measured by launch/gpu_check.sh: ((l/N, fraction of the bf16 matmul peak), ...) of LSS
    partial attention on the most loaded rank, forward + backward, bf16 (`attention_efficiency_at`
    interpolates). Empty: the time model's assumed efficiency applies."""
    assumptions: Assumptions = field(default_factory=Assumptions)
    """The stated efficiencies the rates below apply (`steptime.step_time` reads the overlaps)."""

    def attention_efficiency_at(self, local_len: int) -> float | None:
        """Measured efficiency at `local_len` queries per rank: linear in log2(l/N) between
        measured points, the nearest measured point outside their range; None if unmeasured."""
        pts = sorted(self.attention_efficiency)
        if not pts:
            return None
        if local_len <= pts[0][0]:
            return pts[0][1]
        for (l0, f0), (l1, f1) in zip(pts, pts[1:], strict=False):
            if local_len <= l1:
                w = math.log2(local_len / l0) / math.log2(l1 / l0)
                return f0 + w * (f1 - f0)
        return pts[-1][1]

    def peak(self, precision: str) -> float:
        if precision not in self.peak_flops:
            raise ValueError(f"{self.name} has no {precision} peak; has {sorted(self.peak_flops)}")
        return self.peak_flops[precision]

    # --- the device interface the step time reads (`calibrated.CalibratedDevice` has the same) --
    def precision(self, elem_bytes: int) -> str:
        """The precision a run computes in: fp32, or a 16-bit one (fp16; bf16 where the device
        has no fp16 peak)."""
        return "fp32" if elem_bytes == 4 else "fp16"

    def _peak_at(self, elem_bytes: int) -> float:
        prec = self.precision(elem_bytes)
        if prec == "fp16" and "fp16" not in self.peak_flops:
            prec = "bf16"
        return self.peak(prec)

    def gemm_rate(self, flops: float, elem_bytes: int = 4) -> float:
        """FLOP/s of a GEMM: the peak at this precision x ``gemm_efficiency``."""
        return self._peak_at(elem_bytes) * self.assumptions.gemm_efficiency

    def attention_fraction(self, queries: int, elem_bytes: int = 4) -> float:
        """The fused attention kernel's fraction of peak: measured on this device at `queries`
        per kernel call (launch/gpu_check.sh, bf16) for 16-bit runs where there is a
        measurement, else the assumed ``attention_efficiency``."""
        measured = self.attention_efficiency_at(queries) if elem_bytes == 2 else None
        return measured if measured is not None else self.assumptions.attention_efficiency

    def attention_rate(
        self, kernel: str, flops: float, head_dim: int, queries: int = 0, elem_bytes: int = 4
    ) -> float:
        """FLOP/s of attention: a materialising kernel's two GEMMs at the GEMM rate (its score
        traffic is `score_time`), a flash-style kernel at `attention_fraction` of the peak."""
        if kernel == "materialized":
            return self.gemm_rate(flops, elem_bytes)
        return self._peak_at(elem_bytes) * self.attention_fraction(queries, elem_bytes)

    def score_time(self, score_bytes: float) -> float:
        """A materialised score tensor through HBM ``score_passes`` times (scores, mask,
        softmax, probabilities and their gradients)."""
        return self.assumptions.score_passes * score_bytes / self.hbm_bw

    def elementwise_bw(self, nbytes: float) -> float:
        return self.hbm_bw

    def collective_time(self, op: str, nbytes: float, n: int, stride: int = 1) -> float:
        return self.network.time(op, nbytes, n, stride)

    def share(self, ranks: int) -> float:
        """One rank per GPU: nothing shares its compute."""
        return 1.0

    def overhead(self, key: str, mode: str) -> float:
        """No fixed per-step costs are modelled on a GPU."""
        return 0.0

    def report(self, gemm_calls: list[float], elem_bytes: int) -> dict:
        return {"peak_flops": self._peak_at(elem_bytes)}


SUMMIT = Network(
    gpus_per_node=6,
    intra_bw=50 * GB,  # NVLink 2.0, 2 bricks GPU-GPU inside a socket
    inter_bw_per_node=23 * GB,  # dual-rail EDR InfiniBand, 2 x 100 Gb/s, ~23 GB/s achievable
    intra_alpha=5e-6,
    inter_alpha=10e-6,
    gpus_per_socket=3,
    cross_socket_bw=32 * GB,  # X-Bus 64 GB/s bidirectional
)
DGX_A100 = Network(gpus_per_node=8, intra_bw=300 * GB, inter_bw_per_node=8 * 25 * GB)
DGX_H100 = Network(gpus_per_node=8, intra_bw=450 * GB, inter_bw_per_node=8 * 50 * GB)

DEVICES: dict[str, Device] = {
    "v100-summit": Device(
        "V100 SXM2 16 GB (Summit)",
        16 * GB,
        900 * GB,
        {"fp32": 15.7e12, "fp16": 125e12},
        SUMMIT,
        "6 GPUs per node, 3 per POWER9 socket; no bf16",
    ),
    "a100": Device(
        "A100 SXM 80 GB (DGX A100-class)",
        80 * GB,
        2.0e12,
        {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
        DGX_A100,
        "8 GPUs per node on NVSwitch; HDR 200 Gb/s per GPU",
    ),
    "h100": Device(
        "H100 SXM 80 GB (DGX H100-class)",
        80 * GB,
        3.35e12,
        {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
        DGX_H100,
        "8 GPUs per node on NVSwitch; NDR 400 Gb/s per GPU",
    ),
    "h200": Device(
        "H200 141 GB (measured matmul and copy rates)",
        141 * GB,
        4.3e12,
        {"fp32": 67e12, "tf32": 495e12, "bf16": 790e12, "fp16": 790e12},
        DGX_H100,
        "bf16 8192^3 matmul and device copy measured on the lent H200; node as DGX H100",
    ),
}


MEASURED_DIR = Path(__file__).resolve().parents[1] / "data" / "gpu"


def measured_record(preset: str, directory: Path = MEASURED_DIR) -> dict | None:
    """What `launch/gpu_check.sh` measured on a device of this preset's kind: the first
    analysis/data/gpu/*.json whose ``device`` name contains e.g. "h200" and that has a
    ``matmul_peak_flops``, or None."""
    token = preset.split("-")[0].lower()
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if token in str(data.get("device", "")).lower() and data.get("matmul_peak_flops"):
            return data
    return None


def measured_bf16_peak(preset: str, directory: Path = MEASURED_DIR) -> float | None:
    """The bf16 matmul peak measured on a device of this preset's kind (`measured_record`)."""
    data = measured_record(preset, directory)
    return float(data["matmul_peak_flops"]) if data else None


def measured_attention_efficiency(data: dict) -> tuple:
    """((l/N, fraction of the matmul peak), ...) of the most loaded LSS rank in a gpu_check
    record (its ``attention_efficiency`` rows for the last rank), sorted by l/N."""
    rows = [
        r
        for r in data.get("attention_efficiency", [])
        if r.get("rank") == "last" and r.get("fraction_of_matmul_peak")
    ]
    return tuple(sorted((int(r["local_len"]), float(r["fraction_of_matmul_peak"])) for r in rows))


def get_device(device: str | Device, directory: Path = MEASURED_DIR) -> Device:
    """A device preset; where launch/gpu_check.sh measured this kind of GPU (a record in
    `directory`), its measured bf16 (and fp16) matmul peak replaces the preset's and its measured
    LSS attention efficiency replaces the time model's assumed one (`Device.attention_efficiency`)."""
    if isinstance(device, Device):
        return device
    try:
        preset = DEVICES[device]
    except KeyError:
        raise ValueError(f"unknown device {device!r}; presets: {sorted(DEVICES)}") from None
    data = measured_record(device, directory)
    if data is None:
        return preset
    peak = float(data["matmul_peak_flops"])
    flops = {**preset.peak_flops, "bf16": peak, "fp16": peak}
    eff = measured_attention_efficiency(data)
    note = preset.note + "; bf16 peak" + (" and attention efficiency" if eff else "") + " measured"
    return replace(preset, peak_flops=flops, note=note, attention_efficiency=eff)


def with_network(device: Device, **changes) -> Device:
    """A copy of `device` whose network has `changes` (e.g. inter_bw_per_node=...)."""
    return replace(device, network=replace(device.network, **changes))
