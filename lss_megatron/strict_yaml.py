"""Strict typing of YAML preset values against the command line's own options.

A preset key is a flag name (``seq-length: 1024``). Its YAML value must already have the flag's
type; nothing is coerced silently:

* switches (``no-causal``, ``skip-nonfinite``, ...) take YAML booleans only: ``"false"`` (a string)
  would be truthy and turn the switch ON, so it is an error;
* integer flags take YAML integers only: ``steps: 4.7`` is an error, not 4; ``true`` is an error;
* float flags take numbers (or a string that is a number: PyYAML reads ``1e-3`` as a string);
* text flags take strings, and one of the flag's choices where it has them;
* an empty value (``steps:``) only where the flag's default is empty.

`check_value` returns the value to use or a problem naming the key and the value.
"""

from __future__ import annotations

import argparse

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
    shown = f"{key}: {value!r} ({type(value).__name__})"
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
        return None, f"{key}: {value!r} is not one of {list(action.choices)}"
    return value, None


def _expected(kind: str, action: argparse.Action) -> str:
    if action.choices is not None:
        return f"one of {list(action.choices)}"
    return {"switch": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[
        kind
    ]
