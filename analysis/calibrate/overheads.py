"""Fixed costs of the trainer on this machine (Python, autograd, hooks, kernel launches): tiny
trainer runs whose step time is almost all overhead, minus what the cost model predicts for them
from the measured compute and collectives; the rest is solved for per-step, per-step-and-layer,
per-micro-batch and per-micro-batch-and-layer seconds.

Serial on one rank at (L, M) in {1, 5} x {2, 6}: residual = a + e L + M (b + c L), four runs,
four unknowns. Each parallel mode at N = 2 (L = 1 and 5, M = 2) then gets its own b and c (its
extra layer work: gathers, all-to-alls, scatters), with a and e from serial; residuals are
divided by the modelled two-process core share first. ``--quick`` times a plain PyTorch layer
instead (not the trainer: its numbers are only a stand-in, marked in the file)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import torch

from lss_megatron.modes import REFERENCE

from ..compare import child_env, torchrun_command
from ..costmodel import predict
from ..costmodel.calibrated import device_from_dict
from ..presets import RunSpec
from .compute import bench

TINY = {
    "hidden-size": 32,
    "num-heads": 4,
    "num-kv-heads": 2,
    "ffn-hidden-size": 64,
    "vocab-size": 64,
    "seq-length": 64,
    "position-embedding": "learned",
    "optimizer": "adamw",
    "lr": "1e-3",
    "dtype": "fp32",
    "data": "synthetic",
    "micro-batch-size": 1,
    "steps": 6,
    "dist-timeout": 120,
}
"""The calibration model and recipe, as trainer flags (a `RunSpec`'s, without dashes)."""
LAYERS = (1, 5)
MICRO = (2, 6)


def _run(mode: str, n: int, layers: int, micro: int, out: Path) -> dict:
    """One tiny trainer run; its config.json and the trainer's median step time. Launched as
    analysis.compare launches a run (`RunSpec`, `compare.torchrun_command`)."""
    flags = {"mode": mode, "seq-parallel": n, "data-parallel": 1, "num-layers": layers}
    flags.update({"global-batch-size": micro, **TINY})
    run = RunSpec(mode, n, 1, TINY["seq-length"], 0, "calibration", flags)
    cmd = torchrun_command(run, out)
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(
            f"calibration run {mode} N={n} L={layers} M={micro} failed: {res.stderr[-800:]}"
        )
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"config": config, "measured": summary["step_time_s"]}


def _residual(run: dict, record: dict) -> float:
    """Measured minus the model without fixed costs (this record, overheads zero)."""
    dev = device_from_dict(record)
    return run["measured"] - predict(run["config"], dev)["step_time_s"]


def _zero(record: dict) -> dict:
    zero = {"per_step": 0.0, "per_step_layer": 0.0, "per_micro": 0.0, "per_micro_layer": 0.0}
    return {**record, "overheads": zero}


def from_trainer(record: dict, modes: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """(overheads, the calibration runs: mode, N, L, M, measured, residual)."""
    base = _zero(record)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="calibrate-runs-") as tmp:
        for mode, n in ((REFERENCE, 1), *((m, 2) for m in modes)):
            grid = (
                [(L, M) for L in LAYERS for M in MICRO]
                if mode == REFERENCE
                else [(L, MICRO[0]) for L in LAYERS]
            )
            for L, M in grid:
                run = _run(mode, n, L, M, Path(tmp) / f"{mode}-{L}-{M}")
                runs.append(
                    {
                        "mode": mode,
                        "n": n,
                        "layers": L,
                        "micro": M,
                        "measured": run["measured"],
                        "residual": _residual(run, base),
                    }
                )
    return solve(runs, device_from_dict(base).share(2)), runs


def solve(runs: list[dict], share2: float) -> dict:
    """The four fixed costs from the runs' residuals (negative solutions clamp to 0)."""
    r = {(x["mode"], x["layers"], x["micro"]): x["residual"] for x in runs}
    (l0, l1), (m0, m1) = LAYERS, MICRO
    dl, dm = l1 - l0, m1 - m0
    c = (
        (r["serial", l1, m1] - r["serial", l0, m1]) - (r["serial", l1, m0] - r["serial", l0, m0])
    ) / (dl * dm)
    e = ((r["serial", l1, m0] - r["serial", l0, m0]) - m0 * dl * c) / dl
    b = (r["serial", l0, m1] - r["serial", l0, m0]) / dm - l0 * c
    a = r["serial", l0, m0] - e * l0 - m0 * (b + c * l0)
    out = {
        "per_step": {"serial": max(a, 0.0)},
        "per_step_layer": {"serial": max(e, 0.0)},
        "per_micro": {"serial": max(b, 0.0)},
        "per_micro_layer": {"serial": max(c, 0.0)},
    }
    for mode in sorted({x["mode"] for x in runs} - {"serial"}):
        lo, hi = r[mode, l0, m0] / share2, r[mode, l1, m0] / share2
        cm = ((hi - lo) - dl * e) / (m0 * dl)
        bm = (lo - a - e * l0) / m0 - cm * l0
        out["per_micro_layer"][mode] = max(cm, 0.0)
        out["per_micro"][mode] = max(bm, 0.0)
    return out


def quick() -> dict:
    """A stand-in from plain PyTorch: a 1- and a 3-layer tiny MLP block, forward + backward, and
    AdamW over them (not the trainer's layers: far fewer Python calls per layer)."""

    def block():
        return torch.nn.Sequential(
            torch.nn.LayerNorm(32),
            torch.nn.Linear(32, 96),
            torch.nn.GELU(),
            torch.nn.Linear(96, 32),
        )

    times, opt_times = {}, {}
    for layers in (1, 3):
        model = torch.nn.Sequential(*[block() for _ in range(layers)])
        x = torch.randn(16, 32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times[layers] = bench(lambda m=model, x=x: m(x).sum().backward(), 0.1)
        opt_times[layers] = bench(opt.step, 0.1)
    layer = max((times[3] - times[1]) / 2, 1e-6)
    opt_layer = max((opt_times[3] - opt_times[1]) / 2, 1e-6)
    return {
        "per_step": {"serial": max(opt_times[1] - opt_layer, 1e-6)},
        "per_step_layer": {"serial": opt_layer},
        "per_micro": {"serial": max(times[1] - layer, 1e-6)},
        "per_micro_layer": {"serial": layer},
    }
