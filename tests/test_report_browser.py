"""The report in a real browser: headless Chromium opens reports/index.html, served from the report folder on
localhost, and checks that every link resolves, every image loads, every table renders and nothing outside the
folder is requested. Chromium comes from the system's packages (`.ci/run` installs them where missing)."""
from __future__ import annotations

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# Runs in the page; returns what is broken plus counts, so the test can also see that something was checked.
CHECK_PAGE = """
const done = arguments[arguments.length - 1];
(async () => {
  const bad = [];
  const here = new URL(location.href);
  let links = 0;
  for (const a of document.querySelectorAll('a[href]')) {
    const url = new URL(a.getAttribute('href'), document.baseURI);
    if (url.protocol === 'data:') continue;
    links += 1;
    if (url.origin !== here.origin) { bad.push('link leaves the report: ' + url.href); continue; }
    if (url.pathname === here.pathname) {
      const id = url.hash.slice(1);  // as browsers do: the fragment as written, then percent-decoded
      if (id && !document.getElementById(id) && !document.getElementById(decodeURIComponent(id)))
        bad.push('anchor without a target: ' + url.hash);
      continue;
    }
    const response = await fetch(url.href, {method: 'HEAD'});
    if (!response.ok) bad.push('link ' + url.pathname + ' -> HTTP ' + response.status);
  }
  for (const img of document.images) {
    img.loading = 'eager';  // lazy thumbnails below the fold load now
    try { await img.decode(); } catch (e) { bad.push('image does not load: ' + img.src.slice(0, 120)); continue; }
    if (!img.naturalWidth) bad.push('image is empty: ' + img.src.slice(0, 120));
  }
  const tables = [...document.querySelectorAll('table')];
  for (const table of tables) {
    const box = table.getBoundingClientRect();
    if (!(box.width > 0 && box.height > 0) || !table.querySelector('td'))
      bad.push('table does not render: ' + table.textContent.slice(0, 80));
  }
  const outside = performance.getEntriesByType('resource').map(e => e.name)
    .filter(name => !name.startsWith(here.origin) && !name.startsWith('data:'));
  outside.forEach(name => bad.push('requested from outside the report: ' + name));
  return {bad, links, images: document.images.length, tables: tables.length,
          pages: [...document.querySelectorAll('a[href$=".html"]')].map(a => a.href)};
})().then(done, e => done({bad: ['check failed: ' + e], links: 0, images: 0, tables: 0, pages: []}));
"""


def _browser_or_skip():
    """A headless Chromium driven by Selenium, or a skip (a failure where OCCLAB_REQUIRE_BROWSER=1) naming the fix."""
    try:
        from selenium import webdriver
    except ImportError:
        webdriver, missing = None, ["selenium (pip install -e '.[test]')"]
    else:
        missing = []
    missing += [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    if missing:
        reason = (f"browser test needs {', '.join(missing)}; `.ci/run` installs Debian's chromium and "
                  "chromium-driver where they are missing (apt-get install chromium chromium-driver)")
        if os.environ.get("OCCLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


class _Quiet(SimpleHTTPRequestHandler):
    """Serves a folder without logging every request to stderr."""

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a localhost server over that folder, stopped after the test."""
    servers = []

    def start(folder: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def check(driver, url: str) -> dict:
    """Open url in the browser and run the page checks."""
    driver.get(url)
    return driver.execute_async_script(CHECK_PAGE)


def test_report_in_headless_chromium(quickstart_report, serve) -> None:
    assert quickstart_report.ok, quickstart_report.notebooks[0].error
    driver = _browser_or_skip()
    driver.set_script_timeout(60)
    try:
        base = serve(quickstart_report.out_dir)
        index = check(driver, base + "index.html")
        assert index["bad"] == [], index["bad"]
        # header, notebooks, claims ledger, the class table and its protocol card; PNGs and the GIF
        assert index["tables"] >= 5 and index["images"] >= 4 and index["links"] >= 10, index
        pages = sorted(set(index["pages"]))
        assert any(p.endswith("00_quickstart.html") for p in pages), pages
        for page in pages:  # the notebook's own HTML export: embedded images, nothing from a CDN
            found = check(driver, page)
            assert found["bad"] == [], (page, found["bad"])
            assert found["images"] >= 3, (page, found)
    finally:
        driver.quit()


def test_browser_check_catches_a_broken_report(tmp_path: Path, serve) -> None:
    """The check is not vacuous: a missing image, a dead link, a dangling anchor and a CDN script are reported."""
    driver = _browser_or_skip()
    driver.set_script_timeout(30)
    (tmp_path / "index.html").write_text(
        "<!DOCTYPE html><html><body><a href=\"gone.csv\">x</a><a href=\"#nowhere\">y</a>"
        "<img src=\"missing.png\"><table><tr><td>1</td></tr></table>"
        "<script src=\"https://cdn.example.invalid/x.js\"></script></body></html>")
    try:
        found = check(driver, serve(tmp_path) + "index.html")
    finally:
        driver.quit()
    text = "\n".join(found["bad"])
    assert "gone.csv -> HTTP 404" in text and "#nowhere" in text and "missing.png" in text, text
    assert "cdn.example.invalid" in text, text
