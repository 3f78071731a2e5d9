"""Timing and kernel records the GPU check trusts (analysis/gpu_check.py, analysis/emulate.py).

* `time_reps`: warm-up calls, then one interval per rep: CUDA events around each rep on a GPU
  (read after one synchronisation at the end, so the host never stalls the queue between reps),
  the wall clock around each rep on the CPU;
* `kernels_seen`: which fused SDPA kernels ran inside a call, forward and backward, seen
  through a dispatch mode (the math kernel has no op of its own: no fused op seen = math);
* `pinned_sdpa`: SDPA's kernel priority pinned, flash first, for everything the check runs;
* `sm_clock_mhz`: the SM clock (current and max) where nvidia-smi or pynvml can read it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time

import torch

KERNEL_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_flash_attention_forward": "flash",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_efficient_attention_forward": "efficient",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
}
"""aten ops of the fused SDPA kernels (forward) and the kernel each one is."""
KERNEL_BACKWARD_OPS = {
    "_scaled_dot_product_flash_attention_backward": "flash",
    "_flash_attention_backward": "flash",
    "_scaled_dot_product_cudnn_attention_backward": "cudnn",
    "_scaled_dot_product_efficient_attention_backward": "efficient",
    "_efficient_attention_backward": "efficient",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "cpu_flash",
}
"""The same for their backward ops."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reps(fn, device: torch.device, *, warmup: int, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def kernels_seen(fn, backward: bool = True) -> dict[str, list[str]]:
    """The fused SDPA kernels that ran inside ``fn()``: {"forward": [...], "backward": [...]};
    ["math"] where none did (with `backward` False an empty backward list is allowed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict[str, set[str]] = {"forward": set(), "backward": set()}

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in KERNEL_OPS:
                seen["forward"].add(KERNEL_OPS[name])
            elif name in KERNEL_BACKWARD_OPS:
                seen["backward"].add(KERNEL_BACKWARD_OPS[name])
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    out = {"forward": sorted(seen["forward"]) or ["math"]}
    out["backward"] = sorted(seen["backward"]) or (["math"] if backward else [])
    return out


@contextlib.contextmanager
def pinned_sdpa(device: torch.device):
    """SDPA's kernel priority pinned for the block on CUDA: flash first, then the memory-efficient
    kernel, cuDNN last (`lss.kernel.CUDA_KERNELS`, which the trainer's own calls use too), so a
    square causal call cannot take cuDNN where the offset call takes flash. A no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    from lss_megatron.lss.kernel import sdpa_priority

    with sdpa_priority():
        yield


def sm_clock_mhz(device: torch.device) -> dict | None:
    """{"sm_mhz": current, "sm_max_mhz": max} of the GPU, from nvidia-smi (or pynvml); None
    where neither can read it."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            line = subprocess.run(
                [
                    smi,
                    f"--id={index}",
                    "--query-gpu=clocks.sm,clocks.max.sm",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            cur, top = (float(x) for x in line.split(","))
            return {"sm_mhz": cur, "sm_max_mhz": top, "source": "nvidia-smi"}
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return {
            "sm_mhz": float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            "sm_max_mhz": float(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)),
            "source": "pynvml",
        }
    except Exception:  # noqa: BLE001 - unreadable clocks are recorded as None, never fatal
        return None
