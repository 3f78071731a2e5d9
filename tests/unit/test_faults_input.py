"""Bad input is refused up front, in process: non-finite and out-of-range numbers, strict YAML
types, the launcher's environment variables, empty folder names. (The command line as a user
types it, torchrun and the launch scripts: tests/e2e/test_faults_cli.py.)"""

from __future__ import annotations

import math

import pytest
import yaml

from lss_megatron.config import ConfigError, RunConfig
from lss_megatron.envvars import launch_env
from lss_megatron.train import build_parser, config_from_args, parse_args, preflight
from tests.support import ROOT, error_lines

pytestmark = pytest.mark.faults


def _problems(argv: list[str], world: int = 1) -> str:
    cfg = config_from_args(parse_args(argv), world)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return str(e.value)


# --- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1"),
        (["--min-lr", "nan"], "--min-lr must be finite, got nan"),
        (["--min-lr", "1"], "--min-lr 1.0 must be in [0, --lr 0.001]"),
        (["--dist-timeout", "nan"], "--dist-timeout must be in [1, 604800] seconds"),
        (["--dist-timeout", "inf"], "--dist-timeout must be in [1, 604800] seconds"),
        (["--dist-timeout", "0"], "--dist-timeout must be in [1, 604800] seconds"),
        (["--dist-timeout", "1e-9"], "--dist-timeout must be in [1, 604800] seconds"),
        (["--steps", str(10**15)], "--steps must be <= 1,000,000,000"),
        (["--eval-steps", str(10**12)], "--eval-steps must be <= 1,000,000"),
        (
            ["--global-batch-size", str(10**14), "--micro-batch-size", "1"],
            "micro-batches per step and replica, more than 65,536",
        ),
        (
            ["--position-embedding", "rope", "--hidden-size", "30", "--num-heads", "2"],
            "--position-embedding rope needs an even head dimension",
        ),
        (["--fault", "crash:1:1"], "--fault crash:1:1: rank 1 is not in this run of P = 1"),
        (["--fault", "nan:0:11"], "--fault nan:0:11: step 11 is outside this run's steps 1..10"),
        (
            ["--fault", "hang:0:5", "--stop-after", "4"],
            "--fault hang:0:5: step 5 is outside this run's steps 1..4",
        ),
        (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
        (["--seed", str(2**32)], f"--seed must be in [0, 2**32 - 1], got {2**32}"),
        (["--weight-decay", "nan"], "--weight-decay must be finite, got nan"),
        (["--clip-grad", "inf"], "--clip-grad must be finite, got inf"),
        (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
        (["--max-consecutive-skips", "0"], "--max-consecutive-skips must be >= 1, got 0"),
        (["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
        (["--seq-length", "-4"], "--seq-length must be >= 1, got -4"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
    ],
)
def test_nonfinite_and_out_of_range_numbers_are_refused(argv, fragment):
    assert fragment in _problems(argv)


def test_every_problem_is_named_at_once():
    msg = _problems(["--lr", "nan", "--seed", "-1", "--dist-timeout", "inf"])
    assert msg.count("\n  - ") == 3, msg


# --- strict YAML ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("no-causal: 'false'", "no-causal: 'false' (str) is not a boolean"),
        ("skip-nonfinite: yes please", "skip-nonfinite: 'yes please' (str) is not a boolean"),
        ("steps: 4.7", "steps: 4.7 (float) is not an integer"),
        ("steps: '4'", "steps: '4' (str) is not an integer"),
        ("steps: true", "steps: True (bool) is a boolean; expected an integer"),
        ("seq-length: sixty", "seq-length: 'sixty' (str) is not an integer"),
        ("lr: fast", "lr: 'fast' (str) is not a number"),
        ("steps:", "steps: empty value; expected an integer"),
        ("mode: 3", "mode: 3 (int) is not a string; expected one of"),
        ("mode: lsss", "mode: 'lsss' is not one of"),
        ("out: [a, b]", "out: ['a', 'b'] (list) is not a string"),
        ("bogus: 1", "unknown keys ['bogus']"),
    ],
)
def test_yaml_values_keep_their_type(tmp_path, capsys, text, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert len(error_lines(err)) == 1, err


def test_yaml_problems_come_in_one_message(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("steps: 4.7\nno-causal: 'false'\nwhat: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "steps: 4.7" in err and "no-causal" in err, err
    assert "unknown keys ['what']" in err


def _bomb(levels: int, width: int = 9) -> str:
    """Nested aliases: `width` ** `levels` values from a few hundred bytes."""
    lines = [f"a0: &a0 [{', '.join(['1'] * width)}]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nsteps: *a{levels}\n"


def _make_config(tmp_path, kind: str):
    import os

    path = tmp_path / f"{kind}.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "nul":
        path.write_bytes(b"steps: 3\n\x00\n")
    elif kind == "duplicate":
        path.write_text("steps: 3\nlr: 1e-3\nsteps: 4\n")
    elif kind == "bomb":
        path.write_text(_bomb(9))  # 9**10 values: hours to expand, bytes to write
    elif kind == "huge":
        path.write_text("# padding\n" * 200_000)
    return path


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("fifo", "is a FIFO, not a YAML file"),  # reading it would block forever
        ("folder", "is a folder, not a YAML file"),
        ("binary", "not a text file (not UTF-8: binary?)"),
        ("nul", "not a text file (NUL bytes: binary?)"),
        ("duplicate", "key 'steps' given twice (lines 1 and 3)"),
        ("bomb", "expands to more than 100,000 values through nested aliases"),
        ("huge", "more than a preset (1,048,576)"),
    ],
)
def test_yaml_files_that_are_not_presets(tmp_path, capsys, kind, fragment):
    """One line, exit 2, within seconds, whatever --config names."""
    import time

    path = _make_config(tmp_path, kind)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(error_lines(err)) == 1 and fragment in err, err
    assert "Traceback" not in err and time.monotonic() - t0 < 10


def test_a_nested_alias_value_is_named_short(tmp_path, capsys):
    """A nested-alias value under the bomb limit (9**4 values) is refused as the wrong type, and
    the message shows it abbreviated, never expanded."""
    path = tmp_path / "p.yaml"
    path.write_text(_bomb(3))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error:" in x][0]
    assert "steps: [[[" in line and "...]" in line and len(line) < 400, line


def test_yaml_good_values_are_taken_as_typed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("no-causal: true\nsteps: 4\nlr: 1e-3\nclip-grad: 1\nnum-kv-heads:\n")
    args = parse_args(["--config", str(path)])
    assert args.no_causal is True and args.steps == 4 and args.num_kv_heads is None
    assert args.lr == 1e-3 and isinstance(args.clip_grad, float)
    cfg = config_from_args(args, 1).validate()
    assert cfg.model.causal is False  # `no-causal: true` turns causal attention off, only that


def test_presets_still_load_strictly():
    """Every shipped preset passes the strict YAML check (their values are typed right)."""
    for path in sorted((ROOT / "launch" / "presets").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        known = {a.dest for a in build_parser()._actions}
        if all(str(k).replace("-", "_") in known for k in data):
            parse_args(["--config", str(path)])


# --- environment variables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
        (
            {"OMP_NUM_THREADS": "abc"},
            "environment variable OMP_NUM_THREADS='abc' is not an integer",
        ),
        ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0' must be >= 1"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be < WORLD_SIZE"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999' must be in [1, 65535]"),
        ({"LOCAL_WORLD_SIZE": "-1"}, "LOCAL_WORLD_SIZE='-1' must be >= 1"),
    ],
)
def test_environment_variables_are_parsed_with_clear_errors(env, fragment):
    _, problems = launch_env(env)
    assert any(fragment in p for p in problems), problems


def test_environment_defaults():
    env, problems = launch_env({})
    assert problems == [] and (env.world_size, env.rank, env.launched) == (1, 0, False)
    env, _ = launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_WORLD_SIZE": "2"})
    assert (env.world_size, env.rank, env.local_world_size, env.launched) == (4, 3, 2, True)


# --- --out "" and friends ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--out", "--save", "--load"])
def test_empty_folder_names_are_refused(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args([flag, ""])
    with pytest.raises(ConfigError) as e:
        preflight(args, *launch_env({}))
    assert f"{flag} must name a folder, got ''" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_finite_checks_leave_good_values_alone():
    cfg = RunConfig()
    assert cfg.validate() is cfg and math.isfinite(cfg.train.lr)


def test_new_switches_default_to_the_safe_side():
    """--no-memory-check and --overwrite are opt-in: by default the memory check runs and another
    run's folders are refused."""
    cfg = config_from_args(parse_args([]), 1)
    assert cfg.train.memory_check is True and cfg.train.overwrite is False
    cfg = config_from_args(parse_args(["--no-memory-check", "--overwrite"]), 1)
    assert cfg.train.memory_check is False and cfg.train.overwrite is True
