"""Bad input is refused up front: one message naming the value, exit 2, printed once, before any
process group; nothing on disk changes.

Covers: non-finite and out-of-range numbers (lr, min-lr, dist-timeout, seed, sizes), strict YAML
types, the launcher's environment variables, ``--out ""``, and "one message, once" under torchrun
and the launch scripts (which validate before starting ranks).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import yaml
from faults_utils import ROOT, TINY, env_without_launcher, error_lines, snapshot, train

from lss_megatron.config import ConfigError, RunConfig
from lss_megatron.envvars import launch_env
from lss_megatron.train import build_parser, config_from_args, parse_args, preflight

pytestmark = pytest.mark.faults


def _problems(argv: list[str], world: int = 1) -> str:
    cfg = config_from_args(parse_args(argv), world)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return str(e.value)


# --- numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragment", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1"),
    (["--min-lr", "nan"], "--min-lr must be finite, got nan"),
    (["--min-lr", "1"], "--min-lr 1.0 must be in [0, --lr 0.001]"),
    (["--dist-timeout", "nan"], "--dist-timeout must be in (0, 604800] seconds"),
    (["--dist-timeout", "inf"], "--dist-timeout must be in (0, 604800] seconds"),
    (["--dist-timeout", "0"], "--dist-timeout must be in (0, 604800] seconds"),
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    (["--seed", str(2**32)], f"--seed must be in [0, 2**32 - 1], got {2**32}"),
    (["--weight-decay", "nan"], "--weight-decay must be finite, got nan"),
    (["--clip-grad", "inf"], "--clip-grad must be finite, got inf"),
    (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
    (["--max-consecutive-skips", "0"], "--max-consecutive-skips must be >= 1, got 0"),
    (["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
    (["--seq-length", "-4"], "--seq-length must be >= 1, got -4"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
])  # fmt: skip
def test_nonfinite_and_out_of_range_numbers_are_refused(argv, fragment):
    assert fragment in _problems(argv)


def test_every_problem_is_named_at_once():
    msg = _problems(["--lr", "nan", "--seed", "-1", "--dist-timeout", "inf"])
    assert msg.count("\n  - ") == 3, msg


# --- strict YAML ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,fragment", [
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
])  # fmt: skip
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
@pytest.mark.parametrize("env,fragment", [
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
    ({"OMP_NUM_THREADS": "abc"}, "environment variable OMP_NUM_THREADS='abc' is not an integer"),
    ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0' must be >= 1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be < WORLD_SIZE"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999' must be in [1, 65535]"),
    ({"LOCAL_WORLD_SIZE": "-1"}, "LOCAL_WORLD_SIZE='-1' must be >= 1"),
])  # fmt: skip
def test_environment_variables_are_parsed_with_clear_errors(env, fragment):
    _, problems = launch_env(env)
    assert any(fragment in p for p in problems), problems


def test_environment_defaults():
    env, problems = launch_env({})
    assert problems == [] and (env.world_size, env.rank, env.launched) == (1, 0, False)
    env, _ = launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_WORLD_SIZE": "2"})
    assert (env.world_size, env.rank, env.local_world_size, env.launched) == (4, 3, 2, True)


def test_bad_environment_on_the_command_line(tmp_path):
    """A user's shell, not a launcher: WORLD_SIZE=two and OMP_NUM_THREADS=abc are one clear
    message, exit 2, no traceback, fast (nothing heavy is imported)."""
    t0 = time.monotonic()
    res = train([*TINY, "--out", tmp_path / "o"],
                env=env_without_launcher(WORLD_SIZE="two", OMP_NUM_THREADS="abc"))  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "WORLD_SIZE='two'" in res.stderr and "OMP_NUM_THREADS='abc'" in res.stderr
    assert len(error_lines(res.stderr)) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    assert time.monotonic() - t0 < 60


# --- --out "" and friends ------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--out", "--save", "--load"])
def test_empty_folder_names_are_refused(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args([flag, ""])
    with pytest.raises(ConfigError) as e:
        preflight(args, *launch_env({}))
    assert f"{flag} must name a folder, got ''" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refusal_changes_nothing_and_is_one_message(tmp_path):
    """Bad values on the command line: exit 2, every problem in one message, no traceback, and
    the folders named are not created."""
    out, save = tmp_path / "out", tmp_path / "ckpt"
    res = train([*TINY, "--lr", "nan", "--dist-timeout", "nan", "--seed", "-1", "--out", out,
                 "--save", save])  # fmt: skip
    assert res.returncode == 2
    assert "--lr must be a finite number" in res.stderr and "--dist-timeout" in res.stderr
    assert len(error_lines(res.stderr)) == 1 and "Traceback" not in res.stderr, res.stderr
    assert not out.exists() and not save.exists()


# --- one message, once ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_config_error_is_printed_by_one_rank(tmp_path):
    """Raw torchrun, 2 ranks, a bad --lr: every rank refuses, rank 0 alone says why."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lss_megatron.train", *TINY[2:], "--mode", "lss", "--lr", "inf",
           "--out", str(tmp_path / "o")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT,
                         env=env_without_launcher())  # fmt: skip
    assert res.returncode != 0
    assert res.stderr.count("--lr must be a finite number > 0, got inf") == 1, res.stderr[-3000:]
    # torchrun reports the failed children with its own traceback; none is from the trainer
    assert f'File "{ROOT / "lss_megatron"}' not in res.stderr, res.stderr[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script,opts", [("torchrun.sh", ["--nproc-per-node", "2"]),
                                         ("deepspeed.sh", ["--num-gpus", "2"])])  # fmt: skip
def test_launch_scripts_validate_once_before_starting_ranks(tmp_path, script, opts):
    """launch/*.sh check the configuration once: exit 2, one message, no rank ever started."""
    env = env_without_launcher()
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "launch" / script), *opts, "--", *TINY[2:], "--mode",
                          "lss", "--seq-length", "33", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=100, env=env)  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("--seq-length 33 is not divisible by --seq-parallel 2") == 1
    assert len(error_lines(res.stderr)) == 1, res.stderr
    assert "[rank" not in res.stderr, res.stderr  # no rank was started
    assert time.monotonic() - t0 < 90


def test_validate_only_names_the_estimate(tmp_path):
    res = train([*TINY, "--out", tmp_path / "o", "--validate-only"])
    assert res.returncode == 0, res.stderr
    assert "valid: --mode serial, P = 1" in res.stdout and "per-rank memory estimate" in res.stdout
    assert not (tmp_path / "o").exists()


def test_yaml_on_the_command_line_is_one_message_exit_2(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("no-causal: 'false'\nsteps: 4.7\n")
    res = train(["--config", path, "--out", tmp_path / "o"])
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert "no-causal: 'false' (str) is not a boolean" in res.stderr
    assert snapshot(tmp_path) == {"p.yaml": snapshot(tmp_path)["p.yaml"]}


def test_finite_checks_leave_good_values_alone():
    cfg = RunConfig()
    assert cfg.validate() is cfg and math.isfinite(cfg.train.lr)


@pytest.mark.timeout(120)
def test_slurm_batch_validates_before_srun(tmp_path):
    """launch/slurm.sbatch checks the configuration once before `srun` starts any task (a stub
    srun records whether it was called)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path}/srun_called\n")
    (bin_ / "srun").chmod(0o755)
    env = env_without_launcher(
        PATH=f"{bin_}:{env_without_launcher()['PATH']}", PYTHON=sys.executable,
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node01", SLURM_NTASKS="8",
        SLURM_NTASKS_PER_NODE="4", SLURM_SUBMIT_DIR=str(ROOT), MASTER_ADDR="node01")
    res = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--lr", "nan", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=100,
                         env=env)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("--lr must be a finite number > 0, got nan") == 1, res.stderr
    assert not (tmp_path / "srun_called").exists()
