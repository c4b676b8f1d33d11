"""The workshop set-up: `jupyter lab nbs/` starts headless on a free local port and serves the
course, and the ipywidgets extension is enabled so the chapters' sliders work in JupyterLab.

No root is needed for any of this (see nbs/08_workshop.ipynb).
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT = 90   # seconds for the server to answer (the machine may be busy)


def jupyter():
    "The `jupyter` of the running Python environment (else the one on PATH)."
    exe = BIN / "jupyter"
    if exe.exists(): return str(exe)
    found = shutil.which("jupyter")
    if not found: pytest.fail("jupyter is not installed: pip install -c constraints.txt jupyterlab ipywidgets")
    return found


def free_port()->int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url:str, timeout:float=10):
    "(status, body) of a GET; HTTP errors give their status instead of raising."
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A headless `jupyter lab nbs/` on a free port with a random token; always stopped afterwards."
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path_factory.mktemp("jupyter-home")      # no config or runtime files in the user's home
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_PLATFORM_DIRS="1")
    log = open(home / "lab.log", "wb")
    cmd = [jupyter(), "lab", "nbs/", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
           f"--IdentityProvider.token={token}", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0: cmd.append("--allow-root")    # containers and CI often run as root; Jupyter refuses without it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with code {proc.returncode}:\n{(home / 'lab.log').read_text()[-2000:]}")
            try:
                if get(f"{base}/api/status?token={token}", timeout=5)[0] == 200: break
            except OSError: pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer within {START_TIMEOUT} s:\n{(home / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
        log.close()


def test_lab_serves_the_course(lab):
    base, token = lab
    status, body = get(f"{base}/api/contents?token={token}")          # the server's root is nbs/
    assert status == 200, status
    names = {item["name"] for item in json.loads(body)["content"]}
    chapters = {p.name for p in (ROOT / "nbs").glob("[0-9]*.ipynb")}
    assert "10_kd_theory.ipynb" in names and chapters <= names, sorted(chapters - names)
    status, body = get(f"{base}/api/contents/10_kd_theory.ipynb?token={token}&content=1", timeout=30)
    assert status == 200 and json.loads(body)["type"] == "notebook"
    status, body = get(f"{base}/lab?token={token}")
    assert status == 200 and b"JupyterLab" in body, status


def test_lab_needs_the_token(lab):
    base, _ = lab
    assert get(f"{base}/api/contents")[0] == 403


def test_widgets_extension_enabled():
    out = subprocess.run([jupyter(), "labextension", "list"], capture_output=True, text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)     # drop the colour codes
    line = next((l for l in text.splitlines() if "@jupyter-widgets/jupyterlab-manager" in l), None)
    assert line is not None, "ipywidgets' JupyterLab extension is missing: pip install -c constraints.txt ipywidgets\n" + text
    assert " enabled" in line and "OK" in line, line
