"""One configuration system for every stage.

A command's configuration is a tree of ``kw_only`` dataclasses (its *schema*). It is
loaded strictly from a YAML file under ``configs/`` and overridden from the command line
as ``dotted.key=value``. Anything that does not fit the schema (an unknown key, a value
of the wrong type, a required value left unset) raises :class:`ConfigError` naming the key
and where it came from, before any work starts.

YAML stays data:
- ``base: other.yaml`` at the top of a file merges that file first (paths are relative to
  the file that names them).
- A section whose schema type is a dataclass may be given as a string: the path of a YAML
  file holding that section (``parallel: ../deepspeed/zero2.yaml``), relative to the file,
  then to ``configs/``. An override can swap it (``parallel=deepspeed/zero3.yaml``).
- A dataclass may define ``validate(self)`` for cross-field checks; it runs after loading.
- A section whose keys depend on a registry entry is dispatched by name, one way for every
  registry: a :class:`Section` subclass (``model: {name: clip_vit_b32, ...}``, a list of
  ``tasks``) takes the name from its ``name`` key; :func:`with_sections` gives a schema one
  section per registered entry, named after it (the curation steps' ``clip_score: {...}``).
  Either way the entry's own ``Config`` is loaded as strictly as any other schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from pipeline.core.errors import UserError
from pipeline.core.io import atomic_write
from pipeline.core.registry import Registry

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
T = TypeVar("T")
_CLI = "the command line"


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key and its source."""


# ---------------------------------------------------------------------------- loading


def load(schema: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build ``schema`` from the YAML file at ``path`` (optional) plus ``key=value`` overrides."""
    path = None if path is None else _resolve(str(path), Path.cwd())
    raw, origin = ({}, {}) if path is None else _read_yaml(path)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        origin[key] = _CLI
    return _build(schema, raw, prefix="", origin=origin, base_dir=path.parent if path else CONFIG_ROOT)


def from_dict(schema: type[T], data: dict, source: str = "a dict") -> T:
    """Build ``schema`` from a plain dict (e.g. the config stored in a checkpoint)."""
    return _build(schema, data, prefix="", origin={"": source}, base_dir=CONFIG_ROOT)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is written next to every output)."""
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config, atomically, so that the run can be repeated."""
    with atomic_write(str(path), "w") as f:
        f.write(dump(cfg))


def add_arguments(parser: argparse.ArgumentParser, default: str | Path | None = None) -> None:
    """The ``--config FILE [key=value ...]`` arguments shared by every command."""
    parser.add_argument("--config", default=str(default) if default else None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def from_args(schema: type[T], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> T:
    """Load from parsed ``add_arguments`` args; ``extra`` maps dotted keys to values given as flags."""
    overrides = list(args.overrides)
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return load(schema, args.config, overrides)


# ---------------------------------------------------------------------------- sections dispatched by name


@dataclasses.dataclass(kw_only=True)
class Section:
    """A section whose schema is the ``Config`` of the ``registry`` entry its ``name`` key picks.

    Subclass it with ``registry = SOME_REGISTRY``; the entry's ``Config`` (which may or may not
    derive from the subclass) is then what the loader builds."""

    name: str
    registry: ClassVar[Registry]


def with_sections(name: str, base: type, registry: Registry) -> type:
    """Schema ``name``: ``base`` plus one section per entry of ``registry``, named after it and
    typed by its ``Config`` (with that Config's defaults): a new entry needs no edit of ``base``.
    Assign it to ``name`` in ``base``'s module (so that it pickles)."""
    fields = [(entry, registry.config(entry), dataclasses.field(default_factory=registry.config(entry)))
              for entry in registry.names()]
    schema = dataclasses.make_dataclass(name, fields, bases=(base,), kw_only=True)
    schema.__module__, schema.__doc__ = base.__module__, base.__doc__
    return schema


def _dispatch(schema: type, raw: dict, where: str) -> type:
    """The schema of a :class:`Section`: its registry entry's ``Config``."""
    registry = schema.registry
    if "name" not in raw:
        raise ConfigError(f"{where}: needs a 'name', one of: {', '.join(registry.names())}")
    try:
        return registry.config(raw["name"])
    except KeyError as err:
        raise ConfigError(f"{where}: {err.args[0]}") from None


# ---------------------------------------------------------------------------- YAML files


def _resolve(name: str, base_dir: Path) -> Path:
    for candidate in (base_dir / name, CONFIG_ROOT / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name!r} not found (looked in {base_dir} and {CONFIG_ROOT})")


def _read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    """Read a YAML file (with its ``base:`` chain) into a dict and a key -> source-file map."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    merged, origin = {}, {}
    if "base" in data:
        merged, origin = _read_yaml(_resolve(str(data.pop("base")), path.parent))
    # A dotted key (``parallel.grad_clip: 1.0``) sets one key inside a section given as a file.
    dotted = {key: data.pop(key) for key in [k for k in data if isinstance(k, str) and "." in k]}
    _deep_merge(merged, data)
    for key, value in dotted.items():
        _set_dotted(merged, key, value)
    origin.update({key: str(path) for key in [*_dotted_keys(data), *dotted]})
    origin[""] = str(path)
    return merged, origin


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _dotted_keys(data: dict, prefix: str = ""):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from _dotted_keys(value, dotted + ".")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} on {_CLI} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            # A section given as a file path stays a path; dotted overrides go into it later.
            child = {"__file__": child} if isinstance(child, str) else {}
            node[part] = child
        node = child
    node[leaf] = value


# ---------------------------------------------------------------------------- building


def _source(origin: dict[str, str], key: str) -> str:
    while True:
        if key in origin:
            return origin[key]
        if "." not in key:
            return origin.get("", _CLI)
        key = key.rsplit(".", 1)[0]


def _build(schema: type, raw: Any, prefix: str, origin: dict[str, str], base_dir: Path) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if isinstance(raw, str):  # a section given as a file path
        raw = {"__file__": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where!r} in {_source(origin, prefix.rstrip('.'))} must be a mapping, got {raw!r}")
    if "__file__" in raw:
        file_key = prefix.rstrip(".")
        path = _resolve(raw.pop("__file__"), base_dir)
        included, _ = _read_yaml(path)
        _deep_merge(included, raw)
        from_file = {f"{prefix}{k}": str(path) for k in _dotted_keys(included)}
        origin = {**origin, **{k: v for k, v in from_file.items() if origin.get(k) != _CLI}}
        origin[file_key] = str(path)
        raw, base_dir = included, path.parent
    if isinstance(schema, type) and issubclass(schema, Section):  # its keys depend on its `name`
        schema = _dispatch(schema, raw, f"{where!r} in {_source(origin, prefix.rstrip('.'))}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"unknown key '{prefix}{key}' in {_source(origin, prefix + str(key))}{hint}")
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key, origin, base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required value {key!r} (set it in {_source(origin, prefix.rstrip('.'))} or as {key}=... on {_CLI})"
            )
    cfg = schema(**values)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except (ValueError, AssertionError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{where} (from {_source(origin, prefix.rstrip('.'))}): {err}") from None
    return cfg


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, origin: dict[str, str], base_dir: Path) -> Any:
    """Check ``value`` against the annotation ``tp``; allow only lossless conversions."""

    def wrong(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"wrong type for {key!r} in {_source(origin, key)}: expected {expected or _type_name(tp)}, "
            f"got {value!r} ({type(value).__name__})"
        )

    o = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", origin, base_dir)
    if o in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, origin, base_dir)
            except ConfigError:
                continue
        raise wrong(" or ".join(_type_name(t) for t in options))
    if o is typing.Literal:
        if value not in typing.get_args(tp):
            raise wrong("one of " + ", ".join(repr(a) for a in typing.get_args(tp)))
        return value
    if o in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong(f"a list ({_type_name(tp)})")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]", origin, base_dir) for i, v in enumerate(value)]
        return tuple(items) if o is tuple else items
    if o is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(val_tp, v, f"{key}.{k}", origin, base_dir) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise ConfigError(f"{key!r}: the schema uses an unsupported type {_type_name(tp)}")
