"""Megatron-LM checkpoint interop (issue #25 item 10), both round trips against the model.

1. An LSS run (N = 2, zigzag, learned positions: the table is stored as sequence slices) is
   exported with `python -m lss_megatron.tools.export_megatron`, for 1 and 2 tensor-parallel
   ranks. Megatron-Core's stock GPTModel loads the mp_rank_00 file with strict=True, and its
   outputs equal those of our own serial model loaded from our checkpoint (the same fp32 weights:
   exactly). The TP = 2 files concatenate back to the TP = 1 tensors.
2. The trainer's `--load MEGATRON_DIR` continues from the export: LSS from the TP = 1 files and
   nvidia-sp from the TP = 2 files give the losses of continuing from our own checkpoint (SGD, so
   no optimizer state is lost; fp32, 1e-6: the same arithmetic on the same weights and data).
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.support import read_metrics, run_cmd, torchrun_train

ARGS = (
    "--num-layers 2 --hidden-size 32 --num-heads 4 --seq-length 32 --global-batch-size 2 "
    "--vocab-size 64 --steps 4 --optimizer sgd --lr 0.1 --seed 5 --progress off"
).split()
TOL = 1e-6


def _export(ck, out, tp: int):
    cmd = [sys.executable, "-m", "lss_megatron.tools.export_megatron", "--load", ck, "--out", out]
    return run_cmd([*cmd, "--tensor-model-parallel-size", str(tp)], 120)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_export_loads_in_megatron_and_back(tmp_path):
    ck, meg, meg2 = tmp_path / "ck", tmp_path / "meg", tmp_path / "meg2"
    lss = ["--mode", "lss", "--seq-parallel", "2", "--lss-layout", "zigzag"]
    res = torchrun_train(
        2,
        [
            *lss,
            *ARGS,
            "--out",
            str(tmp_path / "a"),
            "--save",
            str(ck),
            "--stop-after",
            "2",
            "--save-interval",
            "2",
        ],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for out, tp in ((meg, 1), (meg2, 2)):
        res = _export(ck, out, tp)
        assert res.returncode == 0, res.stderr[-2000:]
        assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        assert len(list((out / "iter_0000002").glob("mp_rank_*"))) == tp
    assert _export(ck, meg, 1).returncode == 2  # never into another export

    _check_in_megatron(ck, meg, meg2)

    ours = torchrun_train(2, [*lss, *ARGS, "--out", str(tmp_path / "b"), "--load", str(ck)])
    assert ours.returncode == 0, ours.stderr[-2000:]
    want = read_metrics(tmp_path / "b")
    for name, flags, source in (
        ("lss", lss, meg),
        ("nvidia-sp", ["--mode", "nvidia-sp", "--seq-parallel", "2"], meg2),
    ):
        res = torchrun_train(
            2, [*flags, *ARGS, "--out", str(tmp_path / name), "--load", str(source)]
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert "started from Megatron-LM checkpoint" in res.stderr
        got = read_metrics(tmp_path / name)
        assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 4]
        for a, b in zip(got, want, strict=True):
            assert abs(a["loss"] - b["loss"]) < TOL, (name, a["step"], a["loss"], b["loss"])


def _check_in_megatron(ck, meg, meg2):
    """In this process: Megatron-Core's stock GPTModel (serial spec) loads the export strictly,
    and computes what our serial model loaded from our checkpoint computes."""
    import os
    import tempfile

    import torch.distributed as dist

    from lss_megatron.compat import cpu
    from lss_megatron.config import ModelConfig, ParallelConfig
    from lss_megatron.model import build_model
    from lss_megatron.parallel.grid import destroy_grid, initialize_grid
    from lss_megatron.runs import latest_checkpoint
    from lss_megatron.tools.export_megatron import partition_dims
    from lss_megatron.training.checkpoint import load_checkpoint
    from lss_megatron.training.megatron_ckpt import read

    cpu.apply()
    model = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=32, vocab_size=64)
    dims = partition_dims(
        {**model.__dict__, "num_kv_heads": 4}
    )  # before our own group: it makes and ends its own
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        grid = initialize_grid(ParallelConfig(mode="serial", world_size=1))
        stock = build_model(model, grid, mode="serial", seed=99)  # other initial weights
        files = read(meg, dims)
        state = torch.load(
            meg / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False
        )
        assert state["args"].num_attention_heads == 4 and state["iteration"] == 2
        stock.load_state_dict(state["model"], strict=True)  # what Megatron-LM's load does
        ours = build_model(model, grid, mode="serial", seed=7)
        path, _ = latest_checkpoint(ck)
        load_checkpoint(path, ours, torch.optim.SGD(ours.parameters(), lr=0.1), grid)
        tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(32).expand(2, 32)
        with torch.no_grad():
            a = stock(tokens, positions, None)
            b = ours(tokens, positions, None)
        assert torch.equal(a, b)
        _, split, _ = read(meg2, dims)  # TP = 2 shards stitched back
        assert set(split) == set(files[1])
        for name, t in files[1].items():
            assert torch.equal(split[name], t), name
        destroy_grid()
    finally:
        dist.destroy_process_group()
