"""Launchers and presets (launch/) without running the trainer: presets, scripts, schedulers.

* Every preset in launch/presets parses and validates for the process count its
  `# processes: P` comment names (the trainer's own parser, no process group).
* The shell scripts parse, print their usage and build the right commands (dry runs).
* slurm.sbatch and summit_jsrun.sh, run by bash against stub `srun`/`jsrun`/`scontrol` and a stub
  Python, hand each task the RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT it needs;
  env_from_scheduler.sh maps SLURM, jsrun/Spectrum MPI and LSF variables to them.

Real launches (DeepSpeed vs torchrun, a preset run): tests/e2e/test_launch.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT, clean_env, ok, run_cmd

LAUNCH = ROOT / "launch"
PRESETS = LAUNCH / "presets"


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

PRESET_FILES = sorted(PRESETS.glob("*.yaml"))


def preset_processes(path: Path) -> int:
    m = re.search(r"^# processes: (\d+)\s*$", path.read_text(), re.M)
    assert m, f"{path.name}: needs a '# processes: P' comment (the world size it is made for)"
    return int(m.group(1))


def test_expected_presets_exist():
    names = {p.name for p in PRESET_FILES}
    want = {
        "tiny-cpu.yaml",
        "small-cpu-lss.yaml",
        "small-cpu-nvidia-sp.yaml",
        "paper-enwik8-144gpu.yaml",
        "paper-enwik8-3456gpu.yaml",
    }
    assert want <= names, want - names


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
def test_preset_validates(path, tmp_path):
    """Load the preset through the trainer's own parse_args / config_from_args with the world size
    it is made for, then validate (no process group, nothing runs). The 144-GPU preset exists to
    compare against the nvidia-sp baseline: both modes must validate at its documented N = 2
    fallback, and nvidia-sp at its own N = 6 (vocabulary padded to 768 in both modes).
    The enwik8 file is not here: should validation insist on it, a stand-in file is passed."""
    from lss_megatron.config import ConfigError
    from lss_megatron.train import build_parser, config_from_args, parse_args

    def validated(argv, world):
        cfg = config_from_args(parse_args(argv), world)
        try:
            return cfg.validate()
        except ConfigError as e:
            problems = [x for x in str(e).splitlines()[1:] if x.strip()]
            if not (cluster and problems and all("--data-path" in x for x in problems)):
                raise
        stand_in = tmp_path / "enwik8"
        with stand_in.open("wb") as f:
            f.truncate(100_000_000)  # enwik8's size, sparse: nothing is read at validation
        return config_from_args(parse_args([*argv, "--data-path", str(stand_in)]), world).validate()

    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, path.name
    known = {a.dest for a in build_parser()._actions}
    missing = [k for k in data if str(k).replace("-", "_") not in known]
    cluster = path.name.startswith("paper-")
    if cluster:
        assert "CLUSTER PRESET" in path.read_text(), f"{path.name}: mark it as a cluster preset"
        if missing:
            pytest.skip(f"{path.name} uses flags the trainer does not have yet: {missing}")
    else:
        assert not missing, f"{path.name}: unknown flags {missing}"
        assert data.get("data", "synthetic") == "synthetic", "CPU presets need no data files"
    world = preset_processes(path)
    cfg = validated(["--config", str(path)], world)
    assert cfg.parallel.mode == data["mode"] and cfg.parallel.world_size == world
    assert cfg.parallel.seq_parallel * cfg.parallel.dp == world
    assert cfg.model.seq_length % cfg.parallel.seq_parallel == 0
    if path.name == "paper-enwik8-3456gpu.yaml":
        assert cfg.model.seq_length == 50112 and world == 3456
    if path.name != "paper-enwik8-144gpu.yaml":
        return
    assert world == 144 and cfg.parallel.seq_parallel == 6  # 24 Summit nodes x 6 GPUs
    # the baseline on the same preset: at N = 2 (the preset's documented alternative)
    for mode in ("lss", "nvidia-sp"):
        small = validated(
            [
                "--config",
                str(path),
                "--mode",
                mode,
                "--seq-parallel",
                "2",
                "--data-parallel",
                "72",
                "--global-batch-size",
                "72",
            ],
            world,
        )
        assert small.parallel.mode == mode and small.parallel.seq_parallel == 2
    # and at the preset's own N = 6 (the vocabulary is padded to 768 in both modes)
    base = validated(["--config", str(path), "--mode", "nvidia-sp"], world)
    assert base.parallel.seq_parallel == 6 and base.model.padded_vocab_size == 768


def test_small_presets_differ_only_in_mode():
    """small-cpu-lss and small-cpu-nvidia-sp are the same run in the two modes."""
    a = yaml.safe_load((PRESETS / "small-cpu-lss.yaml").read_text())
    b = yaml.safe_load((PRESETS / "small-cpu-nvidia-sp.yaml").read_text())
    assert (a["mode"], b["mode"]) == ("lss", "nvidia-sp")
    assert a["out"] != b["out"]
    drop = ("mode", "out")
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }


# ---------------------------------------------------------------------------------------------
# shell scripts: syntax, argument handling (dry runs)
# ---------------------------------------------------------------------------------------------

SCRIPTS = sorted([*LAUNCH.glob("*.sh"), LAUNCH / "slurm.sbatch"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_syntax(script):
    res = run_cmd(["bash", "-n", script], timeout=20)
    assert res.returncode == 0, res.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "script,flag", [("deepspeed.sh", "--num-gpus"), ("torchrun.sh", "--nproc-per-node")]
)
def test_usage(script, flag):
    res = ok(run_cmd(["bash", LAUNCH / script, "-h"], timeout=20))
    assert flag in res.stdout and "-- TRAINER ARGS" in res.stdout


@pytest.mark.timeout(60)
def test_deepspeed_sh_options():
    """Dry runs: OMP_NUM_THREADS default and user value, a free port (not DeepSpeed's 29500),
    LOCAL_SIZE for --include on CPU, DeepSpeed-spelled options passed through, explicit port
    kept, trainer flags before -- refused."""
    sh = LAUNCH / "deepspeed.sh"
    env = clean_env()
    del env["OMP_NUM_THREADS"]
    env.pop("LOCAL_SIZE", None)
    res = ok(run_cmd(["bash", sh, "--num-gpus", "2", "--dry-run", "--", "--mode", "lss"], 30, env))
    assert "OMP_NUM_THREADS=1" in res.stderr and "LOCAL_SIZE" not in res.stderr
    m = re.search(
        r"-m deepspeed\.launcher\.runner --num_gpus 2 --master_port (\d+) --module "
        r"lss_megatron\.train --mode lss$",
        res.stderr,
        re.M,
    )
    assert m and m.group(1) != "29500", res.stderr

    res = ok(
        run_cmd(
            [
                "bash",
                sh,
                "--include",
                "localhost:0,3",
                "--master-port",
                "29777",
                "--bind_cores_to_rank",
                "--dry-run",
                "--",
                "--steps",
                "1",
            ],
            30,
            {**env, "OMP_NUM_THREADS": "3"},
        )
    )
    assert "OMP_NUM_THREADS=3" in res.stderr and "LOCAL_SIZE=4" in res.stderr
    assert "--master_port 29777 --bind_cores_to_rank --module lss_megatron.train --steps 1" in (
        res.stderr
    )

    bad = run_cmd(["bash", sh, "--num-gpus", "2", "--mode", "lss"], 30, env)
    assert bad.returncode == 2 and "after --" in bad.stderr
    bad = run_cmd(["bash", sh, "--num-gpus", "2", "--include", "localhost:0", "--dry-run"], 30, env)
    assert bad.returncode == 2 and "exclude each other" in bad.stderr


@pytest.mark.timeout(30)
def test_torchrun_sh_options():
    sh = LAUNCH / "torchrun.sh"
    res = ok(run_cmd(["bash", sh, "--nproc-per-node", "4", "--dry-run", "--", "--steps", "1"], 20))
    assert (
        "torch.distributed.run --nproc-per-node 4 --standalone -m lss_megatron.train --steps 1"
        in (res.stderr)
    )
    res = ok(
        run_cmd(
            [
                "bash",
                sh,
                "--nproc-per-node",
                "6",
                "--nnodes",
                "24",
                "--node-rank",
                "3",
                "--rdzv-endpoint",
                "h41n01:29400",
                "--max-restarts=0",
                "--dry-run",
                "--",
            ],
            20,
        )
    )
    assert (
        "--nnodes 24 --node-rank 3 --master-addr h41n01 --master-port 29400 --max-restarts=0"
        " -m lss_megatron.train"
    ) in res.stderr
    res = ok(
        run_cmd(
            [
                "bash",
                sh,
                "--nproc-per-node",
                "6",
                "--nnodes",
                "2",
                "--rdzv-endpoint",
                "h41n01:29400",
                "--dry-run",
                "--",
            ],
            20,
        )
    )
    assert "--rdzv-backend c10d --rdzv-endpoint h41n01:29400 --rdzv-id lss-megatron" in res.stderr
    bad = run_cmd(["bash", sh, "--nproc-per-node", "2", "--nnodes", "2", "--dry-run", "--"], 20)
    assert bad.returncode == 2 and "--rdzv-endpoint" in bad.stderr
    bad = run_cmd(["bash", sh, "--dry-run", "--"], 20)
    assert bad.returncode == 2 and "--nproc-per-node" in bad.stderr


# ---------------------------------------------------------------------------------------------
# schedulers: env_from_scheduler.sh, slurm.sbatch and summit_jsrun.sh against stubs
# ---------------------------------------------------------------------------------------------


def write_stub(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path):
    """A bin/ with fake scontrol, srun and jsrun, and a fake Python that records its task."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    write_stub(
        bin_ / "scontrol",
        """
        import sys
        assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
        assert sys.argv[3] == "node[01-02]", sys.argv
        print("node01\\nnode02")
    """,
    )
    # srun: skip its options (--opt=value forms), start SLURM_NTASKS tasks of the command,
    # SLURM_NTASKS_PER_NODE per node, each with its own SLURM_PROCID / SLURM_LOCALID
    write_stub(
        bin_ / "srun",
        """
        import os, subprocess, sys
        args = sys.argv[1:]
        opts = []
        while args[0].startswith("-"):
            opts.append(args.pop(0))
        open(os.environ["STUB_OUT"] + "/srun_args", "w").write(" ".join(opts))
        n, per = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
        for i in range(n):
            env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per),
                       SLURM_NODEID=str(i // per), SLURM_STEP_ID="0")
            subprocess.run(args, env=env, check=True, timeout=60)
    """,
    )
    # jsrun: -n resource sets x -a tasks each; Spectrum MPI's per-rank variables
    write_stub(
        bin_ / "jsrun",
        """
        import os, subprocess, sys
        args = sys.argv[1:]
        opts, vals = [], {}
        while args[0].startswith("-"):
            a = args.pop(0)
            opts.append(a)
            if "=" not in a:
                vals[a] = args.pop(0)
                opts.append(vals[a])
        open(os.environ["STUB_OUT"] + "/jsrun_args", "w").write(" ".join(opts))
        nrs, per_rs = int(vals["-n"]), int(vals["-a"])
        n = nrs * per_rs
        for i in range(n):
            env = dict(os.environ, OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_SIZE=str(n),
                       OMPI_COMM_WORLD_LOCAL_RANK=str(i % per_rs), JSM_NAMESPACE_RANK=str(i),
                       JSM_NAMESPACE_SIZE=str(n), JSM_NAMESPACE_LOCAL_RANK=str(i % per_rs),
                       PMIX_RANK=str(i))
            subprocess.run(args, env=env, check=True, timeout=60)
    """,
    )
    py = write_stub(
        bin_ / "fake_python",
        """
        import json, os, sys
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS", "PYTHONPATH")
        rec = {k: os.environ.get(k) for k in keys}
        rec["argv"] = sys.argv[1:]
        rec["cwd"] = os.getcwd()
        out = os.environ["STUB_OUT"] + "/rank%s.json" % os.environ["RANK"]
        open(out, "w").write(json.dumps(rec))
    """,
    )
    out = tmp_path / "out"
    out.mkdir()
    env = clean_env(
        PATH=f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=str(py), STUB_OUT=str(out)
    )
    del env["OMP_NUM_THREADS"]
    return {"env": env, "out": out, "python": str(py), "dir": tmp_path}


def printed_env(res) -> dict[str, str]:
    ok(res)
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


@pytest.mark.timeout(60)
def test_env_helper_slurm(stubs):
    """SLURM_PROCID=3 SLURM_NTASKS=8 SLURM_LOCALID=1 -> RANK 3, WORLD_SIZE 8, LOCAL_RANK 1, the
    first host of the node list, a port derived from the job id; executed and sourced."""
    env = {
        **stubs["env"],
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_JOB_ID": "123456",
    }
    want = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    helper = LAUNCH / "env_from_scheduler.sh"
    assert printed_env(run_cmd(["bash", helper], 30, env)) == want
    sourced = run_cmd(
        [
            "bash",
            "-c",
            f'source "{helper}" && for v in RANK WORLD_SIZE LOCAL_RANK '
            'MASTER_ADDR MASTER_PORT; do echo "$v=${!v}"; done',
        ],
        30,
        env,
    )
    assert printed_env(sourced) == want
    # a MASTER_ADDR/PORT already exported (by the batch script) is kept
    kept = printed_env(
        run_cmd(["bash", helper], 30, {**env, "MASTER_ADDR": "n9", "MASTER_PORT": "1"})
    )
    assert (kept["MASTER_ADDR"], kept["MASTER_PORT"], kept["RANK"]) == ("n9", "1", "3")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hosts_from", ["hostfile", "lsb_hosts", "mcpu_hosts"])
def test_env_helper_jsrun(stubs, hosts_from):
    """jsrun / Spectrum MPI ranks on LSF: rank variables from OMPI_COMM_WORLD_*, MASTER_ADDR the
    first compute host (the batch launch node skipped), whichever LSB_* host list there is."""
    hosts = ["batch3"] + ["h41n07"] * 42 + ["h41n08"] * 42
    env = {
        **stubs["env"],
        "OMPI_COMM_WORLD_RANK": "7",
        "OMPI_COMM_WORLD_SIZE": "12",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "LSB_JOBID": "777",
    }
    if hosts_from == "hostfile":
        f = stubs["dir"] / "djob_hosts"
        f.write_text("\n".join(hosts) + "\n")
        env["LSB_DJOB_HOSTFILE"] = str(f)
    elif hosts_from == "lsb_hosts":
        env["LSB_HOSTS"] = " ".join(hosts)
    else:
        env["LSB_MCPU_HOSTS"] = "batch3 1 h41n07 42 h41n08 42"
    got = printed_env(run_cmd(["bash", LAUNCH / "env_from_scheduler.sh"], 30, env))
    assert got == {
        "RANK": "7",
        "WORLD_SIZE": "12",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h41n07",
        "MASTER_PORT": "20777",
    }


@pytest.mark.timeout(60)
def test_env_helper_precedence_and_errors(stubs):
    """mpirun inside a SLURM job: every rank inherits the batch step's SLURM_PROCID=0, so the MPI
    rank wins. No scheduler variables at all: exit 2 with a message."""
    env = {
        **stubs["env"],
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_JOB_ID": "5",
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    }
    got = printed_env(run_cmd(["bash", LAUNCH / "env_from_scheduler.sh"], 30, env))
    assert (got["RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("5", "8", "node01")
    bad = run_cmd(["bash", LAUNCH / "env_from_scheduler.sh"], 30, stubs["env"])
    assert bad.returncode == 2 and "SLURM_PROCID" in bad.stderr
    bad = run_cmd(
        ["bash", LAUNCH / "env_from_scheduler.sh"],
        30,
        {
            **stubs["env"],
            "SLURM_PROCID": "8",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "0",
            "MASTER_ADDR": "x",
        },
    )
    assert bad.returncode == 2 and "not below" in bad.stderr


def read_tasks(out: Path, n: int) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert len(files) == n, [f.name for f in files]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


@pytest.mark.timeout(90)
def test_slurm_sbatch(stubs):
    """`sbatch launch/slurm.sbatch --steps 3` on 2 nodes x 4 tasks, run by bash with a stub srun:
    every task gets its rank, the world size, its local rank, node01:(20000 + job id % 20000),
    OMP_NUM_THREADS from --cpus-per-task and the trainer command with the preset and override."""
    env = {
        **stubs["env"],
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    ok(run_cmd(["bash", LAUNCH / "slurm.sbatch", "--steps", "3"], 60, env, cwd=stubs["dir"]))
    assert "--kill-on-bad-exit=1" in (stubs["out"] / "srun_args").read_text()
    for i, t in enumerate(read_tasks(stubs["out"], 8)):
        assert (t["RANK"], t["WORLD_SIZE"], t["LOCAL_RANK"]) == (str(i), "8", str(i % 4))
        assert (t["MASTER_ADDR"], t["MASTER_PORT"]) == ("node01", str(20000 + 4242 % 20000))
        assert t["OMP_NUM_THREADS"] == "8"
        assert t["argv"] == [
            "-m",
            "lss_megatron.train",
            "--config",
            "launch/presets/tiny-cpu.yaml",
            "--steps",
            "3",
        ]
        assert t["cwd"] == str(ROOT) and str(ROOT) in t["PYTHONPATH"].split(os.pathsep)


@pytest.mark.timeout(90)
def test_summit_jsrun(stubs):
    """`bsub launch/summit_jsrun.sh` on 2 Summit nodes, run by bash with a stub jsrun: one
    resource set per node with 6 tasks and 6 GPUs; each of the 12 tasks gets its rank, local rank
    and the first compute host (not the batch node) as MASTER_ADDR."""
    f = stubs["dir"] / "djob_hosts"
    f.write_text("\n".join(["batch2"] + ["h41n07"] * 42 + ["h41n08"] * 42) + "\n")
    env = {
        **stubs["env"],
        "LSB_JOBID": "31337",
        "LSB_DJOB_HOSTFILE": str(f),
        "LS_SUBCWD": str(ROOT),
        "EXTRA_ARGS": "--steps 2",
    }
    ok(
        run_cmd(
            ["bash", LAUNCH / "summit_jsrun.sh", "--log-interval", "5"], 60, env, cwd=stubs["dir"]
        )
    )
    jsrun_args = (stubs["out"] / "jsrun_args").read_text()
    assert "--smpiargs=-disable_gpu_hooks" in jsrun_args
    assert "-n 2 -r 1 -a 6 -g 6 -c 42" in jsrun_args
    for i, t in enumerate(read_tasks(stubs["out"], 12)):
        assert (t["RANK"], t["WORLD_SIZE"], t["LOCAL_RANK"]) == (str(i), "12", str(i % 6))
        assert (t["MASTER_ADDR"], t["MASTER_PORT"]) == ("h41n07", str(20000 + 31337 % 20000))
        assert t["OMP_NUM_THREADS"] == "7"
        assert t["argv"] == [
            "-m",
            "lss_megatron.train",
            "--config",
            "launch/presets/paper-enwik8-144gpu.yaml",
            "--steps",
            "2",
            "--log-interval",
            "5",
        ]
