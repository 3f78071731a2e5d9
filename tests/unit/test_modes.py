"""The mode registry (lss_megatron.modes): every mode one module that declares itself, resolved
lazily by dotted path; config checks, the estimate and the cost model read it without torch; the
cost model's gradient traffic is one plan that bytes and time both read."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from analysis.costmodel import make_config, predict
from analysis.costmodel.counts import (
    MODES as COSTED,
)
from analysis.costmodel.counts import (
    buckets,
    grad_plan,
    layout_from_config,
    mode_of,
    parameters,
    shape_from_config,
)
from analysis.costmodel.hw import get_device
from lss_megatron.modes import MODES, REGISTRY, get_mode
from tests.support import ROOT

SMALL = dict(num_layers=2, hidden_size=64, num_heads=4, seq_length=256, global_batch_size=8)


def test_every_mode_declares_itself_under_its_registered_name():
    assert MODES == ("serial", "lss", "nvidia-sp", "ulysses", "ring")
    for name in COSTED:
        mode = mode_of(name)
        assert mode.name == name and mode.label and mode.colour
    assert len({mode_of(m).colour for m in COSTED}) == len(COSTED)  # one colour per mode
    groups = [None, "context", "tensor", "context", "context"]
    assert [get_mode(m).degree_group for m in MODES] == groups
    with pytest.raises(ValueError, match="unknown mode 'rings'"):
        get_mode("rings")


def test_baselines_are_named_by_path_and_loaded_once():
    """The core names the baselines only by dotted path; they load under one name."""
    assert REGISTRY["nvidia-sp"] == "lss_megatron.baselines.nvidia_sp"
    assert REGISTRY["ulysses"] == "lss_megatron.baselines.ulysses"
    import lss_megatron.baselines.ulysses as ulysses

    assert get_mode("ulysses") is ulysses.MODE
    assert "baselines.ulysses" not in sys.modules  # never imported by its checkout name
    core = "\n".join(p.read_text() for p in (ROOT / "lss_megatron").rglob("*.py"))
    assert not re.search(r"^\s*(from|import)\s+(lss_megatron\.)?baselines", core, re.M)


def test_rules_estimate_and_costs_need_no_torch():
    """Validating every mode, its memory estimate and its cost-model prediction import neither
    torch nor Megatron (a bad command line fails in a fraction of a second)."""
    code = (
        "import sys\n"
        "from lss_megatron.config import ModelConfig, ParallelConfig, RunConfig\n"
        "from lss_megatron.estimate import estimate\n"
        "from analysis.costmodel import make_config, predict\n"
        "for mode, n in (('serial', 1), ('lss', 2), ('nvidia-sp', 2), ('ulysses', 2), ('ring', 2)):\n"
        "    cfg = RunConfig(parallel=ParallelConfig(mode=mode, world_size=n, seq_parallel=n))\n"
        "    assert estimate(cfg.validate()).total > 0\n"
        "    predict(make_config(mode, n, 1, num_layers=2, hidden_size=64, num_heads=4,\n"
        "                        seq_length=256, global_batch_size=8), 'h100')\n"
        "heavy = sorted(m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


def test_mode_name_branches_stay_in_the_mode_modules():
    """The registry's promise: code outside lss_megatron/modes/ asks a mode, it does not branch
    on mode names (issue #19: at most 12; the registry's roles REFERENCE / METHOD / BASELINE
    name the modes that tables and figures compare against)."""
    pattern = re.compile(
        r"""(==|!=|in) *\(?["'](serial|lss|nvidia-sp|ulysses|ring)["']"""
        r"""|["'](serial|lss|nvidia-sp|ulysses|ring)["'] *(==|!=|in)|\.mode *(==|!=|in) """
    )
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for top in ("lss_megatron", "analysis", "baselines")
        for path in (ROOT / top).rglob("*.py")
        if "modes" not in path.relative_to(ROOT).parts[:2]
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert len(hits) <= 12, "\n".join(hits)


def test_counted_traffic_is_the_sum_of_each_modes_plan():
    """sp bytes and calls are the mode's own plan summed, for every mode and recompute."""
    for mode, n in (("lss", 2), ("nvidia-sp", 2), ("ulysses", 2), ("ring", 2)):
        for recompute in ("none", "selective", "full"):
            cfg = make_config(mode, n, 1, recompute=recompute, **SMALL)
            s, lay = shape_from_config(cfg["model"]), layout_from_config(cfg)
            plan = lay.spec.costs.sp_plan(s, lay)
            pred = predict(cfg)
            m = lay.micro_batches
            assert pred["sp_comm_bytes"] == m * sum(c.calls * c.nbytes for c in plan)
            assert pred["sp_comm_calls"] == m * sum(c.calls for c in plan)


@pytest.mark.parametrize("mode", ["lss", "nvidia-sp"])
def test_gradient_time_prices_fp32_gradients_under_bf16_master_weights(mode):
    """Under bf16 (Megatron's bf16 model, fp32 master weights) gradients are reduced in fp32
    (`Layout.grad_elem`), so the time model prices the same bytes the counters' check counts:
    buckets over 4-byte gradients, replicated weights over the gradient group (the TP ranks
    apart), position rows over the data group (N apart). Before the one gradient plan, the GPU
    time model priced 2-byte parameters (half the bytes) while the counts used 4."""
    n, d = 2, 2
    cfg = make_config(mode, n, d, dtype="bf16", **SMALL)
    s, lay = shape_from_config(cfg["model"]), layout_from_config(cfg)
    assert (lay.master_weights, lay.param_bytes, lay.grad_elem) == (True, 2, 4)
    net = get_device("h100").network
    ps = parameters(s, lay)
    tp = n if mode == "nvidia-sp" else 1
    groups = [
        ([p for p in ps if p.tp_partial], tp, 1),
        ([p for p in ps if not p.seq_local], n * d // tp, tp),
        ([p for p in ps if p.seq_local], d, n),
    ]
    fp32 = [
        (x, g, stride)
        for sel, g, stride in groups
        if sel and g > 1
        for x in buckets([p.numel * 4 for p in sel])
    ]
    expected_time = sum(net.time("all_reduce", 2 * (g - 1) * x // g, g, st) for x, g, st in fp32)
    expected_bytes = sum(2 * (g - 1) * x // g for x, g, _ in fp32)
    pred = predict(cfg, "h100")
    assert pred["time_breakdown_s"]["grad_comm"] == pytest.approx(expected_time, rel=1e-12)
    assert pred["grad_comm_bytes"] == expected_bytes
    assert sum(c.calls * c.nbytes for c in grad_plan(s, lay)) == expected_bytes


DEVICE_METHODS = (
    "gemm_rate",
    "attention_rate",
    "attention_fraction",
    "score_time",
    "elementwise_bw",
    "collective_time",
    "share",
    "overhead",
    "precision",
    "report",
)


@pytest.mark.parametrize("mode", ["lss", "nvidia-sp"])
def test_one_step_time_prices_the_plans_on_either_device(mode):
    """A GPU preset (`hw.Device`) and a calibrated CPU offer the same rates, and one step-time
    function prices a mode's plans on either: its activation and gradient collectives at the
    device's own `collective_time`, the optimizer update at `UPDATE_BYTES` over its
    elementwise bandwidth."""
    from analysis.costmodel.calibrated import CalibratedDevice, load_device_file
    from analysis.costmodel.counts import UPDATE_BYTES, param_count, sp_plan
    from analysis.costmodel.hw import Device
    from analysis.costmodel.steptime import step_time

    for cls in (Device, CalibratedDevice):
        assert all(callable(getattr(cls, name)) for name in DEVICE_METHODS), cls
    cpu = load_device_file(ROOT / "analysis" / "fixtures" / "device-cpu.json")
    cfg = make_config(mode, 2, 1, **SMALL)
    s, lay = shape_from_config(cfg["model"]), layout_from_config(cfg)
    for dev in (get_device("h100"), cpu):
        out = step_time(s, lay, dev, "adamw")
        parts = out["time_breakdown_s"]
        assert out["step_time_s"] == pytest.approx(sum(parts.values()), rel=1e-12)

        def priced(plan, dev=dev):
            return sum(c.calls * dev.collective_time(c.op, c.nbytes, c.n, c.stride) for c in plan)

        assert parts["sp_comm_exposed"] == pytest.approx(
            lay.micro_batches * priced(sp_plan(s, lay))
        )
        assert parts["grad_comm"] == pytest.approx(priced(grad_plan(s, lay)))
        update = param_count(s, lay) * UPDATE_BYTES["adamw"] / dev.elementwise_bw(1 << 22)
        assert parts["optimizer"] == pytest.approx(dev.share(lay.world) * update)
        assert parts["sp_comm_exposed"] > 0 and parts["grad_comm"] >= 0
