"""YAML recipes: ``quickstart`` (CPU, minutes), ``opt-125m`` and ``opt-1.3b`` (the paper's settings), ``smollm2-135m``
(a Llama-family teacher)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import UserError

RECIPES = Path(__file__).parent


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (``quickstart``, ``opt-125m``, ``opt-1.3b``) or by the path of a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise UserError(f"no recipe {name_or_path!r}: not a file and not one of {known}")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must be a mapping of sections")
    return recipe


def parse_overrides(items: list[str]) -> dict:
    """``["section.key=value", "key=value", ...]`` (values parsed as YAML) -> nested ``{section: {key: value}}``."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.lr=0.001")
        node = out
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
