"""The calibrated CPU time model (analysis/costmodel/calibrated.py) on what the trainer runs
beyond the plain step: selective and full recompute re-run a third of the attention (and, full,
of the GEMM and elementwise) time; ZeRO 1 / 2 price DeepSpeed's own gradient traffic and update
only this rank's partition; a bf16 run on an fp32-only calibration gets no step time and says
why. Device: analysis/fixtures/device-cpu.json (hand-made round numbers)."""

from __future__ import annotations

import json

import pytest

from analysis.costmodel import compare_run, load_device_file, predict
from analysis.costmodel.__main__ import main as costmodel_main
from analysis.costmodel.configs import make_config
from analysis.costmodel.counts import layout_from_config, shape_from_config, zero_counts
from analysis.costmodel.steptime import zero_grad_time, zero_partition
from tests.support import ROOT

DEVICE = ROOT / "analysis" / "fixtures" / "device-cpu.json"
RUN = ROOT / "analysis" / "fixtures" / "run-lss-n2"
MODEL = dict(
    num_layers=2,
    hidden_size=128,
    num_heads=4,
    seq_length=1024,
    global_batch_size=2,
    micro_batch_size=1,
    ffn_hidden_size=256,
)


def _parts(mode="lss", n=2, d=1, **flags) -> dict:
    return predict(make_config(mode, n, d, **{**MODEL, **flags}), load_device_file(DEVICE))


def test_recompute_re_runs_a_third_of_the_forward_work():
    none, sel, full = (
        _parts(recompute=r, attention_kernel="flash") for r in ("none", "selective", "full")
    )
    b = none["time_breakdown_s"]
    assert b["recompute"] == 0
    assert sel["time_breakdown_s"]["recompute"] == pytest.approx(b["attention"] / 3, rel=1e-12)
    redo = (b["attention"] + b["gemm"] + b["elementwise"]) / 3
    assert full["time_breakdown_s"]["recompute"] == pytest.approx(redo, rel=1e-12)
    # the repeated forward K/V gathers are in the sp term, as the counts count them
    assert sel["time_breakdown_s"]["sp_comm_exposed"] > b["sp_comm_exposed"]
    assert none["step_time_s"] < sel["step_time_s"] < full["step_time_s"]
    for p in (none, sel, full):
        assert p["step_time_s"] == pytest.approx(sum(p["time_breakdown_s"].values()), rel=1e-12)


@pytest.mark.parametrize("mode", ["lss", "ulysses"])
def test_zero_prices_its_own_traffic_and_partition(mode):
    plain, z1, z2 = (_parts(mode, zero_stage=z, global_batch_size=4) for z in (0, 1, 2))
    config = make_config(mode, 2, 1, **{**MODEL, "global_batch_size": 4}, zero_stage=2)
    s, lay = shape_from_config(config["model"]), layout_from_config(config)
    dev = load_device_file(DEVICE)
    assert z2["time_breakdown_s"]["grad_comm"] == pytest.approx(zero_grad_time(s, lay, dev))
    # stage 2 reduces after each of the 4 micro-batches, stage 1 once: more traffic, more time
    assert z2["time_breakdown_s"]["grad_comm"] > z1["time_breakdown_s"]["grad_comm"]
    assert z1["time_breakdown_s"]["grad_comm"] > plain["time_breakdown_s"]["grad_comm"]
    # the optimizer updates one partition: half the elements on 2 ranks (padding aside)
    part = zero_partition(s, lay)
    assert z1["time_breakdown_s"]["optimizer"] == pytest.approx(
        plain["time_breakdown_s"]["optimizer"] * part / plain["parameters_per_rank"], rel=1e-12
    )
    # the optimizer state the time model partitions is the one the counts count
    assert 2 * part * 4 + 4 == zero_counts(s, lay, "adamw")["optimizer_state_bytes"]


def test_bf16_on_an_fp32_calibration_has_no_step_time(tmp_path, capsys):
    pred = _parts(dtype="bf16")
    assert pred["step_time_s"] is None and "fp32 rates only" in pred["step_time_note"]
    assert "achieved_flops_per_s" not in pred and pred["activation_bytes"] > 0  # bytes stay
    run = tmp_path / "bf16"
    run.mkdir()
    for name in ("metrics.jsonl", "summary.json"):
        (run / name).write_bytes((RUN / name).read_bytes())
    config = json.loads((RUN / "config.json").read_text())
    config["train"]["dtype"] = "bf16"
    (run / "config.json").write_text(json.dumps(config))
    cmp = compare_run(run, load_device_file(DEVICE))
    assert cmp["step_time_s"][0] is None and "16-bit" in cmp["step_time_note"]
    assert costmodel_main(["--run", str(run), "--device-file", str(DEVICE)]) == 0
    out = capsys.readouterr().out
    assert "step_time_s: not predicted: this calibration" in out and "Traceback" not in out


def test_validation_states_the_prediction_at_the_measured_load():
    """validate.at_load: compute shared among `load` runnable processes instead of the P ranks;
    communication unchanged; at a load below the core count, the plain prediction."""
    from analysis.calibrate.validate import COMPUTE, at_load

    pred = _parts(n=2)  # 2 ranks on the fixture's 2 cores: share 1
    parts = pred["time_breakdown_s"]
    compute = sum(v for k, v in parts.items() if k in COMPUTE)
    assert at_load(pred, 1.0, 2) == pytest.approx(pred["step_time_s"], rel=1e-12)
    assert at_load(pred, 8.0, 2) == pytest.approx(pred["step_time_s"] + 3 * compute, rel=1e-12)


def test_a_calibration_of_another_cpu_is_named(monkeypatch):
    """A device file measured on another CPU model (a VM moved to another host keeps its host
    name) gets one note naming both models; this machine's own gets none."""
    from analysis.costmodel import calibrated

    here = calibrated.cpu_name()
    dev = calibrated.load_device_file(calibrated.DATA_DIR / "vm-2026-12-01.json")
    monkeypatch.setattr(calibrated, "cpu_name", lambda: "AMD EPYC")
    note = calibrated.foreign_cpu_note(dev, "old.json")
    assert note is not None
    assert "old.json was measured on 'Intel(R) Xeon(R) Processor'" in note and "'AMD EPYC'" in note
    monkeypatch.setattr(calibrated, "cpu_name", lambda: dev.name)
    assert calibrated.foreign_cpu_note(dev, "old.json") is None
    assert here  # the real lookup names something
