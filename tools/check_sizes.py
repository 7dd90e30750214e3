"""Lint step (make lint): no module of the package over 500 lines, no class over 200 (the developers' guide).

    python tools/check_sizes.py [PACKAGE_DIR]     # default src/torchcvt; exit 1 listing every oversized one
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 200


def oversized(package: Path) -> list[str]:
    """One line for each module or class of package over its limit."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(package.parent)
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            problems.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        classes = [node for node in ast.walk(ast.parse(text, str(path))) if isinstance(node, ast.ClassDef)]
        for node in classes:
            if (size := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                problems.append(f"{name}: class {node.name} has {size} lines (at most {MAX_CLASS_LINES})")
    return problems


def main(argv: list[str]) -> int:
    package = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "src" / "torchcvt"
    if not package.is_dir():
        print(f"check_sizes: {package} is not a folder", file=sys.stderr)
        return 2
    problems = oversized(package)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
