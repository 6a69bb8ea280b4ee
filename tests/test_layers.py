"""The import graph of the project's packages: layers only import downwards, and nothing is circular.

Layers, bottom to top (each may import the ones below it, never one above):

    pipeline.core         config, log, io, registry, shard layout, task slicing
    pipeline.embedded     the embedded data set
    train                 models, objectives, data, parallelism, checkpoints, encoders
    filter                curation steps
    pipeline.evaluation   evaluation tasks
    pipeline              the stage commands (download, build_shards, evaluate, demo, ...)

Every import counts, also those inside functions. A registry that imports its plug-in
package (``Registry(..., package=...)``) names it as a string: that is not an import edge.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train", "filter")
# layer -> the layers it may import (itself included)
ALLOWED = {
    "pipeline.core": {"pipeline.core"},
    "pipeline.embedded": {"pipeline.core", "pipeline.embedded"},
    "train": {"pipeline.core", "train"},
    "filter": {"pipeline.core", "pipeline.embedded", "train", "filter"},
    "pipeline.evaluation": {"pipeline.core", "pipeline.embedded", "train", "pipeline.evaluation"},
    "pipeline": {"pipeline.core", "pipeline.embedded", "train", "filter", "pipeline.evaluation", "pipeline"},
}


def layer(module: str) -> str:
    for name in ("pipeline.core", "pipeline.embedded", "pipeline.evaluation", "train", "filter", "pipeline"):
        if module == name or module.startswith(name + "."):
            return name
    raise ValueError(module)


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` names a.b when b is a module)."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in known and t != name}
        graph[name] = edges
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) not in ALLOWED[layer(a)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), i.e. import circles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def folder_graph(graph: dict[str, set[str]], root: Path) -> dict[str, set[str]]:
    """The same graph between folders (a package's modules and its __init__ are one folder)."""
    known = modules(root)
    folder = {m: str(p.parent.relative_to(root)) for m, p in known.items()}
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(folder[a], set()).update(folder[b] for b in targets if folder[b] != folder[a])
    return out


def test_layers_import_only_downwards():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_circle_between_files_or_folders():
    graph = import_graph(ROOT)
    assert cycles(graph) == []
    assert cycles(folder_graph(graph, ROOT)) == []


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.parquet",
                                                                                            "*.gz", "*.json"))
    return tmp_path


def test_a_planted_upward_import_is_found(tree_copy):
    io = tree_copy / "pipeline" / "core" / "io.py"
    io.write_text(io.read_text() + "\n\ndef _late():\n    from train.loop import Trainer  # noqa: F401\n")
    assert upward_imports(import_graph(tree_copy)) == ["pipeline.core.io -> train.loop"]


def test_a_planted_circle_is_found(tree_copy):
    gather = tree_copy / "train" / "gather.py"
    gather.write_text(gather.read_text() + "\nfrom train import queue  # noqa: E402,F401\n")
    assert ["train.gather", "train.queue"] in cycles(import_graph(tree_copy))


def test_a_dataset_wide_curation_task_starts_without_torch():
    """The curation command, its config with every step's section and the dataset-wide levels load
    without torch (seconds of import, paid by each of thousands of array tasks at scale): only a shard
    phase that runs a model imports it."""
    import subprocess
    import sys

    probe = ("import sys, pipeline.build_shards, filter.semdedup, filter.pixel_dedupe; "
             "print(sorted(m for m in ('torch', 'webdataset', 'train') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
