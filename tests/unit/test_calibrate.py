"""The calibrated CPU time model: calibrate's device file, the cost model reading it, the
``step_time_s: predicted X measured Y`` line of ``--run``, and bad device files.

Fixtures: analysis/fixtures/device-cpu.json (hand-made round numbers, not a measurement) and
analysis/fixtures/run-lss-n2 (a real trainer run: lss N 2, 4 layers, E 128, l 512, 6 steps).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.costmodel import compare_run, load_device_file, predict
from analysis.costmodel.__main__ import main as costmodel_main
from analysis.costmodel.calibrated import device_from_dict
from analysis.inputs import InputError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "analysis" / "fixtures"
DEVICE = FIXTURES / "device-cpu.json"
RUN = FIXTURES / "run-lss-n2"


def _numbers(x, where="record"):
    """Every number in a JSON value, with where it sits."""
    if isinstance(x, bool):
        return
    if isinstance(x, int | float):
        yield where, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{where}[{i}]")


@pytest.mark.slow  # over ~10 s: the fast tier stays under 5 min
def test_quick_calibration_writes_a_valid_device_file(tmp_path):
    out = tmp_path / "dev.json"
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "analysis.calibrate", "--quick", "--ranks", "2", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    dev = device_from_dict(data, str(out))  # the schema check the cost model applies
    assert dev.cores >= 1 and set(dev.network.fits["all_gather"]) == {2}
    for key in ("gemm", "attention", "elementwise", "collectives", "concurrency", "overheads"):
        assert data[key], key
    for where, value in _numbers(
        {k: data[k] for k in ("gemm", "attention", "elementwise", "collectives", "concurrency")}
    ):
        assert math.isfinite(value) and value > 0, (where, value)
    for where, value in _numbers(data["overheads"]):
        assert math.isfinite(value) and value >= 0, (where, value)
    assert len(data["load_avg"]) == 2 and data["quick"] is True
    assert elapsed < 60, f"--quick took {elapsed:.1f} s"  # ~10 s idle, more on a loaded machine


def _rate(flops: float) -> float:
    """The fixture's GEMM table, (1e6, 1e10) to (1e9, 4e10), linear in log-log, by hand."""
    f = min(max(flops, 1e6), 1e9)
    return 1e10 * 4 ** (math.log10(f / 1e6) / 3)


def test_cost_model_reads_a_device_file():
    dev = load_device_file(DEVICE)
    config = json.loads((RUN / "config.json").read_text())  # lss N 2, L 4, E 128, F 512, V 256
    pred = predict(config, dev)
    parts = pred["time_breakdown_s"]
    m, tokens = 4, 256  # 4 micro-batches of l/N = 256 tokens
    shapes = [(4, 128, 256), (4, 128, 128), (4, 128, 512), (4, 512, 128), (1, 128, 256)]
    gemm = sum(c * 6.0 * tokens * k * n / _rate(6.0 * tokens * k * n) for c, k, n in shapes)
    assert parts["gemm"] == pytest.approx(m * gemm, rel=1e-12)
    # fixed costs: per micro-batch (lss) 2 ms + 4 layers x 1 ms; per step 1 ms + 4 x 0.1 ms
    assert parts["fixed_overhead"] == pytest.approx(m * (0.002 + 4 * 0.001) + 0.001 + 0.0004)
    assert pred["step_time_s"] == pytest.approx(sum(parts.values()), rel=1e-12)
    # 4 ranks on the fixture's 2 cores: every compute term twice as long, communication not
    config["parallel"]["seq_parallel"], config["parallel"]["world_size"] = 4, 4
    p4 = predict(config, dev)["time_breakdown_s"]
    assert p4["fixed_overhead"] == pytest.approx(2 * parts["fixed_overhead"])


def test_run_prints_predicted_and_measured_step_time(capsys):
    assert costmodel_main(["--run", str(RUN), "--device-file", str(DEVICE)]) == 0
    out = capsys.readouterr().out
    match = re.search(r"^step_time_s: predicted ([0-9.]+) measured ([0-9.]+)", out, re.M)
    assert match, out
    summary = json.loads((RUN / "summary.json").read_text())  # the trainer's own median
    assert float(match.group(2)) == pytest.approx(summary["step_time_s"], abs=5e-5)
    pred = compare_run(RUN, load_device_file(DEVICE))["step_time_s"][0]
    assert float(match.group(1)) == pytest.approx(pred, abs=5e-5)
    assert f"device: {DEVICE} (--device-file)" in out
    assert "sp_comm_bytes" in out  # the byte checks stay


def _bad(tmp_path, change) -> Path:
    data = json.loads(DEVICE.read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d.pop("collectives"), "missing 'collectives'"),
        (lambda d: d["gemm"][0].__setitem__(1, -5), "gemm[0][1]: -5"),
        (
            lambda d: d["collectives"]["all_reduce"].__setitem__("2", [1e-4, float("nan")]),
            "collectives.all_reduce.2[1]: nan",
        ),
        (lambda d: d.update(kind="gpu_check"), "not a calibration file"),
        (lambda d: d["overheads"].pop("per_micro"), "overheads.per_micro: None"),
    ],
)
def test_bad_device_file_is_one_error_exit_2(tmp_path, capsys, change, named):
    path = _bad(tmp_path, change)
    with pytest.raises(SystemExit) as exc:
        costmodel_main(["--run", str(RUN), "--device-file", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([x for x in err if "error" in x]) == 1 and named in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_device_file_that_is_not_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_device_file(path)


def test_attention_rate_comes_from_the_nearest_head_dimension():
    """A dense kernel's rate depends on d (its score traffic per FLOP falls as 1/d): a file with
    a d = 32 table times d = 32 (and d = 64) attention from it, d = 16 and d = 8 from the base."""
    data = json.loads(DEVICE.read_text())
    data["attention"]["dense_d32"] = [[1e6, 2e10]]  # 4x the base table's 5e9
    dev = device_from_dict(data, "test")
    assert dev.attention_rate("materialized", 1e8, 32) == 2e10
    assert dev.attention_rate("materialized", 1e8, 64) == 2e10  # nearest measured d
    assert dev.attention_rate("materialized", 1e8, 16) == 5e9
    assert dev.attention_rate("materialized", 1e8, 8) == 5e9
    assert dev.attention_rate("flash", 1e8, 32) == 1e10  # no flash_d32: the base table
    data["attention"]["dense_dx"] = [[1e6, 1e10]]  # not a table name: left out
    assert "dense_dx" not in device_from_dict(data, "test").attention


def test_default_device_file_is_user_writable_when_installed(tmp_path, monkeypatch):
    """In a checkout calibrate writes analysis/data/cpu/<host>.json; installed (no checkout:
    `source_root` is None), it writes under the user's data folder, never into site-packages,
    and the cost model finds it there first."""
    from analysis.calibrate.__main__ import build_parser
    from analysis.costmodel import calibrated

    assert calibrated.writable_dir() == calibrated.DATA_DIR  # this checkout
    monkeypatch.setattr(calibrated, "source_root", lambda: None)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    home = tmp_path / "lss-megatron" / "cpu"
    assert calibrated.writable_dir() == home
    assert calibrated.default_path().parent == home
    assert str(home) in build_parser().format_help().replace("\n", "").replace(" ", "")
    calibrated.default_path().parent.mkdir(parents=True)
    calibrated.default_path().write_text("{}")
    assert calibrated.find_device_file() == calibrated.default_path()


def test_overhead_runs_launch_as_compare_launches(tmp_path, monkeypatch):
    """The calibration's tiny runs are spelled by analysis.compare's own launch builder
    (`RunSpec`, `compare.torchrun_command`): the trainer accepts them as the run asked for."""
    from analysis import compare
    from analysis.calibrate import overheads
    from analysis.trainer_config import problems, run_config

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "summary.json").write_text('{"step_time_s": 0.5}')
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(overheads.subprocess, "run", fake_run)
    assert overheads._run("lss", 2, 5, 6, tmp_path)["measured"] == 0.5
    (cmd,) = seen
    i = cmd.index("lss_megatron.train") + 1
    assert cmd[:i] == compare.launch_command(2, [])
    assert cmd[cmd.index("--out") + 1] == str(tmp_path)
    cfg = run_config(cmd[i:], 2)
    assert problems(cfg) == []
    assert (cfg.parallel.mode, cfg.parallel.seq_parallel, cfg.model.num_layers) == ("lss", 2, 5)
    assert (cfg.train.global_batch_size, cfg.model.hidden_size, cfg.train.steps) == (6, 32, 6)
