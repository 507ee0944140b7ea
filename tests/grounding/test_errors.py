"""One table of error codes (`grounding.errors`) covers every code a reader or stage emits."""

from __future__ import annotations

import ast
from pathlib import Path

from grounding.errors import ERRORS, TRANSIENT
from pipelines.schema import ERROR_CODES

ROOT = Path(__file__).resolve().parents[2]
# Where row error codes come from: input readers, image loading, the grounder, the job's
# stages. (The report draws cards and says why an image is not shown; it emits no row codes.)
SOURCES = [*(ROOT / "grounding").rglob("*.py"), *(ROOT / "pipelines" / "stages").rglob("*.py")]


def _emitted() -> dict[str, list[str]]:
    """``{code: [file:line, ...]}`` of every literal code emitted in the sources."""
    found: dict[str, list[str]] = {}

    def add(node, code):
        if isinstance(code, ast.Constant) and isinstance(code.value, str):
            found.setdefault(code.value, []).append(f"{node_file}:{node.lineno}")

    for path in SOURCES:
        node_file = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                if ast.unparse(node.func).endswith("ImageError") and node.args:
                    add(node, node.args[0])
                for kw in node.keywords:
                    if kw.arg == "error_code":
                        add(node, kw.value)
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "error_code":
                        add(node, v)
    return found


def test_every_emitted_error_code_is_in_the_table():
    emitted = _emitted()
    assert len(emitted) >= 12  # the scan does find them
    missing = {c: where for c, where in emitted.items() if c not in ERRORS}
    assert missing == {}


def test_the_table_is_the_one_the_output_documents():
    assert ERROR_CODES == {c: e.meaning for c, e in ERRORS.items()}
    assert TRANSIENT == {"fetch_failed", "engine_error"}
    assert all(e.meaning for e in ERRORS.values())
