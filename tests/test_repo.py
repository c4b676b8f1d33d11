"""Repository-level checks: README and landing page agree, CI runs the README's test command."""
import json
import os
import re
import tempfile

import torch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def index_markdown():
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    return "\n\n".join("".join(c["source"]).strip() for c in nb["cells"] if c["cell_type"] == "markdown")


def test_readme_is_the_landing_page():
    assert (ROOT / "README.md").read_text().strip() == index_markdown()


def readme_commands():
    return re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "edgekd run" in cmds[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1].strip() in ci, f"{cmds[1]!r} not in .ci/run"


def test_readme_python_example_runs():
    code = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert code, "README has no python example"
    ns = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try: exec(compile(code[0], "README.md", "exec"), ns)
        finally: os.chdir(cwd)
    test = ns["learn"].evaluate(ns["dls"].test)["accuracy"]
    assert test >= 0.6, f"the README's distilled student reaches {test:.3f} on 3 classes (chance: 0.33)"
    x = ns["dls"].test.dataset.tensors[0]
    with torch.no_grad(): assert torch.equal(ns["student"](x), ns["learn"].model.eval()(x))  # reloaded model, same outputs


def test_every_chapter_is_in_the_sidebar():
    sidebar = (ROOT / "nbs" / "_quarto.yml").read_text()
    for nb in sorted((ROOT / "nbs").glob("[0-9]*.ipynb")):
        assert nb.name in sidebar, f"{nb.name} missing from nbs/_quarto.yml"
