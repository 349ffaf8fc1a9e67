"""The package's import rules, pinned: the daemon and the CLI never import torch, nothing but
the CLI imports the daemon's wiring module, and no module uses another module's private names."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "ckptd"


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every ``from X import ...`` and ``import X`` in the file, resolved
    to absolute module names."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_the_daemon_and_the_cli_never_import_torch() -> None:
    code = (
        "import sys, ckptd.cli, ckptd.daemon.server, ckptd.catalog, ckptd.progress; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    for path in (PKG / "daemon").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith("torch"), f"{path.name} imports {module}"


def test_nothing_but_the_cli_imports_the_daemons_wiring() -> None:
    for path in PKG.rglob("*.py"):
        if path.name == "cli.py" and path.parent == PKG:
            continue
        for module, _ in _imports(path):
            assert module != "ckptd.daemon.server", f"{path.relative_to(PKG)} imports server"


def test_no_module_imports_another_modules_private_names() -> None:
    for path in PKG.rglob("*.py"):
        for module, names in _imports(path):
            if not module.startswith("ckptd"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path.relative_to(PKG)} imports {private} from {module}"
