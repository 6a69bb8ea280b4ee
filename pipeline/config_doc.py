"""The README's configuration reference, generated from the config schemas.

    python -m pipeline.config_doc           # print the reference (markdown)
    python -m pipeline.config_doc --write   # replace the README block between its markers

Every key of every command's schema, with its type, default and the comment written beside
the field in the schema's source, so the reference cannot drift from the code
(``tests/test_config_doc.py`` fails when the README block is stale).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path

from pipeline.core.config import Section
from pipeline.core.errors import run_command

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- section:config-reference -->", "<!-- /section:config-reference -->"

# command -> "module:Schema" of its root config.
SCHEMAS = {
    "python -m pipeline.download": "pipeline.download:DownloadCommand",
    "python -m pipeline.build_shards": "pipeline.build_shards:BuildConfig",
    "torchrun -m train.main": "train.config:TrainConfig",
    "python -m pipeline.evaluate": "pipeline.evaluation:EvalConfig",
    "python -m pipeline.demo": "pipeline.demo:DemoConfig",
}
# Sections dispatched by their `name` key: the keys of each registered entry's ``Config``.
DISPATCHED = {
    "model (train)": "train.config:ModelSection",
    "objective (train)": "train.config:ObjectiveSection",
    "dataset (evaluate)": "pipeline.evaluation.datasets:DatasetConfig",
    "tasks[] (evaluate)": "pipeline.evaluation.task:TaskConfig",
}
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_comments(schema: type) -> dict[str, str]:
    """``name -> comment`` from the ``field: type = default  # comment`` lines of the class source."""
    comments = {}
    for klass in reversed(schema.__mro__):  # subclasses' comments win
        try:
            source = inspect.getsource(klass) if dataclasses.is_dataclass(klass) else ""
        except OSError:  # made by dataclasses.make_dataclass (e.g. a table of variants): no source
            source = ""
        for line in source.splitlines():
            match = _FIELD_COMMENT.match(line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or re.sub(r"\b(\w+\.)+(\w+)", r"\2", str(tp)).replace("NoneType", "None")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "**required**"


def rows(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every key of ``schema``, sections flattened."""
    hints, comments = typing.get_type_hints(schema), field_comments(schema)
    out = []
    for field in dataclasses.fields(schema):
        key, tp = prefix + field.name, hints[field.name]
        item = (typing.get_args(tp) or (None,))[0] if typing.get_origin(tp) is list else None
        if isinstance(tp, type) and issubclass(tp, Section):
            out.append((f"{key}.name", "str", "**required**",
                        f"registered name; the section's other keys are those of that entry's `Config`. {comments.get(field.name, '')}".strip()))
        elif dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "(") else ""
            out.append((key, tp.__name__, _default(field), comments.get(field.name, "") or doc))
            out += rows(tp, key + ".")
        else:
            out.append((key, _type_name(tp), _default(field), comments.get(field.name, "")))
            if dataclasses.is_dataclass(item):
                out += rows(item, key + "[].")
    return out


def _table(schema: type) -> str:
    table = ["| key | type | default | meaning |", "|---|---|---|---|"]
    cells = ([c.replace("|", "\\|") for c in row] for row in rows(schema))  # a bare | would end the cell
    table += [f"| `{k}` | `{t}` | {d} | {m} |" for k, t, d, m in cells]
    return "\n".join(table) + "\n"


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def dispatched_reference() -> list[str]:
    """One table per group of registered entries sharing the same keys (variants differ in defaults)."""
    parts = []
    for section, target in DISPATCHED.items():
        registry = _load(target).registry
        groups: dict[tuple, list[str]] = {}
        for name in registry.names():
            groups.setdefault(tuple(f.name for f in dataclasses.fields(registry.config(name))), []).append(name)
        for names in groups.values():
            listed = ", ".join(f"`{n}`" for n in names)
            note = f" (defaults shown for `{names[0]}`)" if len(names) > 1 else ""
            parts.append(f"### `{section}`: {listed}\n\nKeys with `name: {names[0]}`{note}.\n\n"
                         + _table(registry.config(names[0])))
    return parts


def reference() -> str:
    """The whole reference as markdown: one table per command, then per registered entry."""
    parts = []
    for command, target in SCHEMAS.items():
        parts.append(f"### `{command}`\n\nSchema `{target}`.\n\n" + _table(_load(target)))
    return "\n".join(parts + dispatched_reference())


def readme_block(text: str) -> str:
    """The current content between the reference markers of the README text."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def write_readme(path: Path = README) -> None:
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + reference() + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"update the block in {README.name}")
    args = parser.parse_args()
    if args.write:
        write_readme()
    else:
        print(reference(), end="")


if __name__ == "__main__":
    run_command(main)
