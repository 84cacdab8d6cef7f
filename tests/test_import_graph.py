"""The import graph of `aptp`, read from the source with `ast` (nothing is imported).

Rules checked:
- no import circle: no strongly connected component of more than one module. Every import
  counts, at module level or inside a function: a function-level import only delays a circle
  (the two modules still cannot be understood, tested or moved apart), so it is a circle too.
  `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`; the
  parent packages a dotted import runs implicitly are not edges (a package's `__init__` that
  re-exports its submodules would otherwise be in a circle with each of them).
- no `_private` name imported from another module: a name used across modules is public.
  Dunder names (`__version__`) are public.
- the runtime imports nothing from training (`aptp.train`), at any level.

The folders are the distribution's (setup.py FOLDERS): train/ -> aptp.train, export/ ->
aptp.export, runtime/ -> aptp.runtime, benchmarks/ -> aptp.benchmarks, aptp/ -> aptp.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"aptp": "aptp", "train": "aptp.train", "export": "aptp.export", "runtime": "aptp.runtime",
           "benchmarks": "aptp.benchmarks"}


def project_modules(repo: Path = REPO) -> dict[str, Path]:
    """Every module of the distribution: dotted name -> source file."""
    modules: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = path.relative_to(repo / folder).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a (possibly relative) import made in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return found


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = project_modules(repo)
    return {name: {target for target, _, _ in imports_of(name, path, modules) if target in modules and target != name}
            for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; every component, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def private_imports(repo: Path = REPO) -> list[str]:
    """`module:line takes _name from other` for each private name imported across modules."""
    modules = project_modules(repo)
    found = []
    for name, path in modules.items():
        for source, taken, line in imports_of(name, path, modules):
            if taken is None or source == name or not source.startswith("aptp"):
                continue
            if taken.startswith("_") and not (taken.startswith("__") and taken.endswith("__")):
                found.append(f"{name}:{line} takes {taken} from {source}")
    return found


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"aptp.cli", "aptp.train.cli", "aptp.export.cli", "aptp.runtime.cli", "aptp.benchmarks.cli"} <= set(graph)
    assert "aptp.errors" in graph["aptp.benchmarks.cli"]  # an absolute import
    assert "aptp.runtime.artifacts" in graph["aptp.runtime.pipeline"]  # a relative one


def test_the_checks_catch_a_circle_and_a_private_import(tmp_path):
    # The rules on a made-up tree, so a check that silently sees nothing cannot pass.
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "runtime" / "b.py").write_text("from aptp.runtime import a\nfrom .c import _hidden\n")
    (tmp_path / "runtime" / "c.py").write_text("_hidden = 1\n")
    circles = [c for c in strongly_connected(import_graph(tmp_path)) if len(c) > 1]
    assert circles == [["aptp.runtime.a", "aptp.runtime.b"]]
    assert private_imports(tmp_path) == ["aptp.runtime.b:2 takes _hidden from aptp.runtime.c"]


def test_no_import_circles():
    circles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not circles, "import circles (every import counts, function-level too):\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_no_private_name_is_imported_from_another_module():
    found = private_imports()
    assert not found, "private names imported across modules (make them public and document them):\n" + "\n".join(found)


def test_the_runtime_imports_nothing_from_training():
    modules = project_modules()
    found = [f"{name}:{line} imports {target}"
             for name, path in modules.items() if name.startswith("aptp.runtime")
             for target, _, line in imports_of(name, path, modules)
             if target == "aptp.train" or target.startswith("aptp.train.")]
    assert not found, "\n".join(found)


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("train", "export", "runtime", "benchmarks") else "core"


def test_the_architecture_diagram_matches_the_imports():
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = {tuple(part.strip() for part in line.split("-->")) for line in block.splitlines() if "-->" in line}
    actual = {(_stage(a), _stage(b)) for a, targets in import_graph().items() for b in targets if _stage(a) != _stage(b)}
    assert drawn == actual, f"drawn but not imported: {sorted(drawn - actual)}; imported but not drawn: {sorted(actual - drawn)}"


def test_the_runtime_takes_only_the_manifest_from_the_export_package():
    modules = project_modules()
    found = {target for name, path in modules.items() if name.startswith("aptp.runtime")
             for target, _, _ in imports_of(name, path, modules) if target.startswith("aptp.export")}
    assert found <= {"aptp.export.manifest"}, found
