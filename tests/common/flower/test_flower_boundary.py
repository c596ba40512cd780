"""Every use of Flower internals lives in ``consilia.common.flower`` (behind one version check).

Outside ``common/flower/`` a module may import only Flower's public app API; anything else
(``flwr.common``, ``flwr.proto``, ``flwr.supercore``, ``flwr.supernode``, private names such as
``_run_simulation``, ...) must go through a module of ``common/flower/``. Every import
statement counts, including those inside functions, so a lazy import cannot hide one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: Folders whose modules are checked (benchmarks too: they should show the public way).
CHECKED = ("common", "client", "server", "simulations", "benchmarks")
FLOWER_ROOM = ROOT / "common" / "flower"
#: Flower's public app API (Message API apps, strategies, the public simulation entry point).
PUBLIC_FLOWER = frozenset({
    "flwr.app",
    "flwr.clientapp",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.simulation",
})


def _flower_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Return ``(line, imported name)`` for every ``flwr`` import in ``tree``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "flwr" or node.module in PUBLIC_FLOWER:
                # ``from flwr import common`` / ``from flwr.simulation import _x``
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                          if node.module == "flwr" or alias.name.startswith("_")]
    return [(line, name) for line, name in found if name == "flwr" or name.startswith("flwr.")]


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.relative_to(ROOT)}:{line}: imports {name}"
            for line, name in _flower_imports(tree) if name not in PUBLIC_FLOWER]


def _modules_outside_flower_room() -> list[Path]:
    return [path for top in CHECKED for path in sorted((ROOT / top).rglob("*.py"))
            if FLOWER_ROOM not in path.parents]


def test_only_common_flower_imports_flower_internals() -> None:
    violations = [v for path in _modules_outside_flower_room() for v in _violations(path)]
    assert not violations, "Flower internals outside common/flower/:\n" + "\n".join(violations)


@pytest.mark.parametrize("source, bad", [
    ("from flwr.common.serde import message_to_proto", True),
    ("import flwr.proto.message_pb2", True),
    ("def f():\n    from flwr.supercore.task_identity import TaskIdentity", True),
    ("from flwr.simulation.run_simulation import _run_simulation", True),
    ("from flwr.simulation import _run_simulation", True),
    ("from flwr import common", True),
    ("import flwr", True),
    ("from flwr.app import Context, Message", False),
    ("from flwr.serverapp.strategy import FedAvg", False),
    ("from flwr.simulation import run_simulation", False),
    ("import flwr_datasets", False),
])
def test_the_scan_tells_internal_from_public_imports(source: str, bad: bool,
                                                     tmp_path: Path) -> None:
    found = [name for _, name in _flower_imports(ast.parse(source))
             if name not in PUBLIC_FLOWER]
    assert bool(found) is bad


def test_every_internal_using_module_checks_the_flower_version() -> None:
    for path in sorted(FLOWER_ROOM.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        internal = [name for _, name in _flower_imports(ast.parse(text))
                    if name not in PUBLIC_FLOWER and name != "flwr"]
        if internal or "setattr(" in text:
            assert "require_supported_flower()" in text, f"{path.name} skips the version check"


def test_the_version_check_names_the_supported_release() -> None:
    from consilia.common.flower.compat import UnsupportedFlowerError, require_supported_flower

    require_supported_flower("1.42.0")
    require_supported_flower("1.42.3")
    with pytest.raises(UnsupportedFlowerError, match=r"needs Flower 1\.42\.\*.*found flwr 1\.43"):
        require_supported_flower("1.43.0")
    with pytest.raises(UnsupportedFlowerError):
        require_supported_flower("1.4")
