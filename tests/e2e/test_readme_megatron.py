"""The README's Megatron-LM-style command runs as written (issue #25): its flags parse to the
configuration our own names give (fast), and the command itself trains on 4 ranks into a fresh
runs/<date-time>-lss folder (slow)."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest

from tests.support import ROOT, clean_env, run_cmd


def _readme_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- megatron-style-command -->", 1)[1]
    body = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    return shlex.split(body.replace("\\\n", " "))


def test_the_readme_command_means_our_flags():
    from lss_megatron.train import config_from_argv

    argv = _readme_command()
    assert argv[:2] == [".venv/bin/torchrun", "--standalone"] and "lss_megatron.train" in argv
    trainer = argv[argv.index("lss_megatron.train") + 1 :]
    ours = (
        "--mode lss --seq-parallel 4 --num-layers 2 --hidden-size 64 --num-heads 4 "
        "--num-kv-heads 2 --seq-length 256 --position-embedding rope --micro-batch-size 2 "
        "--global-batch-size 2 --steps 4 --lr 1e-3 --lr-schedule cosine --warmup-steps 1 "
        "--log-interval 2 --eval-interval 4 --eval-steps 1 --seed 1234"
    ).split()
    out = ["--out", "/tmp/unused-out"]
    assert config_from_argv(trainer + out, 4) == config_from_argv(ours + out, 4)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_readme_command_runs_as_written(tmp_path):
    argv = _readme_command()
    trainer = argv[argv.index("--standalone") :]
    cmd = [sys.executable, "-m", "torch.distributed.run", *trainer]
    res = run_cmd(cmd, 360, env=clean_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-lss", out.name), out.name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert str(out) in res.stderr  # named at the start and the end
    assert "------------------------ arguments ------------------------" in res.stderr
