"""
The layers of ARCHITECTURE.md, checked from the imports: no module imports a
room above its own, and rooms beside each other import only what the table
allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relayx"

#: each room and the rooms it may import (besides its own and the foundation)
ALLOWED: dict[str, set[str]] = {
    "foundation": set(),
    "redis": set(),
    "bodies": set(),
    "queue": {"redis"},
    "checks": {"redis"},
    "smtp": {"checks"},
    "delivery": {"smtp"},
    "ops": {"queue", "redis"},
    "wiring": {"redis", "bodies", "queue", "checks", "smtp", "delivery", "ops"},
}

WIRING = {"service", "tap", "__main__", "workers"}


def room(module: str) -> str:
    """
    The room of a dotted module name under relayx.
    """
    parts = module.split(".")
    if len(parts) == 1:
        return "foundation"
    if parts[1] in WIRING:
        return "wiring"
    if parts[1] in ALLOWED:
        return parts[1]
    return "foundation"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "relayx":
                found |= {f"relayx.{alias.name}" for alias in node.names}
            elif node.module.startswith("relayx."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("relayx.")}
    return found


def test_no_import_climbs_a_layer() -> None:
    """When every module's imports are read, none reaches a room its own may not use."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("relayx", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        mine = room(name)
        for target in imports(path):
            theirs = room(target)
            if theirs not in (mine, "foundation") and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
            if mine == "foundation" and theirs != "foundation":
                wrong.append(f"{name} (foundation) imports {target} ({theirs})")
    assert wrong == []
