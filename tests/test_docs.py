"""The documentation site, opened in headless Chromium: every chapter page loads without console
errors, its figures have a size, and the API docs of named functions are on the page.

The site is built by `scripts/test.sh` (nbdev_proc_nbs, then scripts/build_docs.py) into `_site/`;
a screenshot of every page is stored in `_site/screenshots/` for a person to look at.
"""
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_site"
API = {"core.html": ["set_mode", "eval_mode"], "models.html": ["save_model", "load_model"],
       "profile.html": ["count_macs", "model_bytes"], "kd_theory.html": ["kd_loss", "DistillationCB"],
       "learner.html": ["Learner"]}


@pytest.fixture(scope="module")
def site_url():
    if not (SITE / "index.html").is_file():
        pytest.fail("no built site in _site/: run scripts/test.sh (or nbdev_proc_nbs + python scripts/build_docs.py) first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    exe, drv = shutil.which("chromium"), shutil.which("chromedriver")
    if not exe or not drv:
        pytest.fail("Debian's chromium and chromium-driver are needed: run 'sudo bash scripts/install_docs_tools.sh'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(drv), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def built_pages():
    "Chapter pages of the built site, in sidebar order (mkdocs keeps nbdev's output-file names)."
    nav = yaml.safe_load((ROOT / "_docs_build" / "mkdocs.yml").read_text())["nav"]
    pages = []
    def walk(items):
        for it in items:
            for v in it.values():
                if isinstance(v, str): pages.append(v.replace(".md", ".html"))
                else: walk(v)
    walk(nav)
    return pages


def test_every_chapter_has_a_page():
    assert (ROOT / "_docs_build" / "mkdocs.yml").is_file(), "site not built"
    pages = built_pages()
    n_chapters = sum(1 for _ in (ROOT / "nbs").glob("[0-9]*.ipynb"))
    assert len(pages) == n_chapters + 1, (len(pages), n_chapters)
    for p in pages: assert (SITE / p).is_file(), p


def test_pages_in_a_browser(site_url, browser):
    shots = SITE / "screenshots"; shots.mkdir(exist_ok=True)
    problems = []
    for page in built_pages():
        browser.get(f"{site_url}/{page}")
        browser.execute_script("return document.fonts ? document.fonts.ready : null")
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        if errors: problems.append(f"{page}: console errors {errors[:3]}")
        imgs = browser.execute_script(
            "return Array.from(document.querySelectorAll('article img')).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
        for src, done, w, h in imgs:
            if not done or w == 0 or h == 0: problems.append(f"{page}: figure {src} has no size ({w}x{h})")
        text = browser.find_element("tag name", "article").text
        if len(text) < 200: problems.append(f"{page}: almost no text ({len(text)} characters)")
        for name in API.get(page, []):
            heads = browser.execute_script("return Array.from(document.querySelectorAll('article h3, article h4')).map(h => h.textContent.trim())")
            if not any(h.startswith(name) for h in heads): problems.append(f"{page}: no API docs for {name}")
        browser.save_screenshot(str(shots / page.replace(".html", ".png")))
    assert not problems, "\n".join(problems)
    assert any((SITE / "screenshots").glob("*.png"))
