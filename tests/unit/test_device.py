"""Running on GPU hosts: device selection, shared-GPU refusal, NCCL error handling, ZeRO's device,
and the suite hiding CUDA (all checked without a GPU: the rules are plain functions)."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from lss_megatron.training.devices import (
    NCCL_ERROR_ENV,
    DeviceError,
    check_unique_devices,
    select_cuda_device,
)
from lss_megatron.training.loop import _explain


def test_select_cuda_device():
    assert select_cuda_device(0, 8) == 0 and select_cuda_device(7, 8) == 7
    assert select_cuda_device(3, 1) == 0  # the scheduler shows each task only its own GPU
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=5 but this process sees only 4 CUDA"):
        select_cuda_device(5, 4)  # never 5 % 4 = 1: two ranks on GPU 1
    with pytest.raises(DeviceError, match="no device is visible"):
        select_cuda_device(0, 0)


def _ranks_on(devices: list[str]) -> list[str | None]:
    """check_unique_devices on one in-process store, one thread per rank; the errors."""
    store = dist.HashStore()
    errors: list[str | None] = [None] * len(devices)

    def rank(i: int) -> None:
        try:
            check_unique_devices(store, "node1", devices[i], len(devices), timedelta(seconds=30))
        except DeviceError as e:
            errors[i] = str(e)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_ranks_sharing_a_gpu_are_refused():
    assert _ranks_on(["GPU-a", "GPU-b", "GPU-c"]) == [None, None, None]
    errors = _ranks_on(["GPU-a", "GPU-b", "GPU-a"])
    assert errors[1] is None
    for e in (errors[0], errors[2]):  # both ranks on GPU-a say so
        assert e == (
            "2 ranks share GPU GPU-a on host node1: give each rank its own GPU (fewer "
            "processes per node, or one GPU per task)"
        )


class _Cfg:
    class parallel:  # noqa: N801 - the attribute path `_explain` reads
        dist_timeout_s = 60.0


def test_nccl_timeout_reads_like_gloos():
    """The message a rank ends with is the same for gloo's timeout and NCCL's watchdog (whose
    exception reaches Python because of NCCL_ERROR_ENV: CleanUpOnly, not TearDown)."""
    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
        "waiting 60000ms for recv operation to complete"
    )
    nccl = RuntimeError(
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
        "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=60000) ran for "
        "60003 milliseconds before timing out."
    )
    aborted = RuntimeError(
        "NCCL communicator was aborted on rank 1. Original reason for "
        "failure was: [Rank 1] Watchdog caught collective operation timeout"
    )
    want = "a collective timed out after 60 s (--dist-timeout): a peer rank is hung or gone"
    assert _explain(gloo, _Cfg) == _explain(nccl, _Cfg) == _explain(aborted, _Cfg) == want
    assert NCCL_ERROR_ENV == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def test_zero_hands_deepspeed_the_chosen_device():
    from lss_megatron.training.zero import deepspeed_args

    assert deepspeed_args(torch.device("cuda", 3)).device_rank == 3  # not LOCAL_RANK
    assert deepspeed_args(torch.device("cpu")).device_rank == 0
    assert not hasattr(deepspeed_args(torch.device("cpu")), "local_rank")


def test_suite_hides_cuda():
    """conftest.py hides CUDA from the CPU-model tests and every rank they spawn."""
    if os.environ.get("LSS_TEST_CUDA") == "1":
        pytest.skip("LSS_TEST_CUDA=1 keeps CUDA visible")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


def test_prepare_cuda_enables_tf32_for_fp32_matmuls(monkeypatch):
    """On CUDA the trainer runs fp32 GEMMs as TF32 (recorded in config.json's runtime as
    ``float32_matmul_precision``); the device choice itself is stubbed here (no GPU)."""
    import torch

    from lss_megatron.training import devices

    chosen = []
    for key in NCCL_ERROR_ENV:  # prepare_cuda sets them: restored after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(devices, "select_cuda_device", lambda local_rank, count: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    before = torch.get_float32_matmul_precision()
    try:
        devices.prepare_cuda()
        assert torch.get_float32_matmul_precision() == "high" and chosen == [0]
    finally:
        torch.set_float32_matmul_precision(before)
