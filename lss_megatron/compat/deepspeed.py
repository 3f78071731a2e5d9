"""DeepSpeed without compilation: its communication backend minus the shared-memory op.

DeepSpeed's `TorchBackend` JIT-builds a shared-memory C++ op (it only serves inference
all-reduce) when it is created. ZeRO (`training/zero.py`) and Ulysses (`baselines/ulysses_attention.py`) both
create one; `no_shm_op()` skips the build for the duration, and `deepspeed_backend()` installs,
when none is set, DeepSpeed's `TorchBackend` on the existing torch.distributed groups with
`all_to_all_single` passing its tensors positionally, so `parallel.comm.record()` sees every
all-to-all with its bytes. `deepspeed` is an optional dependency: it is imported when first used.
"""

from __future__ import annotations

import contextlib
import importlib
from datetime import timedelta

import torch


@contextlib.contextmanager
def no_shm_op():
    """Inside the block, DeepSpeed's TorchBackend builds no shared-memory op.
    (`import deepspeed.comm.torch as m` would bind torch itself.)"""
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def deepspeed_backend():
    """`deepspeed.comm`'s backend, installing `TorchBackendNoShm` (module doc) if none is set."""
    ds_comm = importlib.import_module("deepspeed.comm.comm")
    if ds_comm.cdb is not None:
        return ds_comm.cdb
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    class TorchBackendNoShm(ds_torch.TorchBackend):
        """DeepSpeed's torch.distributed backend; the all-to-all passes its tensors positionally
        (DeepSpeed's passes keywords), which is how `parallel.comm.record()` reads their sizes."""

        def all_to_all_single(
            self,
            output,
            input,
            output_split_sizes=None,
            input_split_sizes=None,
            group=None,
            async_op=False,
        ):
            return torch.distributed.all_to_all_single(
                output,
                input,
                output_split_sizes,
                input_split_sizes,
                group=group,
                async_op=async_op,
            )

    with no_shm_op():  # torch.distributed is initialised: TorchBackend only wraps it
        ds_comm.cdb = TorchBackendNoShm(
            torch.distributed.get_backend(), timedelta(minutes=30), None
        )
    return ds_comm.cdb
