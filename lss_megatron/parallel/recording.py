"""The recording behind `comm.record()`: every collective a process issues, counted and timed.

``with comm.record() as log: ...`` (re-exported by `lss_megatron.parallel.comm`) collects every
collective issued by this process inside the block into ``log`` (a `CommLog`): `comm`'s own calls
with the category they name (`as_category`), and collectives issued by other code (Megatron's
tensor-parallel mappings, DeepSpeed), caught by wrapping `torch.distributed`'s primitives for the
duration of the block and categorised by the process group they run on (`tag_group`).

Bytes: what one rank sends under ring algorithms (the convention of `comm`'s docstring; `_BYTES`
reads them from each primitive's arguments). A collective on a group of one rank is not counted.

Torch versions (2.4 to 2.13): every name a version exposes for a primitive is wrapped
(`_ALIASES`: ``all_gather_into_tensor`` and ``_all_gather_base`` next to 2.13's
``all_gather_single``, likewise for reduce-scatter), in `torch.distributed`, in
``distributed_c10d`` and wherever another module bound the function object at import (Megatron's
``dist_all_gather_func``, DeepSpeed's backend instance), found by identity (`_bindings`). A
wrapped primitive that calls another (2.13's ``all_gather_into_tensor`` calls
``all_gather_single``; 2.4's ``_all_gather_base`` calls ``all_gather_into_tensor``) is counted
once, by the outermost wrapper, under the canonical op name (``all_gather``, ``reduce_scatter``).
Why wrappers and not a dispatch-level counter (a ``TorchDispatchMode`` on the c10d ops, as
torch's ``CommDebugMode``): docs/measurement.md, "How collectives are caught".

Time (``*_comm_time_s``): from the start of a collective to its completion, async ones included
(the returned work handle is wrapped in `AsyncWork`; its ``wait()`` ends the interval). On the
CPU (gloo) that is wall time; on CUDA it is measured with CUDA events on the current stream (NCCL
returns once the collective is queued, so wall time would be launch overhead): the start event
before the call, the end event after the current stream has been made to wait for the
collective. Events are read by `CommLog.summary()`, which the trainer calls after synchronising
the device. A work handle that is never waited on has no completion time: its interval is NaN.
Exposed time (``sp_exposed_s``): the part of that a rank spent blocked, waiting on the
collective instead of computing: a blocking collective's whole interval, an async one's from the
start of its ``wait()`` (`AsyncWork.wait`, the one place it is seen) to its completion (`_Span`).
The difference to ``sp_comm_time_s`` is what compute hid (docs/measurement.md).

A collective whose bytes cannot be read from its arguments raises under tests (pytest imported,
or ``LSS_STRICT_COMM=1``) and otherwise warns once per op and counts 0 bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

CATEGORIES = ("sp", "grad", "other")
STRICT_ENV = "LSS_STRICT_COMM"
"""``LSS_STRICT_COMM=1``: a collective whose bytes cannot be read raises (as under pytest)."""
_log = logging.getLogger(__name__)


@dataclass
class CommLog:
    """Calls and bytes per (op, category) seen while recording, on this rank."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    exposed: dict = field(default_factory=lambda: defaultdict(float))
    """Seconds this rank was blocked waiting on the collectives (`_Span.exposed_seconds`)."""

    pending: list = field(default_factory=list)  # (key, _Span) not read yet (CUDA events)

    def add(self, op: str, category: str, nbytes: int, seconds: float | _Span) -> None:
        self.calls[(op, category)] += 1
        self.bytes[(op, category)] += nbytes
        if isinstance(seconds, _Span):
            self.pending.append(((op, category), seconds))
        else:
            self.seconds[(op, category)] += seconds
            self.exposed[(op, category)] += seconds

    def _resolve(self) -> None:
        for key, span in self.pending:
            self.seconds[key] += span.seconds()
            self.exposed[key] += span.exposed_seconds()
        self.pending.clear()

    def count(self, op: str | None = None, category: str | None = None) -> int:
        return sum(
            c
            for (o, k), c in self.calls.items()
            if (op is None or o == op) and (category is None or k == category)
        )

    def nbytes(self, category: str | None = None) -> int:
        return sum(b for (_, k), b in self.bytes.items() if category is None or k == category)

    def time_s(self, category: str | None = None) -> float:
        self._resolve()
        return sum(t for (_, k), t in self.seconds.items() if category is None or k == category)

    def exposed_s(self, category: str | None = None) -> float:
        """Seconds blocked in waits on the collectives of `category` (all when None)."""
        self._resolve()
        return sum(t for (_, k), t in self.exposed.items() if category is None or k == category)

    def summary(self) -> dict:
        out = {}
        for cat in CATEGORIES:
            out[f"{cat}_comm_bytes"] = self.nbytes(cat)
            out[f"{cat}_comm_calls"] = self.count(category=cat)
            out[f"{cat}_comm_time_s"] = self.time_s(cat)
        out["sp_exposed_s"] = self.exposed_s("sp")
        return out


_recorders: list[CommLog] = []
_group_tags: dict[int, tuple[object, str]] = {}
_tls = threading.local()


def tag_group(group, category: str) -> None:
    """Collectives that other code runs on `group` count under `category` (default ``other``)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown comm category {category!r}; expected one of {CATEGORIES}")
    if group is not None:
        _group_tags[id(group)] = (group, category)


def _category_of(group) -> str:
    explicit = getattr(_tls, "category", None)
    if explicit is not None:
        return explicit
    tag = _group_tags.get(id(group)) if group is not None else None
    return tag[1] if tag is not None else "other"


@contextlib.contextmanager
def as_category(category: str):
    """Collectives issued inside count under `category` (`comm`'s own calls name theirs)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown comm category {category!r}; expected one of {CATEGORIES}")
    prev = getattr(_tls, "category", None)
    _tls.category = category
    try:
        yield
    finally:
        _tls.category = prev


# --- interception of torch.distributed primitives while recording ------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(group) -> int:
    return dist.get_world_size(group)


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


# op name -> bytes this rank sends (convention in the module docstring); tensors may come
# positionally or by keyword (DeepSpeed passes them by keyword)
def _t(a, k, i, *names):
    if len(a) > i:
        return a[i]
    for name in names:
        if name in k:
            return k[name]
    raise KeyError(names)


def _g(a, k, name):
    return _size(_arg(a, k, _GROUP_ARG[name], "group"))


_BYTES = {
    "all_gather_single": lambda a, k: (
        (_g(a, k, "all_gather_single") - 1) * _nbytes(_t(a, k, 1, "input_tensor", "input"))
    ),
    "reduce_scatter_single": lambda a, k: (
        (_g(a, k, "reduce_scatter_single") - 1) * _nbytes(_t(a, k, 0, "output", "output_tensor"))
    ),
    "all_reduce": lambda a, k: (
        2 * (_g(a, k, "all_reduce") - 1) * _nbytes(_t(a, k, 0, "tensor")) // _g(a, k, "all_reduce")
    ),
    "all_to_all_single": lambda a, k: (
        (_g(a, k, "all_to_all_single") - 1)
        * _nbytes(_t(a, k, 1, "input"))
        // _g(a, k, "all_to_all_single")
    ),
    "all_gather": lambda a, k: (_g(a, k, "all_gather") - 1) * _nbytes(_t(a, k, 1, "tensor")),
    "reduce_scatter": lambda a, k: (
        (_g(a, k, "reduce_scatter") - 1) * _nbytes(_t(a, k, 0, "output"))
    ),
    "all_to_all": lambda a, k: (
        sum(_nbytes(t) for t in _t(a, k, 1, "input_tensor_list"))
        * (_g(a, k, "all_to_all") - 1)
        // _g(a, k, "all_to_all")
    ),
    "broadcast": lambda a, k: (
        _nbytes(_t(a, k, 0, "tensor")) if dist.get_rank() == _arg(a, k, 1, "src") else 0
    ),
    "send": lambda a, k: _nbytes(_t(a, k, 0, "tensor")),
    "isend": lambda a, k: _nbytes(_t(a, k, 0, "tensor")),
    "recv": lambda a, k: 0,
    "irecv": lambda a, k: 0,
}
_GROUP_ARG = {
    "all_gather_single": 2,
    "reduce_scatter_single": 3,
    "all_reduce": 2,
    "all_to_all_single": 4,
    "all_gather": 2,
    "reduce_scatter": 3,
    "all_to_all": 2,
    "broadcast": 2,
    "send": 2,
    "isend": 2,
    "recv": 2,
    "irecv": 2,
}
# older names of the same primitives (torch 2.4-2.12; still there, deprecated, in 2.13): same
# arguments, so the same byte rule and group position
_ALIASES = {
    "all_gather_into_tensor": "all_gather_single",
    "_all_gather_base": "all_gather_single",
    "reduce_scatter_tensor": "reduce_scatter_single",
    "_reduce_scatter_base": "reduce_scatter_single",
}
for _alias, _base in _ALIASES.items():
    _BYTES[_alias], _GROUP_ARG[_alias] = _BYTES[_base], _GROUP_ARG[_base]
_saved: list[tuple[object, str, object]] = []  # (namespace, attribute, original)
_installs = 0
_warned: set[str] = set()


def _strict() -> bool:
    """Under tests (pytest imported, or ``LSS_STRICT_COMM=1``) unreadable bytes are an error."""
    return os.environ.get(STRICT_ENV) == "1" or "pytest" in sys.modules


def _unreadable(name: str, exc: Exception) -> int:
    """Bytes of a collective whose arguments could not be read: raise under tests, else warn
    once per op and count 0."""
    msg = (
        f"comm.record: cannot read the bytes of a {name} call ({type(exc).__name__}: {exc}); "
        "counted as 0 bytes"
    )
    if _strict():
        raise RuntimeError(msg) from exc
    if name not in _warned:
        _warned.add(name)
        _log.warning("%s (warned once per op)", msg)
    return 0


def _op_name(name: str) -> str:
    """The canonical op a primitive is logged under (``all_gather``, ``reduce_scatter``, ...)."""
    return _ALIASES.get(name, name).removesuffix("_single")


class _Span:
    """Start-to-completion time of one collective, and the part of it this rank was blocked
    waiting (exposed): wall time, or CUDA events on the current stream for CUDA tensors (read
    after the device is synchronised).

    A blocking collective is exposed from start to end. An async one only from the start of its
    ``wait()`` to the end (`begin_wait`): on the CPU the wall time the caller sat in ``wait()``;
    on CUDA the time the current stream stalled between an event recorded before ``wait()`` and
    one recorded after it (``wait()`` makes the stream wait for the collective), so compute
    queued behind the collective's launch counts as hiding it."""

    def __init__(self, cuda: bool):
        self.cuda, self.end, self.wait_start = cuda, None, None
        self.start = self._now()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_wait(self) -> None:
        if self.wait_start is None and self.end is None:
            self.wait_start = self._now()

    def stop(self) -> None:
        if self.end is None:
            self.end = self._now()

    def _between(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def seconds(self) -> float:
        if self.end is None:
            return math.nan  # never waited on: no completion time
        return self._between(self.start, self.end)

    def exposed_seconds(self) -> float:
        if self.end is None:
            return math.nan
        begin = self.wait_start if self.wait_start is not None else self.start
        return self._between(begin, self.end)


class AsyncWork:
    """An async collective's work handle (what ``async_op=True`` returned, wrapped while
    recording) whose ``wait()`` also ends the collective's `_Span`. Everything else is the
    handle's own. The time a rank is blocked in ``wait()`` (an exposed wait: the collective did
    not finish behind the compute issued since its launch) is measured here, and only here."""

    def __init__(self, work, span: _Span):
        self._work, self._span = work, span

    def wait(self, *args, **kwargs):
        self._span.begin_wait()
        out = self._work.wait(*args, **kwargs)
        self._span.stop()
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


def _is_cuda(args, kwargs) -> bool:
    for x in (*args, *kwargs.values()):
        if torch.is_tensor(x):
            return x.is_cuda
        if isinstance(x, (list, tuple)) and x and torch.is_tensor(x[0]):
            return x[0].is_cuda
    return False


def _is_async(name: str, args, kwargs) -> bool:
    if name in ("isend", "irecv"):
        return True
    if name in ("send", "recv"):  # blocking; the argument after the group is a tag
        return False
    return bool(_arg(args, kwargs, _GROUP_ARG[name] + 1, "async_op", False))


def _wrap(name: str, fn):
    def wrapped(*args, **kwargs):
        if getattr(_tls, "depth", 0):  # an inner primitive of a call already counted
            return fn(*args, **kwargs)
        group = _arg(args, kwargs, _GROUP_ARG[name], "group")
        if _size(group) == 1:
            return fn(*args, **kwargs)
        try:
            nbytes = int(_BYTES[name](args, kwargs))
        except Exception as exc:  # noqa: BLE001 - outside tests, counting never breaks a call
            nbytes = _unreadable(name, exc)
        category = _category_of(group)
        span = _Span(_is_cuda(args, kwargs))
        _tls.depth = 1
        try:
            work = fn(*args, **kwargs)
        finally:
            _tls.depth = 0
        for log in _recorders:
            log.add(_op_name(name), category, nbytes, span)
        if work is not None and _is_async(name, args, kwargs):
            return AsyncWork(work, span)
        span.stop()
        return work

    wrapped.__wrapped__ = fn
    wrapped._lss_comm_wrapper = True
    return wrapped


_binding_cache: tuple[object, list] = (None, [])


def _bindings(originals: dict[int, str]) -> list[tuple[object, str, str]]:
    """(namespace, attribute, primitive) for every module global, and attribute of a module-level
    object (DeepSpeed's backend instance), that IS one of the original primitive functions:
    torch's own namespaces and whatever bound them at import. A scan takes ~0.1 s: it is cached
    until modules are added or the primitives change."""
    global _binding_cache
    key = (len(sys.modules), frozenset(originals))
    if _binding_cache[0] == key:
        return _binding_cache[1]
    found = []
    for mod in list(sys.modules.values()):
        scope = getattr(mod, "__dict__", None)
        if not isinstance(scope, dict):
            continue
        for owner, attrs in [(mod, scope), *_instances(scope)]:
            for attr, value in list(attrs.items()):
                if id(value) in originals and not getattr(value, "_lss_comm_wrapper", False):
                    found.append((owner, attr, originals[id(value)]))
    _binding_cache = (key, found)
    return found


def _instances(scope: dict) -> list[tuple[object, dict]]:
    """Module-level objects (not modules, classes or functions) and their instance dicts."""
    out = []
    for value in list(scope.values()):
        kind = type(value)  # not isinstance: that reads __class__, which may warn or fail
        if issubclass(kind, (type, type(sys))) or callable(value):
            continue
        try:
            attrs = object.__getattribute__(value, "__dict__")
        except (AttributeError, TypeError):
            continue
        if isinstance(attrs, dict):
            out.append((value, attrs))
    return out


def _install() -> None:
    global _installs
    _installs += 1
    if _installs > 1:
        return
    _saved.extend(_rebind(_BYTES, _wrap))


def _rebind(names, wrap) -> list[tuple[object, str, object]]:
    """Replace each primitive of `names` by ``wrap(name, fn)`` (one wrapper per original function)
    wherever it is bound (`_bindings`); the (namespace, attribute, original) replaced."""
    originals: dict[int, str] = {}
    for name in names:
        for ns in (dist, c10d):
            fn = getattr(ns, name, None)
            if fn is not None and not getattr(fn, "_lss_comm_wrapper", False):
                originals.setdefault(id(fn), name)
    saved, wrappers = [], {}
    for owner, attr, name in _bindings(originals):
        fn = getattr(owner, attr, None)
        if id(fn) not in originals:  # rebound since the scan
            continue
        if id(fn) not in wrappers:
            wrappers[id(fn)] = wrap(name, fn)
        saved.append((owner, attr, fn))
        setattr(owner, attr, wrappers[id(fn)])
    return saved


def _uninstall() -> None:
    global _installs
    _installs -= 1
    if _installs > 0:
        return
    for owner, attr, fn in reversed(_saved):
        setattr(owner, attr, fn)
    _saved.clear()


@contextlib.contextmanager
def primitives_wrapped(wrap: Callable[[str, Callable], Callable], names: Iterable[str]):
    """For the block, each `torch.distributed` primitive of `names` (names of `_BYTES` or
    `_ALIASES`) replaced by ``wrap(name, fn)`` wherever it is bound: torch's namespaces and
    whatever bound it at import (found by identity, as `record` finds them). The replacements are
    plain functions, so a `record()` inside the block counts through them; entered inside a
    `record()` it would miss the recorded bindings, so that raises."""
    if _installs:
        raise RuntimeError("primitives_wrapped: enter it outside comm.record()")
    saved = _rebind(names, wrap)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


@contextlib.contextmanager
def record() -> Iterator[CommLog]:
    """Record every collective issued by this process inside the block."""
    log = CommLog()
    _recorders.append(log)
    _install()
    try:
        yield log
    finally:
        _uninstall()
        _recorders.remove(log)
