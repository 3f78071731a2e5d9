"""Strict typing of YAML preset values against the command line's own options.

A preset key is a flag name (``seq-length: 1024``). Its YAML value must already have the flag's
type; nothing is coerced silently:

* switches (``no-causal``, ``skip-nonfinite``, ...) take YAML booleans only: ``"false"`` (a string)
  would be truthy and turn the switch ON, so it is an error;
* integer flags take YAML integers only: ``steps: 4.7`` is an error, not 4; ``true`` is an error;
* float flags take numbers (or a string that is a number: PyYAML reads ``1e-3`` as a string);
* text flags take strings, and one of the flag's choices where it has them;
* an empty value (``steps:``) only where the flag's default is empty.

`check_value` returns the value to use or a problem naming the key and the value (shown short:
`reprlib`, never a value expanded in full).

`load_file(path, flag)` reads a YAML file defensively, raising `YamlFileError` with one line:
only a regular file (a FIFO would block the reader forever, a folder is not a file), at most
`MAX_BYTES`, text (UTF-8 without NUL bytes), a key given twice in one mapping refused (PyYAML keeps
the last silently), and an alias bomb refused by the size it expands to (`MAX_NODES`, counted on
the composed node graph without expanding it), so nested aliases never hang a command.
"""

from __future__ import annotations

import argparse
import os
import reprlib
import stat
from pathlib import Path

import yaml

MAX_BYTES = 1 << 20
"""A preset or compare preset is a few hundred bytes; a megabyte is not a preset."""
MAX_NODES = 100_000
"""Values a document may expand to (aliases counted at every use)."""
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


class YamlFileError(ValueError):
    """A YAML file that cannot be used; the message (one line) names the file and why."""


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader itself refuses an unhashable key, with its position
                if key in seen:
                    raise _DuplicateKey(
                        f"key {_SHORT.repr(key)} given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); only one value can hold"
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root, limit: int) -> int:
    """How many nodes `root` stands for with every alias expanded (memoised per node, so the
    count itself is linear in the composed graph); stops counting past `limit`."""
    memo: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = limit + 1  # a cycle (a recursive alias) counts as too large
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(min(size(x), limit + 1) for x in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(min(size(k), limit + 1) + min(size(v), limit + 1) for k, v in node.value)
        else:
            n = 1
        memo[id(node)] = min(n, limit + 1)
        return memo[id(node)]

    return size(root)


def load_file(path: str | Path, flag: str = "--config"):
    """The YAML document in `path` (None when empty); `YamlFileError` (one line) otherwise."""
    path = Path(path)
    where = f"{flag} {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise YamlFileError(f"{where}: no such file") from None
    except OSError as e:
        raise YamlFileError(f"{where}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise YamlFileError(f"{where}: is a folder, not a YAML file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise YamlFileError(f"{where}: is {kind}, not a YAML file")
    if st.st_size > MAX_BYTES:
        raise YamlFileError(f"{where}: {st.st_size:,} bytes, more than a preset ({MAX_BYTES:,})")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        raise YamlFileError(f"{where}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise YamlFileError(f"{where}: not a text file (not UTF-8: binary?)") from None
    if "\x00" in text:
        raise YamlFileError(f"{where}: not a text file (NUL bytes: binary?)")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_NODES) > MAX_NODES:
            raise YamlFileError(
                f"{where}: expands to more than {MAX_NODES:,} values through nested aliases "
                "(an alias bomb?); a preset is a flat mapping"
            )
        return loader.construct_document(node)
    except _DuplicateKey as e:
        raise YamlFileError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise YamlFileError(f"{where}: not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise YamlFileError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()


_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction)


def _kind(action: argparse.Action) -> str:
    if isinstance(action, _SWITCHES):
        return "switch"
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    return "str"


def check_value(key: str, value, action: argparse.Action) -> tuple[object, str | None]:
    """(the value for `action`, None) or (None, a problem naming `key` and `value`)."""
    kind = _kind(action)
    shown = f"{key}: {_SHORT.repr(value)} ({type(value).__name__})"
    if value is None:
        if action.default is None and kind != "switch":
            return None, None
        return None, f"{key}: empty value; expected {_expected(kind, action)}"
    if kind == "switch":
        if not isinstance(value, bool):
            return None, f"{shown} is not a boolean; write true or false without quotes"
        return value, None
    if isinstance(value, bool):
        return None, f"{shown} is a boolean; expected {_expected(kind, action)}"
    if kind == "int" and not isinstance(value, int):
        return None, f"{shown} is not an integer"
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None, f"{shown} is not a number"
        elif not isinstance(value, int | float):
            return None, f"{shown} is not a number"
        value = float(value)
    if kind == "str" and not isinstance(value, str):
        return None, f"{shown} is not a string; expected {_expected(kind, action)}"
    if action.choices is not None and value not in action.choices:
        return None, f"{key}: {_SHORT.repr(value)} is not one of {list(action.choices)}"
    return value, None


def _expected(kind: str, action: argparse.Action) -> str:
    if action.choices is not None:
        return f"one of {list(action.choices)}"
    return {"switch": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[
        kind
    ]
