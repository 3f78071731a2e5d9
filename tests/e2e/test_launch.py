"""Launchers (launch/) running the trainer: DeepSpeed vs torchrun, a preset with an override.

* The DeepSpeed launcher, through launch/deepspeed.sh and as the plain `deepspeed --num_gpus 2
  --module lss_megatron.train` users type, runs the trainer on 2 CPU processes with per-step losses
  equal (1e-6) to a torchrun run of the same configuration: the launcher changes nothing.
* tiny-cpu.yaml runs (launch/torchrun.sh), with a command-line override of a preset value visible
  in config.json.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT, clean_env, ok, run_cmd

LAUNCH = ROOT / "launch"
PRESETS = LAUNCH / "presets"
TOL = 1e-6


TRAINER = (
    "--mode lss --seq-parallel 2 --num-layers 2 --hidden-size 32 --num-heads 4 --num-kv-heads 2 "
    "--seq-length 32 --global-batch-size 2 --vocab-size 64 --position-embedding learned --steps 4 "
    "--optimizer sgd --lr 0.5 --seed 7 --dtype fp32 --data synthetic --dist-timeout 60"
).split()


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def deepspeed_bin() -> Path:
    """The `deepspeed` command of this Python's environment (CI: ./.venv), else the one on PATH."""
    here = Path(sys.executable).parent / "deepspeed"
    found = here if here.exists() else shutil.which("deepspeed")
    if found is None:
        pytest.skip("no deepspeed command next to this Python or on PATH (pip install deepspeed)")
    return Path(found)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_deepspeed_matches_torchrun(tmp_path):
    """Same trainer, same configuration, three launches: torchrun, launch/deepspeed.sh and the
    plain `deepspeed --num_gpus 2 --master_port P --module lss_megatron.train`. Per-step losses are
    equal within 1e-6 (they are deterministic, so in practice identical)."""
    ds = deepspeed_bin()
    ref_out, sh_out, ds_out = tmp_path / "torchrun", tmp_path / "ds_sh", tmp_path / "ds_plain"
    ok(
        run_cmd(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "lss_megatron.train",
                *TRAINER,
                "--out",
                ref_out,
            ],
            timeout=150,
        )
    )
    ref = losses(ref_out)
    assert len(ref) == 4

    # the wrapper, with OMP_NUM_THREADS unset: it sets 1 and picks a free port itself
    env = clean_env()
    del env["OMP_NUM_THREADS"]
    res = ok(
        run_cmd(
            ["bash", LAUNCH / "deepspeed.sh", "--num-gpus", "2", "--", *TRAINER, "--out", sh_out],
            timeout=150,
            env=env,
        )
    )
    log = res.stdout + res.stderr
    assert "OMP_NUM_THREADS=1" in res.stderr
    port = re.search(r"--master_port (\d+)", res.stderr)
    assert port and port.group(1) != "29500", res.stderr[-2000:]
    assert "--local_rank=1" in log  # it really went through DeepSpeed's per-process launcher
    # the trainer never calls deepspeed.initialize, so no op is JIT-compiled at launch
    assert "Building extension" not in log and "ninja" not in log

    # the plain command users type, from the repository root
    ok(
        run_cmd(
            [
                ds,
                "--num_gpus",
                "2",
                "--master_port",
                free_port(),
                "--module",
                "lss_megatron.train",
                *TRAINER,
                "--out",
                ds_out,
            ],
            timeout=150,
        )
    )

    for name, out in (("deepspeed.sh", sh_out), ("deepspeed", ds_out)):
        got = losses(out)
        assert len(got) == len(ref), name
        for step, (a, b) in enumerate(zip(got, ref, strict=True), start=1):
            assert abs(a - b) <= TOL, f"{name} vs torchrun, step {step}: {a} vs {b}"
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["parallel"]["world_size"] == 2 and cfg["parallel"]["seq_parallel"] == 2, name
        assert json.loads((out / "summary.json").read_text())["replicas"]["bitwise_equal"], name


@pytest.mark.timeout(150)
@pytest.mark.slow  # ~11 s: a 2-rank trainer launch; presets still load and validate in unit tests
def test_tiny_preset_runs_with_override(tmp_path):
    """launch/torchrun.sh runs tiny-cpu.yaml through --config; `--steps 2` on the command line
    overrides the preset's steps (config.json says 2, metrics has 2 steps), the rest comes from
    the preset."""
    preset = yaml.safe_load((PRESETS / "tiny-cpu.yaml").read_text())
    assert preset["steps"] != 2
    out = tmp_path / "tiny"
    res = ok(
        run_cmd(
            [
                "bash",
                LAUNCH / "torchrun.sh",
                "--nproc-per-node",
                "2",
                "--",
                "--config",
                PRESETS / "tiny-cpu.yaml",
                "--steps",
                "2",
                "--out",
                out,
            ],
            timeout=120,
        )
    )
    assert "--standalone" in res.stderr
    got = losses(out)
    assert len(got) == 2 and all(x == x and 0 < x < 20 for x in got), got
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["train"]["out"] == str(out)
    assert cfg["model"]["hidden_size"] == preset["hidden-size"]
    assert cfg["model"]["seq_length"] == preset["seq-length"]
    assert cfg["parallel"]["mode"] == "lss" and cfg["parallel"]["seq_parallel"] == 2
