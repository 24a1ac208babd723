"""The layer order of docs/architecture.md, kept by the code: every import in kvmux/ points down.

The rooms are kvmux's folders and its top-level modules. docs/architecture.md lists them floor by floor (the
block under "## Layers"); this test reads that list, parses every module under kvmux/ with `ast` (imports
inside functions and under TYPE_CHECKING included: a deferred import is still a dependency), and fails
naming each import that reaches a room on its own floor or above. Imports only downwards means no import
cycle between rooms; a second test checks that no cycle hides between the modules of one room either.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
NATIVE = "_native"  # the compiled extension modules (kvmux._native, kvmux._native_cuda): below everything


def floors_from_doc(text: str) -> dict[str, int]:
    """Room -> floor, from the first fenced block after "## Layers" whose lines read `FLOOR  ROOM  ROOM ...`."""
    section = text.split("\n## Layers", 1)[1]
    block = section.split("```", 2)[1]
    floors = {}
    for line in block.splitlines():
        match = re.match(r"\s*(-?\d+)\s+(.*)", line)
        if not match:
            continue
        for token in match.group(2).split():
            if not (token.endswith(("/", ".py")) or token == NATIVE):
                break  # the rooms end where the description begins
            floors[token.rstrip("/").removesuffix(".py")] = int(match.group(1))
    return floors


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str | None:
    """The room of a dotted kvmux module name; None outside kvmux."""
    parts = module.split(".")
    if parts[0] != "kvmux":
        return None
    if len(parts) == 1:
        return "__init__"
    return NATIVE if parts[1].startswith(NATIVE) else parts[1]


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted name) of every kvmux module or package an import in `path` (under `root`) reaches."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from kvmux.x import y` may name a module y: count the deeper name where it is a file or folder.
            for alias in node.names:
                deeper = f"{base}.{alias.name}"
                file = root / Path(*deeper.split("."))
                is_module = file.with_suffix(".py").is_file() or file.is_dir()
                found.append((node.lineno, deeper if is_module or room(deeper) == NATIVE else base))
    return [(line, name) for line, name in found if room(name) is not None]


def sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / "kvmux").rglob("*.py"))


def test_doc_lists_every_room_once():
    floors = floors_from_doc(DOC.read_text())
    rooms = {room(module_name(p)) for p in sources()} | {NATIVE}
    assert set(floors) == rooms, (f"docs/architecture.md's layer list and kvmux/ disagree: missing from the list "
                                  f"{sorted(rooms - set(floors))}, no longer in kvmux/ {sorted(set(floors) - rooms)}")


def upward_imports(floors: dict[str, int], root: Path = ROOT) -> list[str]:
    problems = []
    for path in sources(root):
        here = room(module_name(path, root))
        for line, name in imported_modules(path, root):
            there = room(name)
            if there == here:
                continue
            if there not in floors or here not in floors:
                problems.append(f"{path.relative_to(root)}:{line} imports {name}: "
                                f"{there if there not in floors else here} has no floor in docs/architecture.md")
            elif floors[there] >= floors[here]:
                where = "its own floor" if floors[there] == floors[here] else "a higher floor"
                problems.append(f"{path.relative_to(root)}:{line} imports {name}: {here} (floor {floors[here]}) "
                                f"may not import {there}, on {where} ({floors[there]})")
    return problems


def test_every_import_points_down():
    problems = upward_imports(floors_from_doc(DOC.read_text()))
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_an_upward_import_fails_the_check(tmp_path):
    """The check is not vacuous: the model importing the engine, added to a copy of the tree, is caught."""
    for path in sources():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    llama = tmp_path / "kvmux" / "model" / "llama.py"
    llama.write_text(llama.read_text() + "\n\ndef _late():\n    from kvmux.engine.messages import SeqState\n")
    problems = upward_imports(floors_from_doc(DOC.read_text()), tmp_path)
    assert len(problems) == 1 and problems[0].startswith("kvmux/model/llama.py:") and \
        "model (floor 4) may not import engine, on a higher floor" in problems[0], problems


def module_cycles() -> list[list[str]]:
    """Cycles in the graph of kvmux modules (a package's imports counted as its __init__'s), by Tarjan."""
    names = {module_name(p) for p in sources()}
    graph = {module_name(p): sorted({n for _, n in imported_modules(p) if n in names} - {module_name(p)})
             for p in sources()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_between_modules():
    assert module_cycles() == []


@pytest.mark.parametrize("text, floors", [
    ("## Layers\n```\n  1    engine/  llm.py   the engine\n  0    config.py   settings\n```\n",
     {"engine": 1, "llm": 1, "config": 0}),
])
def test_floors_from_doc(text, floors):
    assert floors_from_doc("intro\n" + text) == floors
