"""The DeepSpeed config of a ZeRO run: the trainer's defaults with ``--deepspeed-config FILE``
merged over them. Torch-free, so a bad file fails at validation, before any process group.

* `defaults(...)`: what the trainer runs without a file (see training/zero.py for why each value).
  ``overlap_comm`` is on where the accelerator has streams to overlap the gradient reduction
  with backward on (CUDA/NCCL), off on CPU/gloo (`overlap_comm_default`).
* `merge(base, user)`: the file merged over the defaults, recursively (a mapping merges key by
  key, anything else replaces).
* `file_problems(path, expected)`: what is wrong with a file, each naming the key and its value.
  The trainer owns some keys: the batch keys (from ``--global-batch-size`` /
  ``--micro-batch-size`` and the grid), ``gradient_clipping`` (``--clip-grad``) and
  ``zero_optimization.stage`` (``--zero-stage``) may be given only as ``"auto"`` or the trainer's
  value; a ds-config ``optimizer``/``scheduler`` (the trainer passes its own torch optimizer and
  sets the lr itself), DeepSpeed ``fp16``/``bf16`` enabled (``--dtype`` sets DeepSpeed's
  ``bf16``: the engine follows the model's dtype) and ``offload_optimizer``/``offload_param`` (DeepSpeed's compiled CPU Adam) are
  refused. Everything else (bucket sizes, ``overlap_comm``, ``contiguous_gradients``,
  ``reduce_scatter``, ``round_robin_gradients``, ``communication_data_type``,
  ``steps_per_print``, ...) is DeepSpeed's to read.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

AUTO = "auto"
OWNED_TOP = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)
FLAG_OF = {
    "train_batch_size": "--global-batch-size / --micro-batch-size and the grid",
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--global-batch-size / --micro-batch-size",
    "gradient_clipping": "--clip-grad",
    "zero_optimization.stage": "--zero-stage",
}
REFUSED = {
    "optimizer": "the trainer passes its own torch optimizer (--optimizer, --lr, --weight-decay); "
    "a ds-config optimizer would JIT-build fused_adam",
    "scheduler": "the trainer sets the learning rate every step (--lr-schedule, --warmup-steps)",
}


def overlap_comm_default(cuda: bool) -> tuple[bool, str]:
    """(overlap_comm, why) for this accelerator."""
    if cuda:
        return True, (
            "CUDA/NCCL: gradient reductions run on a side stream, overlapping the rest of backward"
        )
    return False, (
        "CPU/gloo: gloo collectives run on the calling thread and there is no "
        "accelerator stream to overlap them with backward"
    )


def defaults(
    *,
    micro: int,
    accumulation: int,
    data_ranks: int,
    clip: float,
    stage: int,
    bucket_elements: int,
    overlap_comm: bool,
    bf16: bool = False,
) -> dict:
    """The trainer's DeepSpeed config (no ds-config optimizer, no scheduler; a bf16 engine with
    fp32 gradient reduction when `bf16` (``--dtype bf16``: Megatron's bf16 model), else fp32)."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * data_ranks,
        "managed_gradient_accumulation": False,
        "gradient_clipping": clip,
        "zero_optimization": {
            "stage": stage,
            "contiguous_gradients": True,
            "overlap_comm": overlap_comm,
            "reduce_scatter": True,
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        **({"communication_data_type": "fp32"} if bf16 else {}),
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def merge(base: dict, user: dict) -> dict:
    """`user` merged over `base` (a new dict; mappings merge recursively, ``"auto"`` keeps the
    base value)."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value != AUTO or key not in out:
            out[key] = copy.deepcopy(value)
    return out


def read_file(path: str) -> dict:
    """The JSON mapping in `path`; raises ValueError naming the path and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--deepspeed-config {path}: no such file")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--deepspeed-config {path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"--deepspeed-config {path}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def file_problems(path: str, expected: dict) -> list[str]:
    """Problems of the file at `path` given the trainer's owned values `expected` (keys of
    `FLAG_OF`: the batch keys, gradient_clipping, zero_optimization.stage; a key missing from
    `expected` is not compared)."""
    try:
        user = read_file(path)
    except ValueError as e:
        return [str(e)]
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [f"--deepspeed-config {path}: zero_optimization must be an object, got {zero!r}"]
    given = {k: user[k] for k in OWNED_TOP if k in user}
    if "stage" in zero:
        given["zero_optimization.stage"] = zero["stage"]
    p = []
    for key, value in given.items():
        if key in expected and value != AUTO and value != expected[key]:
            p.append(
                f"--deepspeed-config {path}: {key} {value!r} disagrees with the run's "
                f'{expected[key]!r} (set by {FLAG_OF[key]}); use "auto" or remove it'
            )
    for key, why in REFUSED.items():
        if key in user:
            p.append(f"--deepspeed-config {path}: {key} is not supported: {why}")
    for key in ("fp16", "bf16"):
        if isinstance(user.get(key), dict) and user[key].get("enabled") not in (False, AUTO, None):
            p.append(
                f"--deepspeed-config {path}: {key}.enabled is not supported: --dtype sets it "
                "(--dtype bf16: DeepSpeed's bf16 mode over Megatron's bf16 model)"
            )
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) not in (None, {}) and (
            not isinstance(zero[key], dict) or zero[key].get("device", "none") != "none"
        ):
            p.append(
                f"--deepspeed-config {path}: zero_optimization.{key} is not supported: it "
                "needs DeepSpeed's compiled CPU Adam (this trainer compiles nothing)"
            )
    if not p:
        p += deepspeed_problems(path, user, expected)
    return p


def deepspeed_problems(path: str, user: dict, expected: dict) -> list[str]:
    """What DeepSpeed's own config classes (`deepspeed.runtime.config.DeepSpeedConfig`, its
    pydantic sections such as `DeepSpeedZeroConfig`) refuse in the file merged over the
    trainer's defaults, before any process group (so a bad bucket size or ZeRO key no longer
    passes --validate-only to fail at run time). The batch keys are the trainer's and checked
    above; they are validated here at one data rank. Empty when DeepSpeed is not installed (the
    ZeRO check says so)."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return []
    stage = expected.get("zero_optimization.stage", 1)
    clip = expected.get("gradient_clipping", 1.0)
    base = defaults(
        micro=1,
        accumulation=1,
        data_ranks=1,
        clip=clip,
        stage=stage if stage in (0, 1, 2, 3) else 1,
        bucket_elements=500_000_000,
        overlap_comm=False,
    )
    mine = {k: v for k, v in user.items() if k not in OWNED_TOP}
    try:
        DeepSpeedConfig(merge(base, mine))
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, ValueError, TypeError...
        return [f"--deepspeed-config {path}: DeepSpeed refuses it: {_reason(e)}"]
    return []


def _reason(e: Exception) -> str:
    """DeepSpeed's reason in one line: pydantic's field, message and value, else the text."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            parts = [
                f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')} "
                f"(got {err.get('input')!r})"
                for err in errors()
            ]
            return "; ".join(parts)[:400]
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400]
