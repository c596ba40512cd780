"""The import direction of the design card, and no import cycle anywhere in the package.

``common`` imports nothing of ours outside ``common``; ``server`` and ``client`` import ``common``
only (never each other, never ``simulations``); ``simulations`` may import all. Checked twice:
statically (every import statement, including those inside functions, so a lazy import cannot
hide a violation) and dynamically (each module imported in a fresh interpreter, then the loaded
``consilia`` modules are listed).
"""

from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "client", "server", "simulations")
# what each package may import of ours, besides itself
ALLOWED = {
    "common": (),
    "client": ("common",),
    "server": ("common",),
    "simulations": ("common", "client", "server"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "consilia." + ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


MODULES = _modules()


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every ``consilia`` module an import statement names (submodules resolved)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name.startswith("consilia.")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = _imported_names(tree, module, path.name == "__init__.py")
        graph[module] = {n for n in names if n in MODULES and n != module}
    return graph


def _package_of(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_import_statement_follows_the_design_direction(package):
    allowed = (package, *ALLOWED[package])
    bad = []
    for module, path in MODULES.items():
        if _package_of(module) != package:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            if name.split(".")[1] not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"{package} may import only {allowed}:\n" + "\n".join(bad)


def test_the_scan_sees_a_violation():
    tree = ast.parse("def f():\n    from consilia.client.trainer import x\n")
    assert _imported_names(tree, "consilia.server.app", False) == ["consilia.client.trainer"]
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    import consilia.client.app\n")
    assert _imported_names(hidden, "consilia.server.app", False) == []


def _first_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_no_import_cycle_inside_the_package():
    cycle = _first_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_a_cycle():
    cycle = _first_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert cycle is not None and set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1]
    assert _first_cycle({"a": {"b"}, "b": set()}) is None


_PROBE = """
import importlib, json, sys
failed = {}
loaded = {}
for name in json.loads(sys.argv[1]):
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    except Exception as err:  # report, do not hide
        failed[name] = f"{type(err).__name__}: {err}"
    loaded[name] = sorted(m for m in sys.modules if m.startswith("consilia."))
print(json.dumps({"failed": failed, "loaded": loaded}))
"""


@pytest.mark.parametrize("package", ["common", "client", "server"])
def test_a_fresh_interpreter_importing_a_package_loads_nothing_it_may_not_import(package):
    # one fresh interpreter per package: importing all of it must not pull in a forbidden package
    names = [m for m in MODULES if _package_of(m) == package]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert not result["failed"], result["failed"]
    allowed = (package, *ALLOWED[package])
    loaded = {m for mods in result["loaded"].values() for m in mods}
    bad = sorted(m for m in loaded if _package_of(m) not in allowed)
    assert not bad, f"importing consilia.{package} loaded {bad}"


def test_no_generic_top_level_packages_are_installed(tmp_path):
    code = ("import importlib.util, consilia.common; "
            "print([(n, str(importlib.util.find_spec(n).origin)) for n in "
            "('common', 'server', 'client', 'simulations') if importlib.util.find_spec(n)])")
    # run outside the checkout (and without PYTHONPATH) so only installed packages count
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"generic top-level modules importable: {out}"
