"""edgekd.kd is a library module: importing it loads neither matplotlib nor the experiments. The experiments of chapter 10
live in edgekd.experiments.kd, load matplotlib only to draw, and the registry of edgekd.experiment finds them by itself."""
import subprocess
import sys


def _loaded_after(stmt:str)->list:
    "Modules of matplotlib and edgekd loaded in a fresh interpreter after running `stmt`."
    code = f"import sys\n{stmt}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'edgekd')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_kd_loads_no_matplotlib_and_no_experiments():
    mods = _loaded_after("import edgekd.kd")
    assert "edgekd.kd" in mods
    assert [m for m in mods if m.startswith("matplotlib")] == []
    assert [m for m in mods if m.startswith("edgekd.experiment")] == []


def test_kd_experiments_load_no_matplotlib():
    mods = _loaded_after("import edgekd.experiments.kd")
    assert "edgekd.experiments.kd" in mods
    assert [m for m in mods if m.startswith("matplotlib")] == []


def test_registry_discovers_kd_experiments():
    mods = _loaded_after("from edgekd.experiment import list_experiments\n"
                         "names = set(list_experiments())\n"
                         "assert {'hinton', 'few-labels', 'omitted-class', 'temperature', 'hinton-mnist'} <= names, names")
    assert "edgekd.experiments.kd" in mods


def test_cli_lists_kd_experiments():
    out = subprocess.run([sys.executable, "-c", "from edgekd.cli import main; main(['reproduce', '--list'])"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("hinton", "few-labels", "omitted-class", "temperature", "hinton-mnist"): assert name in out.stdout
