"JupyterLab: the server starts on the repository and runs a paper notebook through a kernel via its REST and websocket API."
import json, os, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path

import pytest

from conftest import REPO


def _free_port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    port, token = _free_port(), uuid.uuid4().hex
    jupyter = Path(sys.executable).parent / "jupyter"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.Popen([str(jupyter), "lab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2); break
        except OSError:
            assert proc.poll() is None, "jupyter lab exited during start-up"
            assert time.time() < deadline, "jupyter lab did not answer within 90 s"
            time.sleep(0.5)
    yield base, token
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()


def _api(base, token, path, method="GET", body=None):
    req = urllib.request.Request(f"{base}{path}?token={token}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read() or "null")


def _execute(ws, code, timeout=300):
    "Send one execute_request; return (status, error text) from its execute_reply."
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                                   "version": "5.3"}, "parent_header": {}, "metadata": {}, "channel": "shell",
                        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}}))
    deadline, error = time.time() + timeout, None
    while time.time() < deadline:
        m = json.loads(ws.recv())
        if m.get("parent_header", {}).get("msg_id") != msg_id: continue
        if m["msg_type"] == "error": error = f"{m['content']['ename']}: {m['content']['evalue']}"
        if m["msg_type"] == "execute_reply": return m["content"]["status"], error
    raise TimeoutError(code[:80])


def test_lab_runs_a_paper_notebook_through_a_kernel(lab):
    import websocket
    base, token = lab
    nb = _api(base, token, "/api/contents/nbs/papers/quickstart.ipynb")["content"]
    assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
    kernel = _api(base, token, "/api/kernels", "POST", {"name": "python3"})
    ws = websocket.create_connection(f"{base.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels?token={token}", timeout=300)
    try:
        assert _execute(ws, f"import os; os.chdir({str(REPO / 'nbs' / 'papers')!r})")[0] == "ok"
        for cell in nb["cells"]:
            if cell["cell_type"] != "code": continue
            src = cell["source"]
            if "parameters" in cell["metadata"].get("tags", []): src += "\nepochs = 1; n_train = 512"   # tiny preset, shortened
            status, error = _execute(ws, src)
            assert status == "ok", f"cell failed: {error}\n{src[:200]}"
        status, _ = _execute(ws, "assert 'val/acc' in metrics and metrics['val/acc'] > 0")
        assert status == "ok"
    finally:
        ws.close()
        _api(base, token, f"/api/kernels/{kernel['id']}", "DELETE")


# ------------------------------------------------------------------ the JupyterLab UI in a real browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1400,1000")


def _need_browser():
    import shutil
    if shutil.which("chromium") and shutil.which("chromedriver"): return
    if os.environ.get("CI"): pytest.fail("CI must have Debian's chromium and chromium-driver (make system installs them)")
    pytest.skip("chromium/chromedriver not installed (make system)")


def _project_kernel(jupyter_path: Path) -> str:
    "The kernel `make kernel` registers ('vlmrepro': this environment's Python); registered under `jupyter_path` if missing."
    specs = json.loads(subprocess.run([str(Path(sys.executable).parent / "jupyter"), "kernelspec", "list", "--json"],
                                      capture_output=True, text=True, check=True).stdout)["kernelspecs"]
    if "vlmrepro" not in specs:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(jupyter_path), "--name", "vlmrepro",
                        "--display-name", "vlmrepro (.venv)"], check=True, capture_output=True)
    return "vlmrepro"


@pytest.fixture
def lab_ui(tmp_path):
    "JupyterLab serving a copy of nbs/papers/quickstart.ipynb (shortened, on the project's kernel), and a headless Chromium."
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    import shutil
    kernel = _project_kernel(tmp_path / "prefix")
    nb = json.loads((REPO / "nbs" / "papers" / "quickstart.ipynb").read_text())
    for cell in nb["cells"]:
        if "parameters" in cell["metadata"].get("tags", []):
            cell["source"] = "".join(cell["source"]) + "\nepochs = 1; n_train = 512; n_val = 128   # shortened for the test\n"
    nb["metadata"]["kernelspec"] = {"name": kernel, "display_name": "vlmrepro (.venv)", "language": "python"}
    work = tmp_path / "work"; work.mkdir()
    (work / "quickstart.ipynb").write_text(json.dumps(nb))
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_PATH": str(tmp_path / "prefix" / "share" / "jupyter")}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root", f"--port={port}",
                             "--ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
                             "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
                             f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try: urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2); break
        except OSError:
            assert proc.poll() is None, "jupyter lab exited during start-up"
            assert time.time() < deadline, "jupyter lab did not answer within 120 s"
            time.sleep(0.5)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"): opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    drv.set_page_load_timeout(120)
    try: yield drv, f"{base}/lab/tree/quickstart.ipynb?token={token}", kernel
    finally:
        drv.quit()
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()


def _wait_js(drv, script: str, timeout: float, what: str):
    "Poll `script` (a JavaScript expression) in the page until it is truthy; return its value."
    deadline = time.time() + timeout
    while time.time() < deadline:
        try: value = drv.execute_script(f"try {{ return {script}; }} catch (e) {{ return null; }}")
        except Exception: value = None
        if value: return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


PANEL = "window.jupyterapp.shell.currentWidget"


@pytest.mark.slow
def test_lab_ui_runs_a_paper_notebook_with_figures_and_a_progress_widget(lab_ui):
    "Open the notebook in JupyterLab's UI, Run All on the project's kernel, find its figures and fit's progress bar widget."
    drv, url, kernel = lab_ui
    drv.get(url)
    _wait_js(drv, f"{PANEL} && {PANEL}.context && {PANEL}.context.isReady && {PANEL}.sessionContext.session.kernel.name === '{kernel}' "
                  f"&& {PANEL}.sessionContext.session.kernel.status === 'idle'", 180, "the notebook and its kernel")
    drv.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    cells = f"{PANEL}.content.widgets.filter(c => c.model.type === 'code')"
    _wait_js(drv, f"{cells}.every(c => c.model.executionCount !== null) && {PANEL}.sessionContext.session.kernel.status === 'idle'",
             900, "every cell to run")
    errors = drv.execute_script(f"return {cells}.flatMap(c => c.model.outputs.toJSON()).filter(o => o.output_type === 'error')"
                                ".map(o => o.ename + ': ' + o.evalue);")
    assert not errors, errors
    figures = drv.execute_script("return Array.from(document.querySelectorAll('.jp-OutputArea-output img'))"
                                 ".filter(i => i.complete && i.naturalWidth > 0).length;")
    assert figures >= 3, f"{figures} rendered figures (the notebook draws images, curves and predictions)"
    bar = drv.execute_script("const p = document.querySelector('.jp-OutputArea-output .widget-hprogress, .jp-OutputArea-output .widget-progress');"
                             "if (!p) return null; const b = p.querySelector('.progress-bar');"
                             "return {width: b ? b.getBoundingClientRect().width : 0, text: p.closest('.widget-hbox, .jp-OutputArea-output').innerText};")
    if bar is None:
        outs = drv.execute_script(f"return {cells}.flatMap(c => c.model.outputs.toJSON()).map(o => o.output_type + ' ' + "
                                  "Object.keys(o.data || {}).join(',') + ' ' + JSON.stringify(o.text || (o.data || {})['text/plain'] || '').slice(0, 100));")
        classes = drv.execute_script("return Array.from(document.querySelectorAll('.jp-OutputArea-output')).map(e => e.className + ' | ' "
                                     "+ (e.firstElementChild ? e.firstElementChild.className : '')).slice(0, 30);")
        raise AssertionError(f"fit's progress bar is not a rendered widget (is ipywidgets installed, and fit on tqdm.auto?)\n"
                             f"outputs: {outs}\nelements: {classes}")
    assert bar["width"] > 0 and "100%" in bar["text"], bar
    page = drv.execute_script("return document.body.innerText;")
    assert "IProgress not found" not in page
