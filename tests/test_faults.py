"""kill -9 at controlled points, then the same command again: it resumes, nothing finished is redone or lost, and no
half-written file is read as valid.

Each fault runs a real child process (`python -c` of a small driver, or the `vlmrepro` command) and SIGKILLs it once a
marker file appears. The driver places the marker by wrapping one library function in the child only (the library has
no test hooks), e.g. it sleeps inside `save_model_weights` after the weights reached the temporary checkpoint
directory but before the manifest and the rename. Everything is tiny: a 3-layer MLP, 8 synthetic images, a notebook of
two cells, ILLUME's smallest loop.
"""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def spawn(args, log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env or ENV, start_new_session=True)


def python(code: str, *args) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def kill_at(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 240):
    "Wait for `marker`, then SIGKILL the child's whole session (papermill's kernel included)."
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None: pytest.fail(f"the child ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.time() > deadline: os.killpg(proc.pid, signal.SIGKILL); pytest.fail("kill point not reached in time")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL


def finish(args, log: Path, timeout: float = 300, env=None) -> str:
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or ENV)
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout + r.stderr


# ---- training (fit) and checkpoint writes ----

FIT = """
import sys, time
from pathlib import Path
import torch
import vlmrepro.checkpoint as ck
from vlmrepro.train import TrainConfig, fit

out, mode = Path(sys.argv[1]), sys.argv[2]                # mode: none | step:N | weights:N | pointer:N
marker = out.parent/"marker"
def hang(): marker.touch(); time.sleep(600)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
g = torch.Generator().manual_seed(1)
X = torch.randn(64, 8, generator=g); Y = X.sum(1, keepdim=True)
data = [{"x": X[i], "y": Y[i]} for i in range(64)]
def loss_fn(m, b): return torch.nn.functional.mse_loss(m(b["x"]), b["y"])
class Steps:
    def after_step(self, model, st):
        with open(out.parent/"steps.log", "a") as f: f.write(f"{st['step']}\\n")
        if mode == f"step:{st['step']}": hang()
kind, _, n = mode.partition(":")
calls = [0]
if kind == "weights":                                     # inside save_checkpoint: weights written, no manifest, no rename
    orig_w = ck.save_model_weights
    def save_model_weights(*a, **k):
        r = orig_w(*a, **k); calls[0] += 1
        if calls[0] == int(n): hang()
        return r
    ck.save_model_weights = save_model_weights
if kind == "pointer":                                     # checkpoint directory renamed into place, latest.json not yet moved
    orig_j = ck.write_json
    def write_json(path, obj, *a, **k):
        if Path(path).name == "latest.json":
            calls[0] += 1
            if calls[0] == int(n): hang()
        return orig_j(path, obj, *a, **k)
    ck.write_json = write_json
cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, ckpt_every=3, log_every=1, progress=False, device="cpu", seed=0)
res = fit(model, data, cfg, out, loss_fn=loss_fn, callbacks=[Steps()])
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.parent/"final.safetensors"))
print("DONE", res.step)
"""


@pytest.fixture(scope="module")
def fit_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("fitref")
    finish(python(FIT, d/"run", "none"), d/"log")
    return d


def _losses(run: Path) -> list[int]:
    recs = [json.loads(l) for l in (run/"metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "train/loss" in r]


@pytest.mark.parametrize("mode,resume_from", [
    ("step:5", 3),          # between checkpoints: steps 4-5 are redone from step-3, nothing before
    ("weights:2", 3),       # while writing checkpoint step-6: its half directory is ignored, step-3 is used
    ("pointer:2", 3),       # step-6 complete on disk but latest.json still names step-3: step-3 is used
])
def test_fit_killed(tmp_path, fit_reference, mode, resume_from):
    run = tmp_path/"run"
    kill_at(spawn(python(FIT, run, mode), tmp_path/"log1"), tmp_path/"marker", tmp_path/"log1")
    ck = run/"checkpoints"
    assert json.loads((ck/"latest.json").read_text())["checkpoint"] == f"step-{resume_from:07d}"
    if mode.startswith("weights"):
        assert not (ck/"step-0000006").exists() and any(p.name.startswith(".step-0000006.") for p in ck.iterdir())
    before = (ck/f"step-{resume_from:07d}"/"manifest.json").read_bytes()
    (tmp_path/"steps.log").write_text("")
    out = finish(python(FIT, run, "none"), tmp_path/"log2")
    assert f"resumed from {ck/f'step-{resume_from:07d}'} (step {resume_from}" in out
    assert (tmp_path/"steps.log").read_text().split() == [str(s) for s in range(resume_from + 1, 17)]   # nothing before is redone
    assert _losses(run) == list(range(1, 17))                                # the log was cut back: no step twice, none lost
    want, got = load_file(str(fit_reference/"final.safetensors")), load_file(str(tmp_path/"final.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ from an uninterrupted run"
    assert (ck/f"step-{resume_from:07d}").exists() is False or (ck/f"step-{resume_from:07d}"/"manifest.json").read_bytes() == before



def test_fit_killed_before_its_first_checkpoint(tmp_path, fit_reference):
    "Log lines but no checkpoint yet: the re-run starts over and its log holds every step once, not the dead run's lines too."
    run = tmp_path/"run"
    kill_at(spawn(python(FIT, run, "step:3"), tmp_path/"log1"), tmp_path/"marker", tmp_path/"log1")   # before checkpoint step-3
    assert not (run/"checkpoints"/"latest.json").exists() and _losses(run) == [1, 2]
    out = finish(python(FIT, run, "none"), tmp_path/"log2")
    assert "resumed from" not in out
    assert _losses(run) == list(range(1, 17))
    want, got = load_file(str(fit_reference/"final.safetensors")), load_file(str(tmp_path/"final.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want), "the restarted run's weights differ from an uninterrupted run"

def test_fit_cleans_up_a_torn_checkpoint_directory(tmp_path):
    run = tmp_path/"run"
    kill_at(spawn(python(FIT, run, "weights:2"), tmp_path/"log1"), tmp_path/"marker", tmp_path/"log1")
    finish(python(FIT, run, "none"), tmp_path/"log2")
    assert not [p.name for p in (run/"checkpoints").iterdir() if p.name.startswith(".")]


def test_damaged_checkpoint_is_refused_not_loaded(tmp_path, fit_reference):
    "A checkpoint whose bytes no longer match its manifest (a torn write, a bad disk) is an error, never loaded."
    import shutil
    from vlmrepro.core import VlmreproError
    from vlmrepro.checkpoint import load_checkpoint
    run = tmp_path/"run"; shutil.copytree(fit_reference/"run", run)
    ckpt = run/"checkpoints"/json.loads((run/"checkpoints"/"latest.json").read_text())["checkpoint"]
    w = ckpt/"model.safetensors"; good = w.read_bytes(); raw = bytearray(good); raw[-1] ^= 0xFF; w.write_bytes(bytes(raw))
    with pytest.raises(VlmreproError, match="damaged.*model.safetensors"): load_checkpoint(ckpt)
    w.write_bytes(good)
    (ckpt/"state.json").unlink()
    with pytest.raises(VlmreproError, match="damaged.*state.json"): load_checkpoint(ckpt)


# ---- expert labelling ----

EXPERTS = """
import sys, time, contextlib
from pathlib import Path
import vlmrepro.systems.prismer.experts as ex
data, labels, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
orig, n = ex.atomic_write, [0]
@contextlib.contextmanager
def atomic_write(path, mode="w", **kw):
    with orig(path, mode, **kw) as f:
        yield f
        if str(path).endswith(".png"):
            n[0] += 1
            if n[0] == kill_after: f.flush(); Path(labels).with_name("marker").touch(); time.sleep(600)   # bytes written, not renamed
ex.atomic_write = atomic_write
from vlmrepro.cli import main
sys.exit(main(["experts", "--data", data, "--label-root", labels, "--experts", "depth,normal,edge",
               "--backend", "normal=classic", "edge=classic"]))
"""


def test_experts_killed_mid_label(tmp_path):
    from PIL import Image
    from vlmrepro.data.synth import write_world
    world = write_world(tmp_path/"world", n_train=6, n_val=2, n_test=0, image_size=32, seed=3)
    labels = tmp_path/"labels"
    kill_at(spawn(python(EXPERTS, world, labels, 11), tmp_path/"log1"), tmp_path/"marker", tmp_path/"log1")
    done = {p: p.stat().st_mtime_ns for p in labels.rglob("*.png")}
    assert len(done) == 10                                   # the 11th png was written to its temporary file only
    assert any(p.name.endswith(".tmp") for p in labels.rglob(".*"))
    out = finish(python(EXPERTS, world, labels, 0), tmp_path/"log2")
    written = {l.split()[0]: (int(l.split()[3]), int(l.split()[6])) for l in out.splitlines() if "already done" in l}
    assert sum(w for w, _ in written.values()) == 24 - 10 and sum(s for _, s in written.values()) == 10, out
    pngs = sorted(p for p in labels.rglob("*.png"))
    assert len(pngs) == 24
    for p in pngs: Image.open(p).load()                      # every label is a whole image
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "a finished label was rewritten"


# ---- a sweep of notebook runs ----

def _notebook(path: Path):
    cells = [("parameters", "seed = 0\nrun_dir = None"),
             (None, "import os, pathlib, time\nfrom vlmrepro.runner import start_run, save_metrics\nrun_dir = start_run(run_dir)\n"
                    "marker = os.environ.get('FAULT_MARKER')\n"
                    "if marker and seed == 1: pathlib.Path(marker).touch(); time.sleep(600)\n"
                    "save_metrics(run_dir, {'val/seed': seed}, 'fault test')")]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {"tags": [t] if t else []},
                     "outputs": [], "source": s} for i, (t, s) in enumerate(cells)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def test_sweep_killed_mid_run(tmp_path, vlmrepro_cmd):
    nb = tmp_path/"faulty.ipynb"; _notebook(nb)
    grid = tmp_path/"s.yaml"; grid.write_text(f"system: {nb}\nname: s\ngrid:\n  seed: [0, 1, 2]\n")
    res = tmp_path/"res"
    args = [*vlmrepro_cmd, "sweep", str(grid), "--results", str(res)]
    kill_at(spawn(args, tmp_path/"log1", {**ENV, "FAULT_MARKER": str(tmp_path/"marker")}), tmp_path/"marker", tmp_path/"log1")
    runs = res/"faulty"
    first = (runs/"s-000"/"metrics.json").stat().st_mtime_ns
    assert json.loads((runs/"s-001"/"status.json").read_text())["status"] == "running"
    assert not (runs/"s-001"/"metrics.json").exists() and not (runs/"s-002").exists()
    time.sleep(1)                                            # the orphaned kernel sees its parent gone and exits
    out = finish(args, tmp_path/"log2")
    assert "faulty/s-000: already done" in out and "faulty/s-001: resuming an unfinished run" in out
    assert "sweep: 3 finished, 0 failed" in out
    assert (runs/"s-000"/"metrics.json").stat().st_mtime_ns == first
    assert [json.loads((runs/f"s-00{i}"/"metrics.json").read_text())["val/seed"] for i in range(3)] == [0, 1, 2]
    assert not (runs/"s-001"/".lock").exists()


# ---- an ILLUME stage ----

ILLUME = """
import sys, time
from pathlib import Path
import torch
from vlmrepro.systems.illume.loop import IllumeLoop, LoopSettings, MetricCritic, illume_optimizer, split_features
from vlmrepro.train import TrainConfig
from vlmrepro.data.readers import read_vqax
from vlmrepro.data.synth import synthetic_world
from vlmrepro.backbones import grid_encoder
from vlmrepro.systems.illume.magma import build_magma, trainable
work, kill = Path(sys.argv[1]), sys.argv[2] == "kill"
root = synthetic_world(work/"world", n_train=12, n_val=6, n_test=0, image_size=64, seed=1)
enc, proc = grid_encoder("tiny-grid")
train, val = (split_features(read_vqax(root, s, verbose=False), enc, proc, work/f"{s}.safetensors") for s in ("train", "val"))
dim = train.features.shape[-1]
def make_model():
    torch.manual_seed(0); m, _ = build_magma("tiny-llama", dim); trainable(m, "adapters"); return m
_, tok = build_magma("tiny-llama", dim)
settings = LoopSettings(iterations=1, n_per_temperature=2, max_new_tokens=12, n_vqa_only=8, official_metrics=False)
tune = TrainConfig(epochs=2, batch_size=8, schedule="constant", max_grad_norm=None, progress=False, seed=0)
class Kill:
    def after_step(self, model, st):
        if kill and (work/"run"/"it0"/"tune"/"checkpoints"/"latest.json").exists():   # the first step after the epoch-1 checkpoint
            (work/"marker").touch(); time.sleep(600)
loop = IllumeLoop(work/"run", settings, tune, make_model, lambda m: illume_optimizer(m, 3e-3), tok, train, val,
                  MetricCritic(threshold=0.3), log=print, callbacks=[Kill()])
print("SUMMARY", loop.run())
"""


def test_illume_killed_in_tune(tmp_path):
    kill_at(spawn(python(ILLUME, tmp_path, "kill"), tmp_path/"log1"), tmp_path/"marker", tmp_path/"log1")
    it0 = tmp_path/"run"/"it0"
    stages = {f: ((it0/f).read_bytes(), (it0/f).stat().st_mtime_ns) for f in ("samples.json", "critic.json", "dataset.json")}
    assert not (it0/"selected.json").exists() and (it0/"tune"/"checkpoints"/"latest.json").exists()
    out = finish(python(ILLUME, tmp_path, "no"), tmp_path/"log2")
    assert "iteration 0: tune" in out and "iteration 0: sample" not in out and "resumed from" in out
    assert all(((it0/f).read_bytes(), (it0/f).stat().st_mtime_ns) == v for f, v in stages.items()), "a finished stage was redone"
    sel = json.loads((it0/"selected.json").read_text())
    assert sel["iteration"] == 0 and (it0/"adapters.safetensors").exists()
