"The documentation site, built and in a real browser: pages, links, figures, no stderr, no machine paths."
import functools, html.parser, http.server, json, os, shutil, threading
from pathlib import Path

import pytest

from conftest import REPO
from vlmrepro.tools.docs import (WIDGET_STATE, broken_links, build_docs, machine_paths, page_name, paper_page, screenshot,
                                 screenshot_pages)
from vlmrepro.registry import SYSTEMS, find_systems, notebook_presets
from vlmrepro.runner import results_root

PAPERS = {name: nb for name, nb in find_systems().items() if name in SYSTEMS and SYSTEMS[name].kind == "paper"}


def test_no_machine_paths_in_committed_files():
    "No committed notebook, result or page carries a path of the machine that produced it."
    bad = machine_paths(REPO)
    assert not bad, (f"{len(bad)} absolute path(s) of the producing machine in committed files; write them relative to the "
                     "repository or the run directory:\n" + "\n".join(bad))


def _need_browser():
    if shutil.which("chromium") and shutil.which("chromedriver"): return
    if os.environ.get("CI"): pytest.fail("CI must have Debian's chromium and chromium-driver (make browser installs them)")
    pytest.skip("chromium/chromedriver not installed (make browser)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The whole site, built once for this module (nbdev's processing of every notebook, then MkDocs)."
    return build_docs(tmp_path_factory.mktemp("docs") / "site")


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.mark.slow
def test_no_broken_internal_links(site):
    assert (site / "index.html").exists()
    assert broken_links(site) == []


@pytest.mark.slow
def test_every_module_and_paper_has_a_page(site):
    for system, nb in find_systems().items():
        assert (site / f"{paper_page(nb)}.html").exists(), system
    for page in ("core", "train", "runner", "cli", "backbones", "zoo", "results", "gpu_guide", "scaling"):
        assert (site / f"{page}.html").exists(), page


@pytest.mark.slow
def test_api_pages_render_show_doc(site):
    html = (site / "train.html").read_text()
    assert "fit" in html and "TrainConfig" in html and "#| export" not in html
    assert "paper_model" in (site / "backbones.html").read_text()   # the module page, not the paper notebook of the same name


@pytest.mark.slow
def test_home_loads_and_navigation_works(browser, server):
    from selenium.webdriver.common.by import By
    browser.get(server + "/index.html")
    assert "vlmrepro" in browser.title
    assert "The two commands" in browser.find_element(By.TAG_NAME, "article").text
    link = browser.find_element(By.CSS_SELECTOR, "nav a[href='train.html']")
    link.click()
    assert browser.current_url.endswith("/train.html")
    assert browser.find_element(By.TAG_NAME, "h1").text.strip().startswith("train")


class _Outputs(html.parser.HTMLParser):
    "Text of the stderr output areas of a page, and the tags of its cells."
    def __init__(self):
        super().__init__(); self.stderr, self.tags, self._depth = [], set(), 0
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.update(c.removeprefix("celltag_") for c in (a.get("class") or "").split() if c.startswith("celltag_"))
        if self._depth: self._depth += 1
        elif a.get("data-mime-type") == "application/vnd.jupyter.stderr": self._depth = 1; self.stderr.append("")
    def handle_endtag(self, tag):
        if self._depth: self._depth -= 1
    def handle_data(self, data):
        if self._depth: self.stderr[-1] += data


def _page(site, nb) -> _Outputs:
    p = _Outputs(); p.feed((site / f"{paper_page(nb)}.html").read_text(encoding="utf-8")); return p


@pytest.mark.slow
def test_paper_pages_keep_parameters_hide_injected_ones_and_show_no_stderr(site):
    "A reader sees the parameters cell, not papermill's injected copy, and no stderr box (warnings, progress-bar text)."
    problems = []
    for system, nb in PAPERS.items():
        page = _page(site, nb)
        if "parameters" not in page.tags: problems.append(f"{system}: no parameters cell on its page")
        if "injected-parameters" in page.tags: problems.append(f"{system}: the injected-parameters cell is shown")
        problems += [f"{system}: stderr on its page: {t.strip()[:160]!r}" for t in page.stderr]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_saved_progress_widgets_are_drawn(site):
    "Each progress widget an executed paper notebook saved is on its page as a progress bar."
    for system, nb in PAPERS.items():
        executed = results_root() / system / "tiny" / f"{system}.ipynb"
        if not executed.exists(): continue
        state = json.loads(executed.read_text()).get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        bars = sum(m.get("model_name") == "FloatProgressModel" for m in state.values())
        html = (site / f"{paper_page(nb)}.html").read_text(encoding="utf-8")
        assert html.count('class="vlm-widget-progress') >= bars, f"{system}: {bars} saved progress bars, fewer drawn"


@pytest.mark.slow
def test_results_page_has_a_figure_per_system(site):
    "The results page shows, for each system with published figures, ours beside the upstream's."
    html = (site / "results.html").read_text(encoding="utf-8")
    for system, nb in PAPERS.items():
        if not notebook_presets(nb)[1] or not list((results_root() / system).glob("*/metrics.json")): continue
        assert f"results_figures/{system}.png" in html and (site / "results_figures" / f"{system}.png").stat().st_size > 5000, system
    assert "not a comparison" in html


@pytest.mark.slow
def test_paper_pages_show_their_figures_and_no_stderr(browser, server):
    from selenium.webdriver.common.by import By
    for system, nb in find_systems().items():
        browser.get(f"{server}/{paper_page(nb)}.html")
        imgs = browser.find_elements(By.CSS_SELECTOR, "article img")
        assert imgs, f"{system}: no figures on its page"
        for img in imgs:
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img), f"{system}: an image did not load"
        if system in PAPERS:
            err = browser.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']")
            assert not [e for e in err if e.is_displayed()], f"{system}: stderr shown: {[e.text[:120] for e in err][:3]}"


@pytest.mark.slow
def test_code_wraps_instead_of_running_off_the_page(browser, server):
    "Every code block and text output on a paper page wraps or scrolls: nothing is cut off at the right edge."
    for system, nb in PAPERS.items():
        browser.get(f"{server}/{paper_page(nb)}.html")
        cut = browser.execute_script("""return Array.from(document.querySelectorAll('article pre')).filter(p => {
            const s = getComputedStyle(p), q = p.parentElement ? getComputedStyle(p.parentElement) : s;
            const wraps = s.whiteSpace.startsWith('pre-wrap') || s.whiteSpace === 'break-spaces';
            const scrolls = ['auto', 'scroll'].includes(s.overflowX) || ['auto', 'scroll'].includes(q.overflowX);
            return p.scrollWidth > p.clientWidth + 1 && !wraps && !scrolls; }).map(p => p.innerText.slice(0, 80));""")
        assert not cut, f"{system}: code cut off at the right edge: {cut[:3]}"


@pytest.mark.slow
def test_screenshots_cover_the_paper_pages(site, tmp_path):
    _need_browser()
    pages = screenshot_pages()
    assert pages[0] == "index" and "results" in pages and all(paper_page(nb) in pages for nb in PAPERS.values())
    png = screenshot(site / f"{paper_page(next(iter(PAPERS.values())))}.html", tmp_path / "paper.png", height=1600)
    assert png.stat().st_size > 10_000
