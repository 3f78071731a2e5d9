"""What a resumed run may change, checked before the model is built.

A checkpoint's ``meta.json`` holds the effective configuration of the run that saved it. A run that
``--load``s it continues that training, so every setting that gives the training its meaning must
be the same:

* the model (`MODEL_KEYS`: every kernel-independent key, ``causal`` included): another model
  cannot take the weights;
* `MEANING_KEYS` of the training: the optimizer (its state is another optimizer's), the seed (the
  batches are a pure function of seed and step), the global batch and the data.

A change of these is refused, all differences in one message. Hyper-parameters of the optimisation
that may legitimately change on a resume (`ALLOWED_KEYS`: learning rate and schedule, weight decay,
clipping, the number of steps, the dtype) are allowed, and the run says so, one line each. The
layout, mode, kernel and ZeRO stage may change freely: checkpoints are layout-independent and
every kernel computes the same model. Import-light: no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .runs import read_json

MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "seq_length",
    "vocab_size",
    "padded_vocab_size",
    "position_embedding",
    "causal",
)
MEANING_KEYS = ("optimizer", "seed", "global_batch_size", "data", "data_path")
ALLOWED_KEYS = (
    "lr",
    "min_lr",
    "lr_schedule",
    "warmup_steps",
    "weight_decay",
    "clip_grad",
    "steps",
    "dtype",
)
READABLE_VERSIONS = (1, 2)


def _same(key: str, a, b) -> bool:
    if key == "data_path" and a is not None and b is not None:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    return a == b


def _diffs(saved: dict, run: dict, keys) -> list[str]:
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs run {run.get(k)!r}"
        for k in keys
        if k in saved and not _same(k, saved.get(k), run.get(k))
    ]


def resume_problems(path: Path, config: dict) -> list[str]:
    """Why checkpoint `path` cannot be resumed by a run of effective configuration `config`
    (`RunConfig.to_dict()`): another model, another meaning, a format this version does not
    read, or a step already at ``--steps``. Reads meta.json only."""
    meta = read_json(Path(path) / "meta.json")
    if meta is None or not isinstance(meta.get("step"), int):
        return [f"--load {path}: meta.json is unreadable or has no integer 'step'"]
    p = []
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    model, train = saved.get("model") or {}, saved.get("train") or {}
    if meta.get("format_version") not in READABLE_VERSIONS:
        p.append(
            f"--load {path}: format_version {meta.get('format_version')!r} (this version reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    diffs = _diffs(model, config["model"], MODEL_KEYS)
    if diffs:
        p.append(f"checkpoint {path} is for another model: " + "; ".join(diffs))
    diffs = _diffs(train, config["train"], MEANING_KEYS)
    if diffs:
        p.append(
            f"checkpoint {path} was trained with other settings that define the training "
            f"({'; '.join(diffs)}): a resume continues that training; start a new run (without "
            "--load) to change them"
        )
    if meta["step"] >= config["train"]["steps"]:
        p.append(
            f"--load {path}: already at step {meta['step']} >= --steps "
            f"{config['train']['steps']}: nothing left to train"
        )
    return p


def changed_hyperparameters(path: Path, config: dict) -> list[str]:
    """One line per allowed setting this resumed run changes (checkpoint -> run)."""
    meta = read_json(Path(path) / "meta.json") or {}
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    train = saved.get("train") or {}
    return [
        f"resuming with --{k.replace('_', '-')} {config['train'].get(k)!r} "
        f"(the checkpoint's run had {train.get(k)!r})"
        for k in ALLOWED_KEYS
        if k in train and train.get(k) != config["train"].get(k)
    ]
