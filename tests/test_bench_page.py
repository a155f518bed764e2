"""The asv history page, built from the committed results and loaded in a real browser.

``python asv_bench/history.py publish`` builds the page; Chromium (Debian's, driven by
Playwright) loads it from a local server with every request to another host refused, so the
page must work offline. The test checks what a reader sees: the index lists every suite, a
benchmark's graph has one line per parameter combination with one point per result commit
(counted here from the result files, not from the page), the summary graphs all load, and the
console shows no error. It skips, saying why, where asv, Playwright, Chromium or npm (needed
once, to fetch the page's JavaScript libraries) is missing.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "asv_bench" / "results"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags a root, offline, headless Chromium needs here (no sandbox as root, no phoning home)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GRAPHS = [
    "bench_attention.ScaledDotProductAttentionRatio.track_forward_backward",
    "bench_layers.MultiHeadAttention.time_forward_backward",
]


def _requirements() -> None:
    pytest.importorskip("asv", reason="asv is not installed (pip install --group bench)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    if shutil.which("npm") is None and not (ROOT / "asv_bench" / ".vendor").exists():
        pytest.skip("npm is needed once to fetch the page's JavaScript libraries")


def _points_per_series(name: str) -> tuple[int, int]:
    """(parameter combinations, result commits with a value) of ``name``, from the files.

    Only results of the benchmark's current version count: asv leaves out of the graph the
    results of a benchmark whose code has changed since.
    """
    meta = json.loads((RESULTS / "benchmarks.json").read_text())[name]
    combos = 1
    for values in meta["params"]:
        combos *= len(values)
    commits = set()
    for path in (RESULTS / "ci-2core").glob("*.json"):
        data = json.loads(path.read_text())
        entry = data.get("results", {}).get(name)
        if not entry:
            continue
        record = dict(zip(data["result_columns"], entry, strict=False))
        if record["version"] == meta["version"] and any(v is not None for v in record["result"]):
            commits.add(data["commit_hash"])
    return combos, len(commits)


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory) -> Path:
    _requirements()
    out = tmp_path_factory.mktemp("asv") / "html"
    subprocess.run(
        [sys.executable, str(ROOT / "asv_bench" / "history.py"), "publish", "--html-dir", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def server(page_dir):
    handler = functools.partial(_QuietHandler, directory=str(page_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _open(browser, url: str, problems: list[str]):
    """A new page at ``url`` that refuses other hosts and records every error it sees."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def route(r):
        if urlparse(r.request.url).hostname == "127.0.0.1":
            r.continue_()
        else:  # the page must not need the internet
            problems.append(f"request to another host: {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.goto(url)
    return page


def test_page_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    benchmarks = json.loads((RESULTS / "benchmarks.json").read_text())
    suites = sorted({name.split(".")[0] for name in benchmarks if name != "version"})
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _open(browser, server + "index.html", problems)
            page.wait_for_selector(".benchmark-group", timeout=30_000)
            listed = page.eval_on_selector_all(
                ".benchmark-group h1", "els => els.map(e => e.textContent)"
            )
            assert sorted(listed) == suites
            # the summary graphs load as they scroll into view: scroll through all of them
            height = page.evaluate("document.body.scrollHeight")
            for y in range(0, height + 1000, 600):
                page.evaluate(f"window.scrollTo(0, {y})")
                page.wait_for_timeout(50)
            page.wait_for_load_state("networkidle")
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(tmp_path / "index.png"))
            page.close()

            for name in GRAPHS:
                page = _open(browser, f"{server}index.html#{name}", problems)
                page.wait_for_function(
                    "() => $('#main-graph').data('plot') !== undefined", timeout=30_000
                )
                page.wait_for_load_state("networkidle")
                series = page.evaluate(
                    "() => $('#main-graph').data('plot').getData()"
                    ".map(s => s.data.filter(d => d[1] !== null).length)"
                )
                combos, commits = _points_per_series(name)
                # one line per parameter combination that has a value; the longest line has a
                # point for every commit whose results hold the benchmark
                assert commits >= 2 and 1 <= len(series) <= combos, (name, series)
                assert max(series) == commits, (name, series, commits)
                page.screenshot(path=str(tmp_path / f"{name}.png"))
                page.close()
        finally:
            browser.close()
    keep = os.environ.get("REFATTN_SCREENSHOTS")
    if keep:
        shutil.copytree(tmp_path, keep, dirs_exist_ok=True)
    assert problems == []
