"""Typed config values: one rule set for every config dataclass (model configs and run configs), and the sectioned
run configs' files and flags: :func:`load_config` (TOML / YAML / JSON), :func:`merge_sections`,
:func:`apply_overrides` (``--set section.key=value``).

A value that arrives from a TOML / YAML / JSON file, a saved ``config.json`` or a ``--set key=value`` flag is
converted to the type its dataclass field declares, or rejected with a ``ValueError`` that names the key and
the expected type. Without this a wrong type travels until it breaks something far away (``--set
model.overrides={"depth":2}`` used to end in "TypeError: 'str' object is not a mapping" inside the loop).

Conversions are the lossless ones a user means: an int where a float is wanted, ``1e3`` where an int is
wanted (YAML 1.1 reads ``1e-4`` as a string, so numeric strings are numbers), ``"true"`` for a bool, a list
for a tuple, a TOML inline table or JSON object text for a dict, ``none`` / ``null`` for an optional field.
Anything else is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package
    import tomli as tomllib

__all__ = ["apply_overrides", "coerce", "field_types", "load_config", "merge_sections", "parse_text", "typed_fields"]

_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
          dict: "a table such as {depth = 2} or {\"depth\": 2}", list: "a list such as [1, 2]",
          tuple: "a list such as [0.9, 0.98]", type(None): "none"}  # fmt: skip


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of a dataclass (string annotations evaluated once)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _describe(annotation: Any) -> str:
    if annotation in _NAMES:
        return _NAMES[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin in _NAMES:
        return _NAMES[origin]
    return getattr(annotation, "__name__", str(annotation))


def _parse_structured(text: str) -> Any:
    """A TOML value, else a JSON value; ``text`` itself where neither parses."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_text(text: str, annotation: Any = Any) -> Any:
    """The value of ``--set key=TEXT`` before :func:`coerce`: a string field takes the text as written (quotes
    optional), every other field a TOML or JSON value (``3``, ``1e-4``, ``true``, ``[0.9, 0.98]``, ``{depth = 2}``,
    ``{"depth": 2}``); text that parses as neither stays a string and is judged by :func:`coerce`."""
    text = text.strip()
    if annotation is str:
        value = _parse_structured(text)
        return value if isinstance(value, str) else text
    return _parse_structured(text)


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as the type ``annotation`` declares, or a ValueError naming ``key`` and the expected type."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ValueError:
                continue
        raise _type_error(value, annotation, key)
    base = origin or annotation
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return coerce(float(value) if any(c in value for c in ".eE") else int(value), int, key)
            except ValueError:
                pass
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is dict:
        if isinstance(value, str):
            value = _parse_structured(value)
        if isinstance(value, dict):
            return dict(value)
    elif base in (list, tuple):
        if isinstance(value, str):
            value = _parse_structured(value)
        if isinstance(value, (list, tuple)):
            args = typing.get_args(annotation)
            item = args[0] if args and (base is list or (len(args) == 2 and args[1] is Ellipsis)) else Any
            items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return base(items)
    else:  # a type these configs do not use: taken as it is
        return value
    raise _type_error(value, annotation, key)


def _type_error(value: Any, annotation: Any, key: str) -> ValueError:
    return ValueError(f"{key} expects {_describe(annotation)}, got {value!r}")


def typed_fields(cls: type, values: dict[str, Any], owner: str) -> dict[str, Any]:
    """``values`` checked against the fields of dataclass ``cls``: unknown keys and wrong types raise a
    ValueError that names them (``owner`` prefixes the key, e.g. ``model.overrides``)."""
    if not isinstance(values, dict):
        raise ValueError(f"{owner} expects {_NAMES[dict]}, got {values!r}")
    known = field_types(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{owner}.{k}' for k in unknown)}; known {owner} keys: "
                         f"{', '.join(sorted(known))}")
    return {k: coerce(v, known[k], f"{owner}.{k}") for k, v in values.items()}


# ------------------------------------------------------------------ sectioned configs: files and --set flags


def merge_sections(cfg: Any, values: dict[str, Any], source: str) -> None:
    """Merge ``{"section": {"key": value}}`` into a sectioned config dataclass (pretraining, fine-tuning and
    HuBERT configs alike) and validate it. Every value is converted to its field's type (``ssamba.fields``);
    unknown sections / keys and wrong types raise a ValueError naming them and ``source``. All or nothing:
    after an error the config is unchanged."""
    before = copy.deepcopy(cfg.__dict__)
    try:
        sections = field_types(type(cfg))
        for section, entries in values.items():
            if section not in sections:
                raise ValueError(f"unknown config section {section!r}; known: {', '.join(sorted(sections))}")
            if not dataclasses.is_dataclass(sections[section]):  # a top-level key (e.g. HuBERT's test)
                setattr(cfg, section, coerce(entries, sections[section], section))
                continue
            if not isinstance(entries, dict):
                raise ValueError(f"[{section}] must be a table of keys, got {entries!r}")
            target = getattr(cfg, section)
            for key, value in typed_fields(type(target), entries, section).items():
                setattr(target, key, value)
        cfg.validate()
    except ValueError as e:
        cfg.__dict__.update(before)
        raise ValueError(f"{source}: {e}") from None


def apply_overrides(cfg: Any, pairs: list[str]) -> None:
    """``--set section.key=value`` on any sectioned config, the text parsed for the field's type (TOML or JSON
    values; a string field takes the text as written); ``model.overrides.depth=2`` sets one model override,
    checked against the model's config by ``validate``. Errors name the flag, the key and the expected type."""
    for pair in pairs:
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        source = f"--set {pair}"
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"{source}: expected section.key=value")
        section, name, *rest = parts
        sections = field_types(type(cfg))
        if section not in sections or not dataclasses.is_dataclass(sections[section]):
            raise ValueError(f"{source}: unknown config section {section!r}; known: "
                             f"{', '.join(s for s, t in sections.items() if dataclasses.is_dataclass(t))}")
        fields = field_types(sections[section])
        if name in fields and rest and (fields[name] is not dict or len(rest) != 1):
            raise ValueError(f"{source}: {section}.{name} is not a table, so {key.strip()} does not exist")
        if name in fields and rest:  # one entry of a table, e.g. model.overrides.depth: typed in validate
            value = {**getattr(getattr(cfg, section), name), rest[0]: parse_text(text)}
        else:  # (an unknown key is named, with the known ones, by merge_sections)
            value = parse_text(text, fields.get(name, Any))
        merge_sections(cfg, {section: {name: value}}, source)


def load_config(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``, e.g. a run's saved config.json) file as a
    dict of sections. A malformed file is a ValueError naming it."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml  # only YAML configs need it

        try:
            values = yaml.safe_load(text) or {}  # safe_load: plain data, never Python objects
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: cannot read the config: {e}") from e
    else:
        try:
            values = json.loads(text) if suffix == ".json" else tomllib.loads(text)
        except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ValueError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds sections (a mapping), got {type(values).__name__}")
    return values
