"""No function in the package is longer than a reader can hold at once.

Long functions are where several concerns end up sharing local variables; the
package keeps each function to at most ``MAX_LINES`` lines (decorators and
docstring included), split into named helpers beyond that. Parsed with
``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "flaxtune"
MAX_LINES = 80


def long_functions(root: pathlib.Path, limit: int) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - start + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return found


def test_no_function_in_the_package_exceeds_the_limit():
    assert long_functions(PACKAGE_DIR, MAX_LINES) == []


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "pkg", MAX_LINES) == ["pkg/m.py:5 long"]
