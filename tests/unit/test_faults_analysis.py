"""Analysis commands on missing, empty or malformed input: exit 2 and one line, never a
traceback; `error_line` finds a failed run's own reason in a launcher's stderr. (A real failed
torchrun launch through analysis.compare: tests/e2e/test_faults_cli.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from analysis import compare, figures
from analysis.costmodel.__main__ import main as costmodel_main
from analysis.inputs import error_line
from tests.support import ROOT, clean_env, error_lines

pytestmark = pytest.mark.faults


FIXTURE = ROOT / "analysis" / "fixtures" / "summary.csv"


def _one_error(capsys, code: int, fragment: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and fragment in lines[0], err
    return lines[0]


# --- analysis.figures -------------------------------------------------------------------------------


def _csv(tmp_path, text: str | bytes):
    path = tmp_path / "summary.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "content,fragment",
    [
        (None, "no summary.csv here"),
        ("", "empty file, no table"),
        ("run_id,status\n", "malformed table, missing columns"),
        ("this is not a table\nat all\n", "malformed table, missing columns"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "summary.csv"),
    ],
)
def test_figures_on_bad_input(tmp_path, capsys, content, fragment):
    if content is not None:
        _csv(tmp_path, content)
    code = figures.main([str(tmp_path), "--out", str(tmp_path / "figs")])
    _one_error(capsys, code, fragment)
    assert not (tmp_path / "figs").exists()


def test_figures_on_a_column_of_text(tmp_path, capsys):
    text = FIXTURE.read_text().replace(",1.0,128.0,", ",fast,128.0,", 1)
    code = figures.main([str(_csv(tmp_path, text)), "--out", str(tmp_path / "f")])
    _one_error(capsys, code, "column 'step_time_s' holds 'fast', not a number")


def test_figures_on_a_table_without_ok_runs(tmp_path, capsys):
    lines = FIXTURE.read_text().splitlines()
    text = "\n".join([lines[0], *(x.replace(",ok,", ",failed,") for x in lines[1:])]) + "\n"
    code = figures.main([str(_csv(tmp_path, text)), "--out", str(tmp_path / "f")])
    _one_error(capsys, code, "no run with status ok")


def test_figures_on_a_missing_path(tmp_path, capsys):
    code = figures.main([str(tmp_path / "nope.csv")])
    _one_error(capsys, code, "no such file or folder")


# --- analysis.costmodel -----------------------------------------------------------------------------
def _costmodel(argv: list[str]) -> int:
    """The CLI's exit status (argparse's error() exits 2 after the usage line and one error)."""
    try:
        return costmodel_main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "setup,fragment",
    [
        ("missing", "no such folder"),
        ("empty", "no config.json, not a trainer run folder"),
        ("bad-json", "not valid JSON"),
        ("no-steps", "metrics.jsonl has no steps"),
        ("wrong-config", "not a usable trainer config"),
    ],
)
def test_costmodel_run_on_bad_folders(tmp_path, capsys, setup, fragment):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "bad-json":
        (run / "config.json").write_text("{oops")
    if setup in ("no-steps", "wrong-config"):
        (run / "config.json").write_text(
            json.dumps({"model": {}} if setup == "wrong-config" else {"x": 1})
        )
        (run / "metrics.jsonl").write_text("" if setup == "no-steps" else '{"step": 1}\n')
    _one_error(capsys, _costmodel(["--run", str(run)]), fragment)


def test_costmodel_config_that_is_not_one(tmp_path, capsys):
    (tmp_path / "c.json").write_text("[1, 2]")
    _one_error(capsys, _costmodel(["--config", str(tmp_path / "c.json")]), "expected a JSON object")
    _one_error(capsys, _costmodel(["--config", str(tmp_path / "none.json")]), "no such file")


def test_costmodel_cli_on_an_empty_folder_is_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "analysis.costmodel", "--run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=clean_env(),
    )
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "python -m analysis.costmodel: error: --run" in res.stderr  # argparse: usage, error


# --- analysis.compare -------------------------------------------------------------------------------
def test_compare_collect_on_a_missing_folder(tmp_path, capsys):
    code = compare.main(["--preset", "smoke", "--collect", "--out", str(tmp_path / "nothing")])
    _one_error(capsys, code, "no runs/ folder there")
    assert not (tmp_path / "nothing").exists()


TORCHRUN_NOISE = """W1201 15:02:32.000000 1 torch/distributed/run.py:803] *****
[rank 1] ERROR lss_megatron.train: rank 1 failed: a collective timed out after 8 s (--dist-timeout): a peer rank is hung or gone
Traceback (most recent call last):
  File "/x/torch/distributed/run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
lss_megatron.train FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
============================================================
"""  # noqa: E501


@pytest.mark.parametrize(
    "stderr,want",
    [
        (
            TORCHRUN_NOISE,
            "[rank 1] ERROR lss_megatron.train: rank 1 failed: a collective timed out",
        ),
        (
            "noise\nlss_megatron.train: error: invalid configuration:\n  - --lr must be a finite "
            "number > 0, got nan\n  - --seed must be in [0, 2**32 - 1], got -1\nmore noise\n",
            "lss_megatron.train: error: invalid configuration: - --lr must be a finite number > 0, got "
            "nan - --seed must be in [0, 2**32 - 1], got -1",
        ),
        (
            "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n",
            "RuntimeError: boom",
        ),
        ("", "(no output on stderr)"),
    ],
)
def test_error_line_finds_the_runs_own_reason(stderr, want):
    assert error_line(stderr).startswith(want), error_line(stderr)


def test_figures_into_an_unwritable_folder_is_one_line(tmp_path, capsys):
    """An output that cannot be written (--out under a regular file) is one line, exit 1."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = figures.main([str(FIXTURE), "--out", str(blocker / "figs")])
    err = capsys.readouterr().err
    assert code == 1 and len(error_lines(err)) == 1 and "Traceback" not in err, err


# --- analysis.compare owns its --out ------------------------------------------------------------
RUN_FIXTURE = ROOT / "analysis" / "fixtures" / "run-lss-n2"
_FAKE_TRAINER = (
    "import shutil, sys\n"
    "open(sys.argv[3], 'a').write(sys.argv[2] + '\\n')\n"
    "shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)\n"
)


@pytest.fixture
def fake_launches(tmp_path, monkeypatch):
    """compare's launches copy a real run's outputs (analysis/fixtures/run-lss-n2) instead of
    training; every launch is logged in the returned file."""
    log = tmp_path / "launches.log"
    log.write_text("")
    monkeypatch.setattr(figures, "make_figures", lambda df, out, *a, **k: [])  # not under test
    monkeypatch.setattr(
        compare,
        "torchrun_command",
        lambda run, out: [
            sys.executable,
            "-c",
            _FAKE_TRAINER,
            str(RUN_FIXTURE),
            str(out),
            str(log),
        ],
    )
    return log


def _launches(log) -> int:
    return len(log.read_text().splitlines())


@pytest.mark.slow  # over ~10 s: the fast tier stays under 5 min
def test_compare_owns_its_out(tmp_path, capsys, fake_launches):
    """A second comparison into one --out is refused (one line, no byte changed); --resume runs
    nothing already complete; --overwrite deletes exactly what outputs.json lists (a file and a
    run folder someone else put there stay)."""
    from tests.support import snapshot

    out = tmp_path / "cmp"
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress"]
    assert compare.main(argv) == 0, capsys.readouterr().err
    n = _launches(fake_launches)
    assert n == 10 and (out / "outputs.json").is_file()
    capsys.readouterr()
    before = snapshot(out)
    _one_error(capsys, compare.main(argv), "already holds the outputs of another comparison")
    assert snapshot(out) == before and _launches(fake_launches) == n

    assert compare.main([*argv, "--resume"]) == 0
    assert _launches(fake_launches) == n, "--resume ran a run that was complete"

    (out / "notes.txt").write_text("mine")
    (out / "runs" / "someone-elses").mkdir()
    capsys.readouterr()
    assert compare.main([*argv, "--overwrite"]) == 0
    assert _launches(fake_launches) == 2 * n
    assert (out / "notes.txt").read_text() == "mine" and (out / "runs" / "someone-elses").is_dir()
    assert not (out / ".lss-megatron.lock").exists(), "the lock is released at the end"


def test_compare_collect_names_a_run_that_does_not_parse(tmp_path, capsys, fake_launches):
    out = tmp_path / "cmp"
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress"]
    assert compare.main(argv) == 0
    runs = sorted((out / "runs").iterdir())
    (runs[0] / "config.json").write_text("[1, 2]")  # valid JSON, not an object
    (runs[1] / "summary.json").write_text("[]")
    (runs[2] / "metrics.jsonl").write_text("[1]\n")
    capsys.readouterr()
    assert compare.main([*argv, "--collect"]) == 3
    text = capsys.readouterr().out
    for r in runs[:3]:
        assert f"failed: {r.name}: unreadable outputs: " in text, text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--timeout", "nan"], "--timeout must be in [1, 604800] seconds, got nan"),
        (["--timeout", "inf"], "--timeout must be in [1, 604800] seconds, got inf"),
        (["--timeout", "0.001"], "--timeout must be in [1, 604800] seconds"),
        (["--repeats", "1000000000"], "--repeats must be in [1, 1000]"),
        (["--overwrite", "--resume"], "--overwrite and --resume exclude each other"),
    ],
)
def test_compare_numbers_and_flags_are_bounded(tmp_path, capsys, argv, fragment):
    try:
        code = compare.main(["--preset", "smoke", "--out", str(tmp_path / "o"), *argv])
    except SystemExit as e:  # argparse's way: usage, the message, exit 2
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


_DRIVER = """
import sys
from analysis import compare
child = (
    "import subprocess, sys, time\\n"
    "g = subprocess.Popen(['sleep', '300'])\\n"
    "open(sys.argv[1], 'w').write(f'{__import__(\\"os\\").getpid()} {g.pid}')\\n"
    "time.sleep(300)\\n"
)
compare.torchrun_command = lambda run, out: [sys.executable, "-c", child, sys.argv[1]]
sys.exit(compare.main(["--preset", "smoke", "--out", sys.argv[2], "--no-progress"]))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_compare_stops_its_children_on_a_signal(tmp_path, sig):
    """Ctrl-C or SIGTERM to analysis.compare: the running launch's whole process group (here a
    child and its grandchild) is stopped and waited for; one line, exit 128 + the signal."""
    import signal
    import time

    import psutil

    pids, out = tmp_path / "pids", tmp_path / "cmp"
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(pids), str(out)],
        cwd=ROOT,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and driver.poll() is None, "the launch never started"
        time.sleep(0.2)
    children = [int(x) for x in pids.read_text().split()]
    driver.send_signal(getattr(signal, sig))
    err = driver.communicate(timeout=60)[1]
    assert driver.returncode == 128 + getattr(signal, sig), err
    assert len(error_lines(err)) == 1 and f"stopped by {sig}" in err and "Traceback" not in err
    for pid in children:
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"{pid} left running"
        except psutil.NoSuchProcess:
            pass
    assert not (out / ".lss-megatron.lock").exists()


# --- analysis.calibrate and its validation: outputs checked before measuring ----------------------
def test_calibrate_checks_its_out_before_measuring(tmp_path, capsys):
    """An --out that cannot be written, or one holding an earlier calibration, is one line and
    exit 2 at once (not after minutes of measuring); nothing is changed."""
    from analysis.calibrate.__main__ import main as calibrate_main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _one_error(
        capsys,
        calibrate_main(["--quick", "--out", str(a_file / "dev.json")]),
        "its folder cannot be written",
    )
    old = tmp_path / "dev.json"
    old.write_text('{"earlier": true}')
    _one_error(
        capsys, calibrate_main(["--quick", "--out", str(old)]), "already holds a calibration"
    )
    assert old.read_text() == '{"earlier": true}'


def test_validate_checks_its_outputs_before_running(tmp_path, capsys):
    from analysis.calibrate.validate import main as validate_main

    dev = ROOT / "analysis" / "data" / "cpu" / "vm.json"
    old = tmp_path / "validation.csv"
    old.write_text("run_id\n")
    argv = ["--device-file", str(dev), "--out", str(old), "--runs-dir", str(tmp_path / "r")]
    _one_error(capsys, validate_main(argv), "already holds a validation table")
    assert old.read_text() == "run_id\n" and not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_figures_budget_is_a_finite_positive_number(tmp_path, capsys, value):
    code = figures.main([str(FIXTURE), "--out", str(tmp_path / "f"), "--budget-gib", value])
    _one_error(capsys, code, "--budget-gib must be a positive, finite number")
    assert not (tmp_path / "f").exists()
