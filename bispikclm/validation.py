"""Checks of user input made before anything runs or is written: values against their declared types (recipe
sections, configs) and text files. Each failure is a one-line :class:`~bispikclm.errors.UserError` that names the
file, field or value at fault. A leaf: it imports nothing of the package but its errors."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError

def _is_type(value, name: str) -> bool:
    """Whether ``value`` is of the simple annotation ``name`` (``int``, ``float``, ``str``, ``bool``, ``dict``,
    ``None``, ``list[int]``, ``tuple[float, float]``); numbers must be finite, and booleans are not numbers."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "None":
        return value is None
    if name == "int":
        return number and isinstance(value, int)
    if name == "float":
        return number and math.isfinite(value)
    if name in ("str", "bool", "dict"):
        return isinstance(value, {"str": str, "bool": bool, "dict": dict}[name])
    if name.startswith(("list[", "tuple[")):
        items = [i.strip() for i in name[name.index("[") + 1:-1].split(",")]
        if not isinstance(value, (list, tuple)) or (name.startswith("tuple") and len(value) != len(items)):
            return False
        return all(_is_type(v, items[0 if name.startswith("list") else i]) for i, v in enumerate(value))
    raise TypeError(f"no check for the annotation {name!r}")


def check_types(where: str, values: dict, annotations: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    """UserError unless every key of ``values`` is declared in ``annotations`` (or in ``extra``, checked by the
    caller) and its value has the declared type (string annotations such as ``"int | None"``)."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of settings, got {type(values).__name__} {values!r}")
    unknown = sorted(set(values) - set(annotations) - set(extra))
    if unknown:
        raise UserError(f"{where} has unknown settings {unknown} (known: {sorted([*annotations, *extra])})")
    for key, value in values.items():
        if key in annotations and not any(_is_type(value, t.strip()) for t in annotations[key].split("|")):
            raise UserError(f"{where}.{key} must be {annotations[key]}, got {type(value).__name__} {value!r}")


def need(condition: bool, where: str, what: str, value) -> None:
    """UserError ``"{where} {what}, got {value!r}"`` unless ``condition``."""
    if not condition:
        raise UserError(f"{where} {what}, got {value!r}")


def check_text_file(path: str | Path, what: str = "text file") -> Path:
    """``path`` if it is a readable, non-empty UTF-8 text file; else a UserError ``cannot read {what} {path}:
    {reason}`` (not found, a folder, binary, not UTF-8, no text). Reads the file once, in blocks."""
    path = Path(path)

    def fail(reason: str):
        raise UserError(f"cannot read {what} {path}: {reason}")

    if not path.is_file():
        fail("it is a folder" if path.is_dir() else "no such file")
    any_text = False
    try:
        with path.open(encoding="utf-8") as handle:
            while block := handle.read(1 << 20):
                if "\x00" in block:
                    fail("it is binary (it holds NUL bytes), not text")
                any_text = any_text or bool(block.strip())
    except UnicodeDecodeError as err:
        fail(f"it is not UTF-8 text (byte {err.start} of a block: {err.reason})")
    except OSError as err:
        fail(str(err.strerror))
    if not any_text:
        fail("it holds no text")
    return path
