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
