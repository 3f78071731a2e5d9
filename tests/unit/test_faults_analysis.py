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
