"""common imports neither server nor client; server and client do not import each other's apps."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(folder: str) -> list[tuple[str, str]]:
    found = []
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.append((str(path.relative_to(ROOT)), node.module))
            elif isinstance(node, ast.Import):
                found.extend((str(path.relative_to(ROOT)), a.name) for a in node.names)
    return found


@pytest.mark.parametrize(
    "forbidden", ["consilia.server", "consilia.client", "consilia.simulations"]
)
def test_common_is_independent(forbidden):
    bad = [(f, m) for f, m in _imports("common") if m.startswith(forbidden)]
    assert not bad, f"common must not import {forbidden}: {bad}"


def test_server_and_client_never_import_simulations():
    bad = [(f, m) for folder in ("server", "client") for f, m in _imports(folder)
           if m.startswith("consilia.simulations")]
    assert not bad, bad


def test_client_never_imports_server():
    bad = [(f, m) for f, m in _imports("client") if m.startswith("consilia.server")]
    assert not bad, bad


def test_no_generic_top_level_packages_are_installed(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import importlib.util, consilia.common; "
            "print([(n, str(importlib.util.find_spec(n).origin)) for n in "
            "('common', 'server', 'client', 'simulations') if importlib.util.find_spec(n)])")
    # run outside the checkout (and without PYTHONPATH) so only installed packages count
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"generic top-level modules importable: {out}"
