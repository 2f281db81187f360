"""Untrusted files: no pickle, torch.load only with weights_only=True, safetensors for weights, no remote code by default.

The library's source (vlmrepro/ and every code cell of nbs/, papers included) is parsed with `ast` and searched for the
calls that can run code from a file. Two restricted unpicklers are allowed, each for a reason stated in ALLOWED below,
and each is also attacked here with a pickle that would run `os.system` to show that it refuses; two writers of upstream
.pt/.pth layouts (the converters' offline round trips) are the library's only torch.save.
"""
import ast, io, json, pickle, re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# (file, enclosing class or function, what) -> why it is safe
ALLOWED = {
    ("vlmrepro/metrics/recognition.py", "_SetOnlyUnpickler", "pickle.Unpickler"):
        "reads the textblob-aptagger POS model (dicts of floats and sets); find_class resolves `set` and nothing else, so "
        "no callable can be reached; tested below",
    ("vlmrepro/systems/fromage/index.py", "_ArrayUnpickler", "pickle.Unpickler"):
        "converts upstream FROMAGe's cc3m_embeddings.pkl once; find_class resolves only numpy's array-rebuilding globals, "
        "and import_upstream_embeddings refuses to call it unless trust_pickle=True; tested below",
    ("vlmrepro/systems/illume/convert.py", "deepspeed_checkpoint", "torch.save"):
        "writes a file in the layout of upstream's released checkpoint (DeepSpeed's mp_rank_00_model_states.pt), so the "
        "converter's round trip runs offline; the converter reads it back with weights_only=True",
    ("vlmrepro/systems/prismer/convert.py", "upstream_checkpoint", "torch.save"):
        "writes random tensors in the layout of upstream's released .pth, so the converter's round trip runs offline; the "
        "converter reads it back with weights_only=True",
}
ALLOWED.update({(f"nbs/{nb}.ipynb", scope, what): why for (file, scope, what), why in list(ALLOWED.items())   # their notebooks
                for nb in {"vlmrepro/metrics/recognition.py": ["22_metrics_recognition"], "vlmrepro/systems/fromage/index.py": ["61_fromage_index"]}.get(file, [])})
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources():
    "(display name, python source) of every library module and every notebook code cell (magics blanked)."
    for p in sorted((REPO/"vlmrepro").rglob("*.py")):
        if p.name != "_modidx.py": yield p.relative_to(REPO).as_posix(), p.read_text()
    for p in sorted((REPO/"nbs").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in p.parts: continue
        cells = [c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code"]
        for i, c in enumerate(cells):
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            src = "\n".join("" if re.match(r"\s*[%!]", l) else l for l in src.splitlines())   # IPython magics and shell lines
            yield f"{p.relative_to(REPO).as_posix()} cell {i}", src


def _dotted(node) -> str:
    if isinstance(node, ast.Name): return node.id
    if isinstance(node, ast.Attribute): return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool: return isinstance(node, ast.Constant) and node.value is True


class _Scanner(ast.NodeVisitor):
    def __init__(self, name):
        self.name, self.scope, self.found = name, ["<module>"], []

    def hit(self, node, what, detail):
        file = self.name.split(" cell ")[0]
        if (file, self.scope[-1], what) in ALLOWED: return
        self.found.append(f"{self.name}:{getattr(node, 'lineno', '?')} in {self.scope[-1]}: {what} ({detail})")

    def _scoped(self, node):
        self.scope.append(node.name); self.generic_visit(node); self.scope.pop()
    visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        for b in node.bases:
            if _dotted(b) in ("pickle.Unpickler", "Unpickler", "_pickle.Unpickler"): self.hit(node, "pickle.Unpickler", "subclass")
        self.generic_visit(node); self.scope.pop()

    def visit_Call(self, node):
        f = _dotted(node.func)
        mod, _, attr = f.rpartition(".")
        if mod.split(".")[0] in PICKLE_MODULES and attr in ("load", "loads", "Unpickler", "open"):
            self.hit(node, f"{mod}.{attr}", "pickle can run code on load")
        if mod.split(".")[0] in PICKLE_MODULES and attr in ("dump", "dumps") and self.name.startswith("vlmrepro/"):
            self.hit(node, f"{mod}.{attr}", "the library writes no pickle (a notebook's test may write one to attack a loader)")
        if f == "torch.load" and not _is_true(_kw(node, "weights_only")):
            self.hit(node, "torch.load", "needs weights_only=True")
        if f == "torch.save" and self.name.startswith("vlmrepro/"):
            self.hit(node, "torch.save", "tensors go to safetensors (a notebook's test may write an upstream .pt to convert)")
        if attr == "load" and mod in ("np", "numpy") and _is_true(_kw(node, "allow_pickle")):
            self.hit(node, "np.load", "allow_pickle=True")
        if f in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and not (f == "yaml.load" and "Safe" in _dotted(_kw(node, "Loader") or ast.Name(""))):
            self.hit(node, f, "use yaml.safe_load")
        if _is_true(_kw(node, "trust_remote_code")):
            self.hit(node, "trust_remote_code=True", "remote code must never be on by default")
        if attr == "save_pretrained" and isinstance(_kw(node, "safe_serialization"), ast.Constant) and not _kw(node, "safe_serialization").value:
            self.hit(node, "save_pretrained(safe_serialization=False)", "weights must be safetensors")
        if f in ("eval", "exec"):
            self.hit(node, f, "code from a string")
        self.generic_visit(node)

    def visit_arguments(self, node):
        names = [a.arg for a in node.args + node.kwonlyargs]
        defaults = [None] * (len(node.args) - len(node.defaults)) + list(node.defaults) + list(node.kw_defaults)
        for n, d in zip(names, defaults):
            if n == "trust_remote_code" and _is_true(d): self.hit(node, "trust_remote_code=True", "as a default")
        self.generic_visit(node)


def _scan(name, src):
    try: tree = ast.parse(src)
    except SyntaxError as e: pytest.fail(f"{name} does not parse: {e}")
    s = _Scanner(name); s.visit(tree)
    return s.found


def test_scanner_catches_each_violation():
    bad = ("import pickle, torch, numpy as np, yaml\n"
           "pickle.loads(b'')\ntorch.load('x.pt')\ntorch.load('x.pt', weights_only=False)\ntorch.save({}, 'x')\n"
           "np.load('a.npy', allow_pickle=True)\nyaml.load('a')\n"
           "def f(trust_remote_code=True): pass\nm.from_pretrained('x', trust_remote_code=True)\n"
           "m.save_pretrained('d', safe_serialization=False)\neval('1')\n"
           "class U(pickle.Unpickler): pass\n")
    found = _scan("vlmrepro/probe.py", bad)
    for what in ("pickle.loads", "torch.load", "torch.save", "np.load", "yaml.load", "trust_remote_code=True",
                 "save_pretrained", "eval", "pickle.Unpickler"):
        assert any(f": {what}" in f for f in found), (what, found)
    assert sum(": torch.load" in f for f in found) == 2
    ok = "import torch, numpy as np, yaml\ntorch.load('x', weights_only=True)\nnp.load('a.npy')\nyaml.safe_load('a')\nast.literal_eval('1')\n"
    assert _scan("vlmrepro/probe.py", ok) == []


def test_library_has_no_unsafe_loading():
    found = [f for name, src in _sources() for f in _scan(name, src)]
    assert not found, "unsafe loading in the library:\n" + "\n".join(found)


def test_allow_list_is_current():
    "Every allow-listed class or function still exists where the list says (a stale entry would hide nothing, but mislead)."
    for file, scope, _ in ALLOWED:
        if not file.endswith(".py"): continue
        tree = ast.parse((REPO/file).read_text())
        assert any(isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == scope for n in ast.walk(tree)), (file, scope)


class _Boom:
    "Unpickling this runs os.system (the classic pickle attack)."
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpicklers_refuse_code(tmp_path):
    from vlmrepro.systems.fromage.index import import_upstream_embeddings
    from vlmrepro.metrics.recognition import _SetOnlyUnpickler
    from vlmrepro.core import VlmreproError
    evil = pickle.dumps({"paths": ["a"], "embeddings": _Boom()})
    with pytest.raises(pickle.UnpicklingError, match="refusing"): _SetOnlyUnpickler(io.BytesIO(evil)).load()
    assert _SetOnlyUnpickler(io.BytesIO(pickle.dumps(({"a": {"b": 1.0}}, {"x": "NN"}, {"NN", "VB"})))).load()[2] == {"NN", "VB"}
    (tmp_path/"cc3m_embeddings.pkl").write_bytes(evil)
    with pytest.raises(VlmreproError, match="trust_pickle"):
        import_upstream_embeddings(tmp_path/"cc3m_embeddings.pkl", tmp_path/"idx")
    with pytest.warns(UserWarning), pytest.raises(VlmreproError, match="posix.system|os.system|nt.system"):
        import_upstream_embeddings(tmp_path/"cc3m_embeddings.pkl", tmp_path/"idx", trust_pickle=True)
    assert not (tmp_path/"idx").exists()
    good = pickle.dumps({"paths": ["a.jpg", "b.jpg"], "embeddings": np.eye(2, 3, dtype=np.float32)})
    (tmp_path/"ok.pkl").write_bytes(good)
    with pytest.warns(UserWarning): out = import_upstream_embeddings(tmp_path/"ok.pkl", tmp_path/"idx", trust_pickle=True)
    assert json.loads((out/"index.json").read_text())["count"] == 2


def test_trust_remote_code_defaults_off():
    "No factory in the library turns remote code on: every from_pretrained call leaves it at transformers' default (False)."
    hits = []
    for name, src in _sources():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and _dotted(node.func).endswith("from_pretrained"):
                v = _kw(node, "trust_remote_code")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False): hits.append(f"{name}:{node.lineno}")
    assert not hits, f"trust_remote_code passed through (must stay False by default): {hits}"
