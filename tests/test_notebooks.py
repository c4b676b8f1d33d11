"""Notebook hygiene that nbdev's own commands only warn about."""
import ast
import json
import re
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / "nbs"


def code_cells():
    for nb in sorted(NBS.glob("*.ipynb")):
        for i, c in enumerate(json.loads(nb.read_text())["cells"]):
            if c["cell_type"] == "code":
                yield nb.name, i, "".join(c["source"])


def test_imports_live_in_their_own_cells():
    """nbdev's docs processor executes every cell holding an import; any other code in such a
    cell runs without the notebook's earlier state and breaks `nbdev_proc_nbs`."""
    bad = []
    for name, i, src in code_cells():
        if re.search(r"^#\|\s*export", src, re.M):
            continue
        body = [l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))]
        tree = ast.parse("\n".join(body))
        has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        other = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
        if has_import and other and not all(isinstance(n, ast.Expr) and "set_num_threads" in ast.unparse(n) for n in other):
            bad.append(f"{name} cell {i}: {src[:80]!r}")
    assert not bad, "move these imports to the notebook's '#| hide' imports cell:\n" + "\n".join(bad)


def test_no_chapter_is_skipped():
    for nb in sorted(NBS.glob("*.ipynb")):
        meta = json.loads(nb.read_text()).get("metadata", {})
        assert "skip_exec" not in json.dumps(meta) and "skip_exec" not in nb.read_text(), nb.name
