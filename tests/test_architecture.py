"""The package's import graph, parsed from the source: no cycle, and no module imports one on a higher
floor than its own in docs/architecture.md's "Layering" block (the one source of the layering)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "adaptive_mllm"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Package modules ``path`` imports anywhere (top level, inside functions, under TYPE_CHECKING);
    ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "adaptive_mllm")
    return found


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def read_floors(text: str) -> dict[str, int]:
    """The Layering block: ``floor: name name ...``, a name being a module or a package (dots from the package root)."""
    block = re.search(r"## Layering.*?```\n(.*?)```", text, re.S)
    assert block, f"{ARCHITECTURE}: no ``` block under '## Layering'"
    floors = {}
    for line in block.group(1).splitlines():
        floor, _, names = line.partition(":")
        for name in names.split():
            floors[f"adaptive_mllm.{name}"] = int(floor)
    return floors


FLOORS = read_floors(ARCHITECTURE.read_text())


def floor_of(module: str) -> int | None:
    """The floor of the longest entry that is the module or a package above it (the root package: 0)."""
    if module == "adaptive_mllm":
        return 0
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        floor = FLOORS.get(".".join(parts[:end]))
        if floor is not None:
            return floor
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None. Depth-first, iterative."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_resolves_submodules_and_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from adaptive_mllm.backbones import llava\ndef f():\n    from adaptive_mllm.recipe import build_cli\nimport os\n")
    assert imports_of(source) == {"adaptive_mllm.backbones.llava", "adaptive_mllm.recipe"}


def test_the_package_has_no_import_cycle():
    assert find_cycle(GRAPH) is None


def test_every_module_has_a_floor():
    missing = sorted(name for name in MODULES if floor_of(name) is None)
    assert not missing, f"add them to the Layering block of {ARCHITECTURE}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_one_above_it(module):
    upward = sorted(f"{name} (floor {floor_of(name)})" for name in GRAPH[module] if (floor_of(name) or 0) > floor_of(module))
    assert not upward, f"{module} (floor {floor_of(module)}) imports {upward}"

