"""The size rules of the package (issue 14): a reader holds a whole file, and a whole class, in their head."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lowrank"
MAX_FILE_LINES, MAX_CLASS_LINES = 400, 250


def test_no_file_over_400_lines_and_no_class_over_250():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path.name}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
