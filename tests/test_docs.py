"The documentation site in a real browser: pages load, navigation works, paper pages show figures, no broken links."
import functools, http.server, os, shutil, threading
from pathlib import Path

import pytest

from vlmrepro.tools.docs import broken_links, build_docs, page_name, paper_page, screenshot
from vlmrepro.registry import find_systems


def _need_browser():
    if shutil.which("chromium") and shutil.which("chromedriver"): return
    if os.environ.get("CI"): pytest.fail("CI must have Debian's chromium and chromium-driver (make browser installs them)")
    pytest.skip("chromium/chromedriver not installed (make browser)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
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
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_no_broken_internal_links(site):
    assert (site / "index.html").exists()
    assert broken_links(site) == []


def test_every_module_and_paper_has_a_page(site):
    for system, nb in find_systems().items():
        assert (site / f"{paper_page(nb)}.html").exists(), system
    for page in ("core", "train", "runner", "cli", "backbones", "zoo", "results", "gpu_guide", "scaling"):
        assert (site / f"{page}.html").exists(), page


def test_api_pages_render_show_doc(site):
    html = (site / "train.html").read_text()
    assert "fit" in html and "TrainConfig" in html and "#| export" not in html
    assert "paper_model" in (site / "backbones.html").read_text()   # the module page, not the paper notebook of the same name


def test_home_loads_and_navigation_works(browser, server):
    from selenium.webdriver.common.by import By
    browser.get(server + "/index.html")
    assert "vlmrepro" in browser.title
    assert "The two commands" in browser.find_element(By.TAG_NAME, "article").text
    link = browser.find_element(By.CSS_SELECTOR, "nav a[href='train.html']")
    link.click()
    assert browser.current_url.endswith("/train.html")
    assert browser.find_element(By.TAG_NAME, "h1").text.strip().startswith("train")


def test_paper_pages_show_their_figures(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    for system, nb in find_systems().items():
        browser.get(f"{server}/{paper_page(nb)}.html")
        imgs = browser.find_elements(By.CSS_SELECTOR, "article img")
        assert imgs, f"{system}: no figures on its page"
        for img in imgs:
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img), f"{system}: an image did not load"


def test_screenshot(site, tmp_path):
    _need_browser()
    png = screenshot(site / "index.html", tmp_path / "home.png")
    assert png.stat().st_size > 10_000
