"""The architecture rule import-linter cannot check: no private name crosses a subpackage's border.

(The layers and the absence of cycles are import-linter's contracts in pyproject.toml, run by ``make lint``.)
A name with a leading underscore is its module's own business; a subpackage that needs it from another one should get
a public name with a docstring instead, or the code should move.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mechfin_utils"


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""  # "" = the package's own top-level modules


def test_no_private_name_is_imported_across_subpackages():
    crossing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mechfin_utils."):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and _subpackage(node.module) != _subpackage(importer):
                    crossing.append(f"{importer} line {node.lineno}: {private} from {node.module}")
    assert not crossing, "private names imported across subpackages:\n" + "\n".join(crossing)
