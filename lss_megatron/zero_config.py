"""The DeepSpeed config of a ZeRO run: the trainer's defaults with ``--deepspeed-config FILE``
merged over them. Torch-free, so a bad file fails at validation, before any process group.

* `defaults(...)`: what the trainer runs without a file (see training/zero.py for why each value).
  ``overlap_comm`` is on where the accelerator has streams to overlap the gradient reduction
  with backward on (CUDA/NCCL), off on CPU/gloo (`overlap_comm_default`).
* `merge(base, user)`: the file merged over the defaults, recursively (a mapping merges key by
  key, anything else replaces).
* `file_settings(path, user, data_ranks=D, seq_ranks=N)`: what a file says in the trainer's
  terms (DeepSpeed's own meaning): the batch keys are sequences per step over D data ranks, the
  sequence group of N NOT counted (``train_batch_size = micro x accumulation x D``: the
  trainer's ``--global-batch-size``); ``gradient_clipping`` is ``--clip-grad``;
  ``zero_optimization.stage`` is ``--zero-stage``; ``optimizer`` Adam/AdamW/SGD with ``lr`` and
  ``weight_decay`` is ``--optimizer``/``--lr``/``--weight-decay`` (torch's other defaults
  only); ``bf16.enabled`` is ``--dtype bf16``. Refused, one line naming the section and why:
  inconsistent batch keys, ``scheduler``, ``fp16`` enabled, stage 3, offload, and the sections
  in `REFUSED`. Everything else (bucket sizes, ``overlap_comm``, ``contiguous_gradients``,
  ``reduce_scatter``, ``round_robin_gradients``, ``communication_data_type``,
  ``steps_per_print``, ...) is DeepSpeed's to read.
* `adopt(...)`: the file's settings become the run's options where the flags left them at their
  defaults (train.py, before any process group); a flag that says otherwise is a contradiction.
* `file_problems(path, run, ...)`: the file against a finished configuration (config.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

AUTO = "auto"
BATCH_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
)
FLAG_OF = {
    "global_batch_size": "--global-batch-size",
    "micro_batch_size": "--micro-batch-size",
    "clip_grad": "--clip-grad",
    "zero_stage": "--zero-stage",
    "dtype": "--dtype",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
}
"""The trainer's options a DeepSpeed config sets (config field -> flag)."""
OPTIMIZER_TYPES = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd"}
"""DeepSpeed optimizer types the trainer runs exactly (its ``Adam`` is AdamW: ``adam_w_mode``
defaults to true). Their other hyperparameters must be torch's defaults, which ours are."""
OPTIMIZER_FIXED = {
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "adam_w_mode": True, "bias_correction": True},
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": False},
}
REFUSED = {
    "scheduler": "DeepSpeed's WarmupLR/WarmupDecayLR/WarmupCosineLR start at warmup_min_lr on "
    "the first step (log-shaped by default) where --warmup-steps starts at lr/W, so no setting "
    "matches exactly; use --lr-schedule, --warmup-steps, --min-lr",
    "amp": "apex AMP is not used; --dtype bf16 or --fp16 (without ZeRO) set the precision",
    "activation_checkpointing": "the model recomputes through Megatron; use --recompute "
    "selective|full",
    "pipeline": "pipeline parallelism is not built (docs/megatron-lm.md section 5)",
    "curriculum_learning": "the trainer's data order is fixed by --seed (every mode alike)",
    "data_efficiency": "the trainer's data order is fixed by --seed (every mode alike)",
    "compression_training": "it rewrites the model's layers; the model is Megatron's GPT as built",
    "sparse_attention": "attention is the mode's (LSS, Ulysses, ring, ...), always exact",
    "elasticity": "the batch is fixed by the config's batch keys / --global-batch-size",
}
"""Top-level sections refused, each with why (one line each)."""


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


def _given(user: dict, key: str):
    """`user[key]`, None when absent or ``"auto"``."""
    v = user.get(key)
    return None if v is None or v == AUTO else v


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def batch_settings(path: str, user: dict, data_ranks: int) -> tuple[dict, list[str]]:
    """The batch keys as DeepSpeed reads them (`DeepSpeedConfig._set_batch_related_parameters`)
    with DeepSpeed's world size = the data ranks D, the sequence group NOT counted:
    train_batch_size = micro x accumulation x D sequences per step. Returns ({config field:
    (key, value)}, problems)."""
    tb, mb, ga = (_given(user, k) for k in BATCH_KEYS)
    p = []
    for key, v in zip(BATCH_KEYS, (tb, mb, ga), strict=True):
        if v is not None and not _is_count(v):
            p.append(f"--deepspeed-config {path}: {key} must be a whole number >= 1, got {v!r}")
    if p:
        return {}, p
    d = data_ranks
    where = f"with D = {d} data ranks (the sequence group is not counted)"
    out: dict = {}
    if tb is not None and mb is not None and ga is not None:
        if tb != mb * ga * d:
            p.append(
                f"--deepspeed-config {path}: train_batch_size {tb} != "
                f"train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {ga} x {d} "
                f"data ranks = {mb * ga * d} (the sequence group is not counted)"
            )
        out = {"global_batch_size": ("train_batch_size", tb)}
        out["micro_batch_size"] = ("train_micro_batch_size_per_gpu", mb)
    elif tb is not None and mb is not None:
        if tb % (mb * d):
            p.append(
                f"--deepspeed-config {path}: train_batch_size {tb} is not divisible by "
                f"train_micro_batch_size_per_gpu {mb} x {d} data ranks (the sequence group is "
                "not counted)"
            )
        out = {"global_batch_size": ("train_batch_size", tb)}
        out["micro_batch_size"] = ("train_micro_batch_size_per_gpu", mb)
    elif tb is not None and ga is not None:
        if tb % (ga * d):
            p.append(
                f"--deepspeed-config {path}: train_batch_size {tb} is not divisible by "
                f"gradient_accumulation_steps {ga} x {d} data ranks (the sequence group is not "
                "counted)"
            )
        out = {"global_batch_size": ("train_batch_size", tb)}
        out["micro_batch_size"] = ("gradient_accumulation_steps", tb // (ga * d) or 1)
    elif tb is not None:  # the micro-batch stays --micro-batch-size's (default: G / D)
        if tb % d:
            p.append(
                f"--deepspeed-config {path}: train_batch_size {tb} is not divisible by the {d} "
                "data ranks (the sequence group is not counted)"
            )
        out = {"global_batch_size": ("train_batch_size", tb)}
    elif mb is not None:
        out = {"micro_batch_size": ("train_micro_batch_size_per_gpu", mb)}
        if ga is not None or AUTO not in (user.get(BATCH_KEYS[0]), user.get(BATCH_KEYS[2])):
            # DeepSpeed: accumulation 1 unless given (an "auto" key is the trainer's to fill)
            total = mb * (ga or 1) * d
            out["global_batch_size"] = ("train_micro_batch_size_per_gpu", total)
    elif ga is not None:
        p.append(
            f"--deepspeed-config {path}: gradient_accumulation_steps {ga} alone does not set a "
            f"batch; give train_batch_size or train_micro_batch_size_per_gpu too ({where})"
        )
    return out, p


def _optimizer_settings(path: str, opt) -> tuple[dict, list[str]]:
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        return {}, [f'--deepspeed-config {path}: optimizer must be {{"type": ..., "params": ...}}']
    kind = OPTIMIZER_TYPES.get(opt["type"].lower())
    if kind is None:
        return {}, [
            f"--deepspeed-config {path}: optimizer.type {opt['type']!r} is not supported: the "
            "trainer runs torch's AdamW (DeepSpeed's Adam/AdamW) or SGD exactly, nothing else"
        ]
    params = opt.get("params", {}) or {}
    if not isinstance(params, dict):
        return {}, [f"--deepspeed-config {path}: optimizer.params must be an object"]
    out: dict = {"optimizer": ("optimizer.type", kind)}
    p = []
    for key, value in params.items():
        if key in ("lr", "weight_decay"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                p.append(f"--deepspeed-config {path}: optimizer.params.{key} {value!r}: a number")
            else:
                out[key] = (f"optimizer.params.{key}", float(value))
        elif key in ("torch_adam", "fused", "foreach"):  # an implementation, not the maths
            continue
        elif key in OPTIMIZER_FIXED[kind]:
            fixed = OPTIMIZER_FIXED[kind][key]
            same = list(value) == fixed if isinstance(fixed, list) else value == fixed
            if not same:
                p.append(
                    f"--deepspeed-config {path}: optimizer.params.{key} {value!r} is not "
                    f"supported: the trainer's {kind} uses {key} = {fixed!r} (torch's default)"
                )
        else:
            p.append(
                f"--deepspeed-config {path}: optimizer.params.{key} is not supported by the "
                f"trainer's {kind} (lr, weight_decay and torch's defaults only)"
            )
    return out, p


def file_settings(
    path: str, user: dict, *, data_ranks: int, seq_ranks: int
) -> tuple[dict, list[str]]:
    """What a DeepSpeed config says in the trainer's terms: ({config field: (the file's key,
    value)}, problems), each problem one line naming the key and why. `data_ranks`: D, what
    DeepSpeed's batch keys count; `seq_ranks`: the sequence group N given to DeepSpeed."""
    p: list[str] = []
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return {}, [f"--deepspeed-config {path}: zero_optimization must be an object, got {zero!r}"]
    out, p = batch_settings(path, user, data_ranks)
    clip = _given(user, "gradient_clipping")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0:
            p.append(f"--deepspeed-config {path}: gradient_clipping {clip!r}: a number >= 0")
        else:
            out["clip_grad"] = ("gradient_clipping", float(clip))
    stage = _given(zero, "stage")
    if stage is not None:
        if stage not in (0, 1, 2):
            p.append(
                f"--deepspeed-config {path}: zero_optimization.stage {stage!r} is not supported: "
                "ZeRO stage 1 or 2 (stage 3 is not wired)"
            )
        else:
            out["zero_stage"] = ("zero_optimization.stage", stage)
    if "optimizer" in user:
        settings, problems = _optimizer_settings(path, user["optimizer"])
        out.update(settings)
        p += problems
    for key in ("fp16", "bf16"):
        section = user.get(key)
        if section is not None and not isinstance(section, dict):
            p.append(f"--deepspeed-config {path}: {key} must be an object, got {section!r}")
            continue
        enabled = _given(section or {}, "enabled")
        if key == "fp16" and enabled not in (None, False):
            p.append(
                f"--deepspeed-config {path}: fp16.enabled is not supported: DeepSpeed's fp16 "
                "optimizer is not wired under ZeRO (--fp16 runs without ZeRO; --bf16 with it)"
            )
        elif key == "bf16" and enabled is not None:
            out["dtype"] = ("bf16.enabled", "bf16" if enabled else "fp32")
    for key, why in REFUSED.items():
        if key in user:
            p.append(f"--deepspeed-config {path}: {key} is not supported: {why}")
    sp = _given(user, "sequence_parallel_size")
    if sp is not None and sp != seq_ranks:
        p.append(
            f"--deepspeed-config {path}: sequence_parallel_size {sp!r} disagrees with the run's "
            f"sequence group N = {seq_ranks} (--context-parallel-size / --seq-parallel)"
        )
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) not in (None, {}) and (
            not isinstance(zero[key], dict) or zero[key].get("device", "none") != "none"
        ):
            p.append(
                f"--deepspeed-config {path}: zero_optimization.{key} is not supported: it "
                "needs DeepSpeed's compiled CPU Adam (this trainer compiles nothing)"
            )
    return out, p


def adopt(
    path: str, values: dict, field_defaults: dict, *, data_ranks: int, seq_ranks: int
) -> list[str]:
    """Set the trainer's options from the DeepSpeed config at `path` (`values`: config field ->
    value, changed in place) where they are still at their built-in default (`field_defaults`);
    a flag or preset that set another value is a contradiction. Returns the problems (one line
    each)."""
    try:
        user = read_file(path)
    except ValueError as e:
        return [str(e)]
    settings, p = file_settings(path, user, data_ranks=data_ranks, seq_ranks=seq_ranks)
    if p:
        return p
    for name, (key, value) in settings.items():
        current = values.get(name)
        if current == field_defaults[name] or current == value:
            values[name] = value
        else:
            p.append(
                f"--deepspeed-config {path}: {key} gives {FLAG_OF[name]} {value!r}, but "
                f"{FLAG_OF[name]} {current!r} was set"
            )
    return p


def file_problems(path: str, run: dict, *, data_ranks: int, seq_ranks: int) -> list[str]:
    """Problems of the file at `path` for the run whose options are `run` (config field ->
    effective value; a field missing from it is not compared): what the file refuses, and each
    value it sets that the run does not have."""
    try:
        user = read_file(path)
    except ValueError as e:
        return [str(e)]
    settings, p = file_settings(path, user, data_ranks=data_ranks, seq_ranks=seq_ranks)
    for name, (key, value) in settings.items():
        if name in run and run[name] != value:
            p.append(
                f"--deepspeed-config {path}: {key} means {FLAG_OF[name]} {value!r}, but the run "
                f"has {run[name]!r}"
            )
    if not p:
        p += deepspeed_problems(path, user, run)
    return p


def for_deepspeed(config: dict) -> dict:
    """The merged config as handed to `deepspeed.initialize`: without ``optimizer`` (mapped onto
    the trainer's torch optimizer, which is passed as the client optimizer)."""
    return {k: v for k, v in config.items() if k != "optimizer"}


def deepspeed_problems(path: str, user: dict, run: dict) -> list[str]:
    """What DeepSpeed's own config classes (`deepspeed.runtime.config.DeepSpeedConfig`, its
    pydantic sections such as `DeepSpeedZeroConfig`) refuse in the file merged over the
    trainer's defaults, before any process group (so a bad bucket size or ZeRO key no longer
    passes --validate-only to fail at run time). The batch keys and the optimizer are the
    trainer's (`file_settings`); DeepSpeed checks the rest at one data rank. Empty when DeepSpeed is not installed (the
    ZeRO check says so)."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        return []
    stage = run.get("zero_stage", 1)
    clip = run.get("clip_grad", 1.0)
    base = defaults(
        micro=1,
        accumulation=1,
        data_ranks=1,
        clip=clip,
        stage=stage if stage in (0, 1, 2, 3) else 1,
        bucket_elements=500_000_000,
        overlap_comm=False,
    )
    mine = {k: v for k, v in user.items() if k not in BATCH_KEYS}
    try:
        DeepSpeedConfig(for_deepspeed(merge(base, mine)))
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
