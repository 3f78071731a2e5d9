"""Which GPU a rank uses, that no two ranks share one, how NCCL ends a timed-out job, and device
synchronisation for honest step times. Plain functions of their inputs, testable without a GPU.

* `select_cuda_device`: ``cuda:LOCAL_RANK`` where the node's GPUs are all visible, device 0
  where the scheduler shows each task only its own GPU; otherwise `DeviceError` (exit code 2),
  never LOCAL_RANK modulo the device count (which puts two ranks on one GPU silently).
* `check_unique_devices`: after the rendezvous, ranks that share a GPU (same host and UUID) all
  stop with `DeviceError`, through the rendezvous store (O(1) per rank, no collective).
* `NCCL_ERROR_ENV`: set before an NCCL process group exists, so a collective timeout reaches
  Python as an exception (the same message and exit code as gloo's) instead of SIGABRT.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


class DeviceError(RuntimeError):
    """This rank cannot get a GPU of its own (exit code 2)."""


NCCL_ERROR_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
"""Set (unless already set) before an NCCL process group is created. 2 = CleanUpOnly: on a
collective timeout NCCL's watchdog aborts the communicators but does not tear the process down,
so the error reaches Python as an exception and the rank ends like under gloo: the same message
(`loop._explain`) and exit code 1, instead of SIGABRT (torch's default, 1 = TearDown)."""


def select_cuda_device(local_rank: int, count: int) -> int:
    """The CUDA device index of this process (module doc)."""
    if count < 1:
        raise DeviceError(
            "CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
        )
    if 0 <= local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise DeviceError(
        f"LOCAL_RANK={local_rank} but this process sees only {count} CUDA devices: ranks would "
        f"share a GPU. Start at most {count} processes per node, or give each task its own GPU"
    )


def check_unique_devices(
    store, host: str, device_id: str, world_size: int, timeout: timedelta
) -> None:
    """Raise `DeviceError` on every rank of this job that uses the same GPU (`device_id`, its
    UUID) on the same host as another rank."""
    key = f"lss_device/{host}/{device_id}"
    store.add(key, 1)
    if store.add("lss_device/arrived", 1) == world_size:
        store.set("lss_device/all", "1")
    store.wait(["lss_device/all"], timeout)
    sharing = store.add(key, 0)
    if sharing > 1:
        raise DeviceError(
            f"{sharing} ranks share GPU {device_id} on host {host}: give each rank "
            "its own GPU (fewer processes per node, or one GPU per task)"
        )


def prepare_cuda() -> None:
    """Before an NCCL process group: `NCCL_ERROR_ENV`, this rank's device (`LOCAL_RANK`), and
    TF32 for fp32 matmuls (``set_float32_matmul_precision("high")``: an fp32 run's GEMMs on the
    tensor cores; config.json's runtime records the precision)."""
    for key, value in NCCL_ERROR_ENV.items():
        os.environ.setdefault(key, value)
    torch.set_float32_matmul_precision("high")
    index = select_cuda_device(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
    torch.cuda.set_device(index)


def check_cuda_ranks(timeout: timedelta) -> None:
    """After an NCCL rendezvous of several ranks: `check_unique_devices` for this rank's GPU."""
    import socket

    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    check_unique_devices(
        dist.distributed_c10d._get_default_store(),
        socket.gethostname(),
        str(getattr(props, "uuid", props.name)),
        dist.get_world_size(),
        timeout,
    )


def sync_device(device: torch.device) -> None:
    """Wait for every kernel queued on `device` (CUDA); CPU work is synchronous already."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
