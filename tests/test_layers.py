"""The layers, enforced: every import of every module (module level and inside functions) is read
with ``ast``, and an arrow that points the wrong way, or any import cycle between modules, fails.

The rules (docs/architecture.md):

- ``model/`` imports nothing from ``data/``, ``evaluation/``, ``launch/``, ``inference/``;
- ``losses/`` imports nothing from ``model/``, ``data/``, ``evaluation/``, ``launch/``, ``inference/``;
- ``data/`` imports nothing from ``model/``, ``losses/``, ``evaluation/``, ``launch/``, ``inference/``;
- ``evaluation/`` imports nothing from ``launch/`` or ``inference/``;
- ``inference/`` (what joins model and data for users) imports nothing from ``launch/``;
- none of the library folders (model, losses, data, evaluation, inference) imports DeepSpeed;
- the modules at the package root below the folders (``sources``, ``suggest``: what the folders
  share) import nothing of the project and no DeepSpeed;
- inside ``launch/``, the components (``optim``, ``checkpoint``, ``metrics``, ``engine``,
  ``lifecycle``, ``towers``) import no tool (``launch/tools/``), nor the planner
  (``launch/plan/``), nor the app above them (the loop, ``cli``, ``experiments``, ``train``);
  tools and the planner import components, never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["model", "losses", "data", "evaluation", "inference", "launch"]
ROOT_MODULES = ["sources", "suggest"]
FORBIDDEN: dict[str, set[str]] = {
    "model": {"data", "evaluation", "launch", "inference"},
    "losses": {"model", "data", "evaluation", "launch", "inference"},
    "data": {"model", "losses", "evaluation", "launch", "inference"},
    "evaluation": {"launch", "inference"},
    "inference": {"launch"},
} | {root: set(PACKAGES) for root in ROOT_MODULES}
NO_DEEPSPEED = {"model", "losses", "data", "evaluation", "inference", *ROOT_MODULES}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["tritower", *parts])


def all_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            modules[module_name(path)] = path
    for root in ROOT_MODULES:
        modules[f"tritower.{root}"] = REPO / f"{root}.py"
    return modules


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """Every module this file imports (resolved to the longest known ``tritower`` module), with the line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import mod`` imports the module ``pkg.mod``; ``from pkg import name``
            # imports ``pkg`` (its ``__init__``). Python runs a package's ``__init__`` before
            # any of its modules in both cases, but that is not an arrow of the code's own.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
            "import_module",
            "__import__",
        }:
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                targets = [node.args[0].value]
        for target in targets:
            if target.startswith("tritower"):
                resolved = target
                while resolved and resolved not in known:
                    resolved = resolved.rsplit(".", 1)[0] if "." in resolved else ""
                if resolved and resolved != name:
                    found.append((resolved, node.lineno))
            elif target.split(".")[0] == "deepspeed":
                found.append(("deepspeed", node.lineno))
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = all_modules()
    known = set(modules)
    return modules, {name: imports_of(path, name, known) for name, path in modules.items()}


def folder(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_imports_follow_the_layers():
    modules, edges = graph()
    breaches = []
    for name, targets in edges.items():
        source = folder(name)
        for target, line in targets:
            where = f"{modules[name].relative_to(REPO)}:{line}"
            if target == "deepspeed":
                if source in NO_DEEPSPEED:
                    breaches.append(f"{where}: {source}/ imports deepspeed")
            elif folder(target) in FORBIDDEN.get(source, set()):
                breaches.append(f"{where}: {source}/ imports {target}")
    assert not breaches, "layer breaches:\n" + "\n".join(sorted(set(breaches)))


COMPONENTS = {"optim", "checkpoint", "metrics", "engine", "lifecycle", "towers"}
ABOVE_COMPONENTS = ("tritower.launch.tools", "tritower.launch.plan", "tritower.launch.loop",
                    "tritower.launch.cli", "tritower.launch.experiments", "tritower.launch.train")  # fmt: skip


def component(module: str) -> str:
    """``optim`` for ``tritower.launch.optim.schedule``; "" outside the components."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "launch" and parts[2] in COMPONENTS else ""


def test_components_import_nothing_above_them():
    modules, edges = graph()
    breaches = [
        f"{modules[name].relative_to(REPO)}:{line}: {name} imports {target}"
        for name, targets in edges.items()
        if component(name)
        for target, line in targets
        if target.startswith(ABOVE_COMPONENTS)
    ]
    assert not breaches, "component breaches:\n" + "\n".join(sorted(breaches))


def test_no_import_cycles_between_modules():
    """Tarjan's strongly connected components over module-to-module imports (a package's
    ``__init__`` re-exporting its own modules is an arrow like any other)."""
    _, edges = graph()
    adjacency = {name: sorted({t for t, _ in targets if t != "deepspeed"}) for name, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in adjacency.get(node, []):
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

    for node in adjacency:
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path):
    """The reader must catch a breach hidden in a function body, or the tests above prove nothing."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from tritower.data import transforms\n    import deepspeed\n")
    found = imports_of(source, "tritower.model.probe", {"tritower.data", "tritower.data.transforms"})
    assert ("tritower.data.transforms", 2) in found and ("deepspeed", 3) in found
