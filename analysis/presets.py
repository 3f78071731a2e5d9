"""Comparison presets: the runs `python -m analysis.compare --preset NAME` makes, and their order.

A preset is a grid of sequence-parallel sizes N, data-parallel sizes D and sequence lengths l,
one model, one training recipe and the attention kernels and recompute settings to run (default:
flash, no recompute, the trainer's defaults, for every mode). For every grid point (N, D, l) it runs each of its
**variants** on P = N x D ranks (and, with ``serial_at_scale``, ``serial`` = plain data
parallelism on the same P ranks), plus the **serial reference** the efficiencies need:

* strong scaling (``scaling="strong"``, fixed l): serial on ONE rank at every length l;
* weak scaling (``scaling="weak"``, l = l0 x N for base lengths l0): serial with N = 1 and the
  same D (P = D; one rank when D = 1) at every base length l0.

A variant (`VARIANTS`) is a label for a trainer mode plus extra flags: the plain modes ``lss``,
``nvidia-sp``, ``ulysses`` and ``serial`` are their own labels; ``lss-zigzag`` (``--lss-layout
zigzag``), ``lss-kv2`` / ``lss-kv4`` (``--kv-gather-chunks``), ``lss-zero1`` / ``lss-zero2`` and
``ulysses-zero1`` / ``ulysses-zero2`` (``--zero-stage``) add the options beyond the paper. The label
names the run (``lss-zigzag_N4_D1_l512_r0``) and the table's ``variant`` column. A variant whose
flag this trainer lacks is skipped with that reason, like any run the trainer would reject.

A preset with explicit ``grids`` ((label, N, D) triples: a variant on a rank grid) runs exactly
those at every length instead of the sizes x data-parallel grid: an equal-ranks series, where each mode
runs at its own legal sizes on the same P ranks.

Runs are interleaved so that machine noise hits the configurations alike: with K repeats, every
configuration runs once per round, K rounds, the order within each round shuffled by a seed that
plan.json records (`make_plan`; docs/measurement.md says why). A run the trainer would
reject (e.g. nvidia-sp needs heads, key/value heads, FFN and vocabulary divisible by N) is left
out of the plan and listed in `Plan.skipped`, with the trainer's own message.

The presets are data: one YAML file per preset in ``launch/presets/compare/`` (shipped in the
wheel as ``lss_megatron/presets/compare/``, found by `lss_megatron.resources.compare_presets_dir`),
named by the file's stem; `python -m analysis.compare --list` lists them. `load_preset` reads a
file strictly: every key is a `Preset` field with dashes (``seq-lengths``, ``serial-at-scale``;
``memory-budget`` takes ``64 MiB`` / ``16 GiB``), each value of the field's type (no coercion but
integer -> float), and ``model`` / ``train`` hold trainer flags typed as in the trainer's own YAML
presets (`lss_megatron.strict_yaml`); the flags the plan sets (``mode``, ``seq-parallel``,
``data-parallel``, ``seq-length``, ``out``) are refused there. Every problem of a file comes in
one `PresetError` (an `InputError`: ``analysis.compare`` prints it as one line, exit 2).

To add a preset: copy the closest file of ``launch/presets/compare/`` to ``NEW-NAME.yaml``, edit
it, check it with ``python -m analysis.compare --preset NEW-NAME --dry-run`` (every run the
trainer would reject is listed with its reason), and add a row to the table of
docs/measurement.md. Nothing in the code changes; a new *variant* (a label for a mode plus flags)
is one line of `VARIANTS`. Cluster presets (``cluster: true``) use the enwik8 data with the models
and recipes of launch/presets/paper-enwik8-*.yaml (every flag given explicitly, so no checkpoints
are written); `compare` only prints their commands (``--dry-run``) and builds the table from
their finished run folders (``--collect``). Tests never run them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Union, get_args, get_origin, get_type_hints

from lss_megatron.config import ConfigError
from lss_megatron.resources import compare_presets_dir, source_root
from lss_megatron.strict_yaml import YamlFileError, check_value, load_file

from .inputs import InputError
from .trainer_config import argv, problems, run_config, trainer_actions, trainer_flags

REPO = source_root()
"""The repository root (launches run there), or None from an installed wheel (launches run in
the current folder, the trainer imported from the installation)."""
PARALLEL_MODES = ("lss", "nvidia-sp")
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Variant:
    """A trainer mode plus extra flags (without dashes), run under one label."""

    mode: str
    flags: Mapping[str, object] = field(default_factory=dict)
    about: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))


VARIANTS: Mapping[str, Variant] = MappingProxyType(
    {
        "serial": Variant("serial", about="Megatron's stock attention, plain data parallelism"),
        "lss": Variant("lss", about="LSS as in the paper: contiguous segments, one fused gather"),
        "nvidia-sp": Variant(
            "nvidia-sp", about="Megatron TP + sequence_parallel (the paper's baseline)"
        ),
        "ulysses": Variant("ulysses", about="DeepSpeed-Ulysses: all-to-all over heads"),
        "lss-zigzag": Variant("lss", {"lss-layout": "zigzag"}, "zigzag segments: causal balance"),
        "lss-kv2": Variant("lss", {"kv-gather-chunks": 2}, "K/V gathered in 2 head chunks"),
        "lss-kv4": Variant("lss", {"kv-gather-chunks": 4}, "K/V gathered in 4 head chunks"),
        "lss-local": Variant(
            "lss", {"lss-save-kv": "local"}, "K/V kept local, re-gathered in backward"
        ),
        "lss-overlap": Variant(
            "lss", {"lss-overlap": True}, "gather behind the local blocks, reduce-scatter behind"
        ),
        "lss-local-overlap": Variant(
            "lss",
            {"lss-save-kv": "local", "lss-overlap": True},
            "K/V kept local and the gathers / reduce-scatters overlapped: LSS at its best",
        ),
        "lss-megatron-cp": Variant(
            "lss",
            {"lss-save-kv": "local", "lss-kv-gather": "separate"},
            "Megatron's all_gather CP: K and V gathered apart, re-gathered in backward",
        ),
        "lss-zero1": Variant("lss", {"zero-stage": 1}, "ZeRO-1 over all P ranks"),
        "lss-zero2": Variant("lss", {"zero-stage": 2}, "ZeRO-2 over all P ranks"),
        "ulysses-zero1": Variant("ulysses", {"zero-stage": 1}, "Ulysses with ZeRO-1"),
        "ulysses-zero2": Variant("ulysses", {"zero-stage": 2}, "Ulysses with ZeRO-2"),
        "ring": Variant("ring", about="ring attention: K/V blocks passed rank to rank, lse merge"),
        "ring-zigzag": Variant("ring", {"lss-layout": "zigzag"}, "ring on zigzag segments"),
    }
)
"""Every variant label a preset may list. Plain modes are their own labels."""


def get_variant(label: str) -> Variant:
    if label not in VARIANTS:
        raise KeyError(f"unknown variant {label!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[label]


@dataclass(frozen=True)
class Preset:
    """A comparison grid: one model and recipe, many rank grids and lengths."""

    name: str
    summary: str
    scaling: str
    """``strong`` (fixed lengths) or ``weak`` (l = base length x N)."""
    degrees: tuple[int, ...]
    """Sequence-parallel sizes N of the lss / nvidia-sp runs."""
    seq_lengths: tuple[int, ...]
    """strong: the lengths l; weak: the base lengths l0 (tokens per sequence-parallel rank)."""
    model: Mapping[str, object]
    """Trainer flags of the model (without dashes), the same for every run."""
    train: Mapping[str, object]
    """Trainer flags of the recipe (batch, steps, optimizer, data, ...), the same for every run."""
    data_parallel: tuple[int, ...] = (1,)
    """Data-parallel sizes D of the grid (P = N x D)."""
    ranks: int | None = None
    """Equal ranks: every grid run uses exactly this many ranks P, at each size N of `degrees`
    that divides it (D = P / N; `data_parallel` is then unused), so that each mode runs at every
    rank grid the trainer allows it on P ranks and the best grid per mode can be compared."""
    modes: tuple[str, ...] = PARALLEL_MODES
    """Variant labels (`VARIANTS`; plain modes are their own labels) run at every grid point."""
    serial_at_scale: bool = False
    """Also run `serial` (plain data parallelism, N = 1, D = P) at every grid point's P."""
    kernels: tuple[str, ...] = ("flash",)
    """``--attention-kernel`` values: every variant and reference runs with each."""
    recomputes: tuple[str, ...] = ("none",)
    """``--recompute`` values: every variant and reference runs with each."""
    repeats: int = 1
    timeout_s: float = 120.0
    """Hard limit per run (launch, imports and all steps)."""
    memory_budget_bytes: int = 1 * GiB
    """Per-rank budget of the longest-trainable-sequence figure."""
    cluster: bool = False
    """Needs a cluster: `compare` prints commands (--dry-run) and collects results (--collect)."""
    gpus_per_node: int = 6
    """Cluster presets: GPUs (tasks) per node of the printed sbatch commands."""
    notes: str = ""
    selection: str = ""
    """Set by ``analysis.compare --modes/--kernels/--recomputes`` (never by a preset file): what
    the command line chose, recorded beside the preset's name in every row and figure title."""
    grids: tuple[tuple[str, int, int], ...] = ()
    """Explicit (variant label, N, D) rank grids, each run at every length of `seq_lengths` (strong
    scaling) instead of the `degrees` x `data_parallel` grid: how an equal-ranks series gives
    each mode its own legal sizes on the same P = N x D ranks."""
    documents: tuple[tuple[str, int, int], ...] = ()
    """Packed documents: document-length mixes (name, lo, hi), each document lo..hi bytes
    (uniform) plus EOD. `analysis.compare` writes each mix (`analysis.mixes.write_mix`,
    `document_tokens` tokens, deterministic) into ``OUT/data/NAME`` before the launches, and
    every configuration runs on every mix twice: packed (Megatron-LM's ``--reset-position-ids
    --reset-attention-mask --eod-mask-loss``) and unpacked (no flags: the same tokens, plain
    causal attention). The data flags are then the plan's (``data: megatron``, ``data-path``)."""
    document_tokens: int = 200_000
    """Tokens written per document mix."""

    def __post_init__(self) -> None:
        if self.scaling not in ("strong", "weak"):
            raise ValueError(f"preset {self.name}: scaling must be strong or weak")
        if self.grids and self.scaling != "strong":
            raise ValueError(f"preset {self.name}: explicit grids need strong scaling")
        for label in (*self.modes, *(x[0] for x in self.grids)):
            get_variant(label)
        names = [name for name, _, _ in self.documents]
        if len(set(names)) < len(names) or any(not re.fullmatch(r"[a-z0-9-]+", x) for x in names):
            raise ValueError(
                f"preset {self.name}: document mix names {names} must be distinct, of a-z 0-9 -"
            )
        for name, lo, hi in self.documents:
            if not 1 <= lo <= hi:
                raise ValueError(f"preset {self.name}: document mix {name}: need 1 <= {lo} <= {hi}")
        object.__setattr__(self, "model", MappingProxyType(dict(self.model)))
        object.__setattr__(self, "train", MappingProxyType(dict(self.train)))


def recorded_name(preset: Preset) -> str:
    """The preset as rows and titles name it: ``cpu-kernels``, or with a command-line selection
    ``cpu-kernels [modes lss,ring; kernels flash]``."""
    return f"{preset.name} [{preset.selection}]" if preset.selection else preset.name


@dataclass(frozen=True)
class RunSpec:
    """One trainer launch of a plan."""

    mode: str
    seq_parallel: int
    data_parallel: int
    seq_length: int
    repeat: int
    role: str
    """``grid`` (a mode at a grid point) or ``reference`` (the serial run efficiencies use)."""
    flags: Mapping[str, object] = field(default_factory=dict)
    """Every trainer flag (without dashes) except --out and --progress."""
    variant: str = ""
    """The variant label (`VARIANTS`); empty means the plain mode."""
    documents: str = ""
    """The document mix (`Preset.documents`) the run reads; empty: the preset's own data."""

    @property
    def label(self) -> str:
        return self.variant or self.mode

    @property
    def world_size(self) -> int:
        return self.seq_parallel * self.data_parallel

    @property
    def packed(self) -> bool:
        """Megatron-LM's document flags are on (attention within documents)."""
        return bool(self.flags.get("reset-attention-mask"))

    @property
    def setting(self) -> str:
        """``_dense``, ``_selective``, ``_dense_selective``; empty for flash without recompute;
        then, on a document mix, ``_MIX_packed`` or ``_MIX_unpacked``."""
        kernel = self.flags.get("attention-kernel", "flash")
        recompute = self.flags.get("recompute", "none")
        docs = f"_{self.documents}_{'packed' if self.packed else 'unpacked'}"
        return (
            (f"_{kernel}" if kernel != "flash" else "")
            + (f"_{recompute}" if recompute != "none" else "")
            + (docs if self.documents else "")
        )

    @property
    def config_id(self) -> str:
        """The configuration (every repeat of it shares this id): ``lss_N4_D1_l1024_dense``."""
        return (
            f"{self.label}_N{self.seq_parallel}_D{self.data_parallel}_l{self.seq_length}"
            f"{self.setting}"
        )

    @property
    def run_id(self) -> str:
        return f"{self.config_id}_r{self.repeat}"

    def trainer_args(self, out: Path | str) -> list[str]:
        """The trainer's command-line arguments, writing into `out`."""
        return argv(self.flags) + ["--out", str(out), "--progress", "off"]


@dataclass(frozen=True)
class Plan:
    preset: Preset
    runs: tuple[RunSpec, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    """(configuration id, the trainer's reason) for grid runs the trainer would reject."""
    seed: int = 0
    """The seed of the order within each round (`make_plan`)."""
    repeats: int = 1
    """Rounds: every configuration runs this many times, once per round."""
    configs: tuple[str, ...] = ()
    """The configuration ids in grid order (references first), how summary.csv lists them."""


class PresetError(InputError):
    """A compare preset file that does not load; the message names the file and every problem."""


_PLANNED = ("mode", "seq-parallel", "data-parallel", "seq-length", "out", "progress", "config")
PACKED_FLAGS = ("reset-position-ids", "reset-attention-mask", "eod-mask-loss")
"""Megatron-LM's document flags: on in a document mix's packed runs, off in its unpacked ones."""
_DOCUMENT_FLAGS = ("data", "data-path", "eod-token", *PACKED_FLAGS)
"""Trainer flags a preset with `Preset.documents` may not set: the plan sets them per mix."""
"""Trainer flags the plan sets for each run: a preset's ``model`` / ``train`` may not."""
_SIZE_UNITS = {"KiB": 1 << 10, "MiB": MiB, "GiB": GiB}
_REQUIRED = ("summary", "scaling", "seq-lengths", "model", "train")


def _typed(key: str, value, hint) -> tuple[object, str | None]:
    """`value` as the Preset field type `hint` wants it, or a problem naming `key`: no coercion
    but int -> float (YAML lists become tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:
        if not isinstance(value, list):
            return None, f"{key}: {value!r} is not a list"
        hints = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        if len(hints) != len(value):
            return None, f"{key}: {value!r} does not have {len(args)} items"
        items = [
            _typed(f"{key}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, hints, strict=True))
        ]
        problem = next((p for _, p in items if p), None)
        return (None, problem) if problem else (tuple(v for v, _ in items), None)
    if origin in (Union, UnionType):  # int | None
        if value is None:
            return None, None
        return _typed(key, value, next(a for a in args if a is not type(None)))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value, None
    want = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[hint]
    return None, f"{key}: {value!r} ({type(value).__name__}) is not {want}"


def _size(value) -> tuple[int | None, str | None]:
    """Bytes from an integer or ``"<n> KiB|MiB|GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, None
    number, _, unit = str(value).partition(" ")
    if isinstance(value, str) and number.isdigit() and unit in _SIZE_UNITS:
        return int(number) * _SIZE_UNITS[unit], None
    return None, f"memory-budget: {value!r} is not a size such as 64 MiB or 16 GiB"


def _trainer_flags(key: str, value, actions: Mapping) -> tuple[dict, list[str]]:
    """A ``model`` / ``train`` section: trainer flags typed as the trainer's own YAML presets
    are (`lss_megatron.strict_yaml.check_value`)."""
    if not isinstance(value, dict):
        return {}, [f"{key}: expected a mapping of trainer flags to values"]
    out, bad = {}, []
    for flag, v in value.items():
        if f"--{flag}" not in actions or flag in _PLANNED:
            why = "set by the plan" if flag in _PLANNED else "not a trainer flag"
            bad.append(f"{key}.{flag}: {why}")
            continue
        checked, problem = check_value(f"{key}.{flag}", v, actions[f"--{flag}"])
        if problem:
            bad.append(problem)
        # numbers stay as written (dist-timeout 120, not 120.0, on the command line)
        number = isinstance(v, int | float) and not isinstance(v, bool)
        out[flag] = v if number else checked
    return out, bad


def load_preset(path: Path) -> Preset:
    """The preset of one YAML file (named by the file's stem), strictly typed: unknown keys,
    missing keys, ill-typed values and trainer flags the trainer lacks are all reported at once
    as a `PresetError`."""
    try:
        data = load_file(path, "compare preset")
    except YamlFileError as e:
        raise PresetError(str(e)) from None
    if not isinstance(data, dict):
        raise PresetError(f"compare preset {path}: expected a mapping of keys to values")
    hints = get_type_hints(Preset)
    keys = {
        f.name.replace("_", "-"): f.name
        for f in fields(Preset)
        if f.name not in ("name", "selection")
    }
    keys["memory-budget"] = keys.pop("memory-budget-bytes")
    actions = trainer_actions()
    values: dict[str, object] = {"name": path.stem}
    bad = [f"missing key {k!r}" for k in _REQUIRED if k not in data]
    if "degrees" not in data and "grids" not in data:
        bad.append("needs degrees (or explicit grids)")
    for key, value in data.items():
        name = keys.get(str(key))
        if name is None:
            bad.append(f"unknown key {key!r}; expected one of {sorted(keys)}")
            continue
        if key in ("model", "train"):
            value, problems = _trainer_flags(key, value, actions)
        elif key == "memory-budget":
            value, problem = _size(value)
            problems = [problem] if problem else []
        else:
            value, problem = _typed(key, value, hints[name])
            problems = [problem] if problem else []
        bad += problems
        values[name] = value
    if values.get("documents"):
        bad += [
            f"train.{flag}: set by the plan for each document mix"
            for flag in _DOCUMENT_FLAGS
            if flag in values.get("train", {})
        ]
    if not bad:
        try:
            return Preset(**{"degrees": (), **values})
        except (ValueError, KeyError) as e:  # Preset's own checks (scaling, variant labels)
            bad.append(str(e).strip("'\""))
    raise PresetError(f"compare preset {path}: " + "; ".join(bad))


@cache
def all_presets() -> Mapping[str, Preset]:
    """Every compare preset: the YAML files of `compare_presets_dir`, by name."""
    folder = compare_presets_dir()
    files = sorted(folder.glob("*.yaml"), key=lambda f: f.stem)
    if not files:
        raise PresetError(f"{folder}: no compare presets (*.yaml) there")
    return MappingProxyType({f.stem: load_preset(f) for f in files})


def __getattr__(name: str):
    if name == "PRESETS":  # the former module constant, loaded on first use
        return all_presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_preset(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
    return presets[name]


PLAIN = ("flash", "none", "", False)
"""A run's setting (kernel, recompute, document mix, packed): the trainer's defaults."""


def _flags(
    preset: Preset,
    label: str,
    n: int,
    d: int,
    length: int,
    setting: tuple = PLAIN,
    data_dir: Path | None = None,
) -> dict[str, object]:
    variant = get_variant(label)
    flags: dict[str, object] = dict(
        mode=variant.mode, **{"seq-parallel": n, "data-parallel": d, "seq-length": length}
    )
    flags.update(preset.model)
    flags.update(preset.train)
    flags.update(variant.flags)
    kernel, recompute, mix, packed = setting
    if (kernel, recompute) != ("flash", "none"):  # the trainer's defaults stay implicit
        flags.update({"attention-kernel": kernel, "recompute": recompute})
    if mix:
        folder = data_dir if data_dir is not None else default_data_dir(preset)
        flags.update({"data": "megatron", "data-path": str(Path(folder) / mix)})
        flags.update(dict.fromkeys(PACKED_FLAGS, True) if packed else {})
    return flags


def default_data_dir(preset: Preset) -> Path:
    """Where a preset's document mixes live when no output folder is given (`analysis.compare`
    passes ``OUT/data``): ``runs/compare-NAME/data``, absolute."""
    return Path(f"runs/compare-{preset.name}/data").resolve()


def _run(
    preset: Preset,
    label: str,
    n: int,
    d: int,
    length: int,
    repeat: int,
    role: str,
    setting: tuple = PLAIN,
    data_dir: Path | None = None,
):
    variant = get_variant(label)
    return RunSpec(
        variant.mode,
        n,
        d,
        length,
        repeat,
        role,
        _flags(preset, label, n, d, length, setting, data_dir),
        "" if label == variant.mode else label,
        setting[2],
    )


def trainer_problem(run: RunSpec, data_elsewhere: bool = False) -> str | None:
    """The trainer's own verdict on `run` (None when it would start), without launching it.

    `data_elsewhere`: the data file lives on a cluster, so problems with ``--data-path`` here
    (typically: no such file) are not the run's.
    """
    known = trainer_flags()
    missing = [f"--{k}" for k in run.flags if f"--{k}" not in known]
    if missing:
        return f"this trainer has no {', '.join(missing)} (variant {run.label})"
    try:
        cfg = run_config(run.trainer_args("unused"), run.world_size)
    except ConfigError as e:
        return str(e)
    return "; ".join(problems(cfg, data_elsewhere)) or None


def grid_points(preset: Preset) -> list[tuple[str, int, int, int]]:
    """(role, N, D, l) in run order: each reference before the grid points that use it."""
    points: list[tuple[str, int, int, int]] = []
    if preset.grids:
        for length in preset.seq_lengths:
            points.append(("reference", 1, 1, length))
            for n, d in dict.fromkeys((n, d) for _, n, d in preset.grids):
                points.append(("grid", n, d, length))
        return points
    if preset.ranks is not None:  # equal ranks: P fixed, every N x D = P
        for length in preset.seq_lengths:
            points.append(("reference", 1, 1, length))
            points += [
                ("grid", n, preset.ranks // n, length)
                for n in preset.degrees
                if preset.ranks % n == 0
            ]
        return points
    for l0 in preset.seq_lengths:
        for d in preset.data_parallel:
            if preset.scaling == "weak":
                points.append(("reference", 1, d, l0))
                points += [("grid", n, d, l0 * n) for n in preset.degrees]
            else:
                ref = ("reference", 1, 1, l0)
                if ref not in points:
                    points.append(ref)
                points += [("grid", n, d, l0) for n in preset.degrees]
    return points


def make_plan(
    preset: Preset, repeats: int | None = None, seed: int = 0, data_dir: Path | None = None
) -> Plan:
    """Every run of `preset`, in launch order: `repeats` rounds (default the preset's own), each
    round every configuration once, in an order shuffled by ``random.Random(f"{seed}:{round}")``
    (so a plan is reproducible from its seed, which plan.json records). A run the trainer would
    reject is left out and listed in `Plan.skipped`. `data_dir`: where the document mixes are
    (`Preset.documents`; default `default_data_dir`); they need not exist yet."""
    repeats = preset.repeats if repeats is None else repeats
    skipped: list[tuple[str, str]] = []
    mixes = [(m, p) for m, _, _ in preset.documents for p in (True, False)] or [("", False)]
    settings = [(k, r, *m) for k in preset.kernels for r in preset.recomputes for m in mixes]
    planned: set[tuple] = set()
    configs: list[tuple] = []
    for role, n, d, length in grid_points(preset):
        if role == "reference":
            specs = [("serial", 1, d)]
        else:
            specs = [
                (m, n, d) for m in preset.modes if not preset.grids or (m, n, d) in preset.grids
            ]
            if preset.serial_at_scale:
                specs.append(("serial", 1, n * d))
        specs = [(*spec, setting) for setting in settings for spec in specs]
        specs = [s for s in specs if (s, length) not in planned]  # serial at P: once per l
        planned.update((s, length) for s in specs)
        for label, sn, sd, setting in specs:
            spec = _run(preset, label, sn, sd, length, 0, role, setting, data_dir)
            # document mixes are written when the comparison starts: not there yet
            problem = trainer_problem(spec, data_elsewhere=preset.cluster or bool(preset.documents))
            if problem is None:
                configs.append((label, sn, sd, length, role, setting))
            else:
                skipped.append((spec.config_id, problem))
    runs: list[RunSpec] = []
    for r in range(repeats):
        order = list(configs)
        random.Random(f"{seed}:{r}").shuffle(order)
        for label, sn, sd, length, role, setting in order:
            runs.append(_run(preset, label, sn, sd, length, r, role, setting, data_dir))
    ids = tuple(
        _run(preset, c[0], c[1], c[2], c[3], 0, c[4], c[5], data_dir).config_id for c in configs
    )
    return Plan(preset, tuple(runs), tuple(skipped), seed, repeats, ids)
