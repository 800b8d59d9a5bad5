"""`${key.path}` references in a composed config: resolved after fragments, task file and overrides, so an override
reaches every place that refers to it (`size: ${data.image_size}`)."""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from pipeline.errors import UserError, did_you_mean

# `${a.b.c}`: the value at key path a.b.c of the merged config.
_REFERENCE = re.compile(r"\$\{([^${}]*)\}")
_MISSING = object()


def interpolate(raw: dict, schema: type[BaseModel], source: str = "config") -> dict:
    """`raw` with every `${key.path}` replaced by the value at that key path.

    A string that is exactly one reference takes the value with its type (`height: ${data.image_size}` is an int); a
    reference inside longer text is replaced by the value as text. References may point at values that hold
    references. A key the config does not set resolves to the schema's default (`data.image_size` is 224 unless set),
    so a fragment can refer to any field. An unknown key, or a reference that leads back to itself, raises `UserError`
    naming it and where it is used.
    """

    def lookup(key: str, used_in: str, chain: tuple[str, ...]) -> Any:
        if key in chain:
            loop = " -> ".join((*chain[chain.index(key):], key))
            raise UserError(f"{source}: ${{{key}}} in {used_in} refers back to itself ({loop}); "
                            "set one of them to a value")
        value = _get(raw, key)
        if value is _MISSING:
            value = _schema_default(schema, key)
        if value is _MISSING:
            known = _key_paths(raw) | _key_paths(_schema_tree(schema))
            hint = did_you_mean(key, known) or "; write ${section.key} with a full key path such as ${data.image_size}"
            raise UserError(f"{source}: ${{{key}}} in {used_in} names no config key{hint}")
        return resolve(value, key, (*chain, key))

    def resolve(node: Any, where: str, chain: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v, f"{where}.{k}" if where else str(k), chain) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, f"{where}[{i}]", chain) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _REFERENCE.fullmatch(node.strip())
        if whole:  # the value itself, with its type
            return lookup(whole.group(1).strip(), where, chain)

        def text(match: re.Match) -> str:
            value = lookup(match.group(1).strip(), where, chain)
            if isinstance(value, (dict, list)):
                raise UserError(f"{source}: ${{{match.group(1)}}} in {where} is a section or list and cannot be "
                                f"part of the text '{node}'; refer to a single value")
            return str(value)

        return _REFERENCE.sub(text, node)

    return resolve(raw, "", ())


def _get(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _schema_default(schema: type[BaseModel], key: str) -> Any:
    """The default of the field at `key` (its sections' defaults are model instances), as YAML would give it."""
    parts = key.split(".")
    field = schema.model_fields.get(parts[0])
    if field is None or field.is_required():
        return _MISSING
    node: Any = field.get_default(call_default_factory=True)
    for part in parts[1:]:
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return _MISSING
        node = getattr(node, part)
    return to_jsonable_python(node)  # sections as dicts, tuples as lists


def _schema_tree(schema: type[BaseModel]) -> dict:
    """The schema's defaults as a nested dict (required fields left out): the key paths a reference may name."""
    return {name: _schema_default(schema, name) for name, field in schema.model_fields.items()
            if not field.is_required()}


def _key_paths(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict):
            paths |= _key_paths(value, f"{path}.")
    return paths
