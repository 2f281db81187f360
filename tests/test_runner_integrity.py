"""The runner loses nothing and misplaces nothing: where a run writes, what marks it done, reruns that replace a run only
once the new one succeeded, locks, dead kernels, damaged run directories, parameters that are not parameters, seed
groups in the report, the data preflight, and the paths the saved files carry. Most tests run a two-cell notebook
(a kernel start and a few lines), not a paper system."""
import json, os, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

from conftest import REPO, vlmrepro_command
from vlmrepro.core import VlmreproError, file_lock

BODY = """
import os, pathlib
from vlmrepro.runner import save_figure, save_metrics, start_run
run_dir = start_run(run_dir, seed, threads)
if fail: raise ValueError("asked to fail")
if die: os.kill(os.getpid(), 9)
(run_dir/"checkpoints").mkdir(exist_ok=True); (run_dir/"checkpoints"/"latest.json").write_text("{}")
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
fig = plt.figure(); save_figure(fig, run_dir, "curve")
print("wrote into", run_dir)
if write_metrics: save_metrics(run_dir, {"val/score": 0.5 + seed + value}, "test")
"""
PARAMS = "seed = 0\nvalue = 0.0\nfail = False\ndie = False\nwrite_metrics = True\nthreads = 1\nrun_dir = None"


def notebook(path: Path, body: str = BODY, params: str = PARAMS) -> Path:
    "A runnable notebook: a parameters cell and one code cell."
    cells = [("parameters", params), (None, body)]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {"tags": [t] if t else []},
                     "outputs": [], "source": s} for i, (t, s) in enumerate(cells)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture
def toy(tmp_path) -> Path:
    return notebook(tmp_path/"toy.ipynb")


def cli(*args, cwd=REPO, env=None, timeout=300):
    return subprocess.run([*vlmrepro_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def quiet(*a): pass


# ---- 1. a relative results root, and a run without metrics ----

@pytest.mark.parametrize("how", ["flag", "env"])
def test_relative_results_keep_the_run_in_one_place(tmp_path, toy, how):
    "--results rel (or $VLMREPRO_RESULTS=rel) from another directory: config, status, notebook, metrics, figures, checkpoints together."
    work = tmp_path/"work"; work.mkdir()
    args, env = (["--results", "rel"], {}) if how == "flag" else ([], {"VLMREPRO_RESULTS": "rel"})
    out = cli("run", str(toy), "--run-id", "a", *args, cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    run = work/"rel"/"toy"/"a"
    assert json.loads((run/"status.json").read_text())["status"] == "done"
    for f in ("config.json", "toy.ipynb", "metrics.json", "figures/curve.png", "checkpoints/latest.json"):
        assert (run/f).exists(), f
    assert json.loads(out.stdout.splitlines()[-1])["metrics"] == {"val/score": 0.5}
    assert sorted(p.name for p in (work/"rel").iterdir()) == ["toy"]            # nothing beside it
    assert not list(toy.parent.glob("rel*")) and not (REPO/"nbs"/"rel").exists()


def test_a_run_without_metrics_is_not_done(tmp_path, toy):
    from vlmrepro.runner import RunFailed, run
    with pytest.raises(RunFailed, match="metrics.json"):
        run(str(toy), {"write_metrics": "false"}, run_id="m", results=tmp_path/"res", log=quiet)
    status = json.loads((tmp_path/"res"/"toy"/"m"/"status.json").read_text())
    assert status["status"] == "failed" and "metrics.json" in status["error"]


# ---- 2. sweep names ----

@pytest.mark.parametrize("name", ["../a4/metrics", "/tmp/anywhere", "a/b", ".hidden", ""])
def test_sweep_name_is_checked_like_a_run_id(tmp_path, toy, name):
    from vlmrepro.runner import sweep
    spec = tmp_path/"s.yaml"; spec.write_text(json.dumps({"system": str(toy), "name": name, "runs": [{"seed": 0}]}))
    with pytest.raises(VlmreproError, match="sweep name"):
        sweep(spec, tmp_path/"res", log=quiet)
    assert not (tmp_path/"res").exists() or not any((tmp_path/"res").rglob("*.json"))


# ---- 3. rerun replaces a run only after the new one succeeded; locks ----

def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_rerun_keeps_the_finished_run_until_the_new_one_succeeds(tmp_path, toy):
    from vlmrepro.runner import RunFailed, run
    res = tmp_path/"res"
    run(str(toy), run_id="r", results=res, log=quiet)
    run_dir = res/"toy"/"r"; before = _files(run_dir)
    with pytest.raises(VlmreproError, match="expects float"):                # bad parameters: nothing happens
        run(str(toy), {"value": "high"}, run_id="r", results=res, rerun=True, log=quiet)
    assert _files(run_dir) == before
    with pytest.raises(RunFailed, match="asked to fail"):                   # the new run fails: the old one stays
        run(str(toy), {"fail": "true"}, run_id="r", results=res, rerun=True, log=quiet)
    assert _files(run_dir) == before
    new = run(str(toy), {"value": "2"}, run_id="r", results=res, rerun=True, log=quiet)
    assert new.status == "done" and new.metrics == {"val/score": 2.5}
    assert json.loads((run_dir/"metrics.json").read_text()) == {"val/score": 2.5}
    assert json.loads((run_dir/"config.json").read_text())["params"]["value"] == 2.0
    assert sorted(p.name for p in (res/"toy").iterdir() if not p.name.endswith(".lock")) == ["r"]   # no staging left


def test_a_killed_swap_is_finished_on_the_next_run(tmp_path, toy):
    "Killed between moving the old run aside and moving the new one in: the next run puts the new one in place."
    from vlmrepro.runner import run
    res = tmp_path/"res"
    run(str(toy), run_id="r", results=res, log=quiet)
    run(str(toy), {"value": "1"}, run_id="r2", results=res, log=quiet)
    d = res/"toy"
    os.rename(d/"r", d/".r.old"); os.rename(d/"r2", d/".r.rerun")         # the state a kill between the renames leaves
    out = run(str(toy), {"value": "1"}, run_id="r", results=res, log=quiet)
    assert out.status == "skipped" and out.metrics == {"val/score": 1.5}
    assert not (d/".r.old").exists() and not (d/".r.rerun").exists()


def test_a_run_in_progress_is_refused_before_anything_is_deleted(tmp_path, toy):
    from vlmrepro.runner import run, run_lock
    res = tmp_path/"res"
    run(str(toy), run_id="r", results=res, log=quiet)
    before = _files(res/"toy"/"r")
    with run_lock(res/"toy"/"r"):
        with pytest.raises(VlmreproError, match="in progress"):
            run(str(toy), {"value": "1"}, run_id="r", results=res, rerun=True, log=quiet)
    assert _files(res/"toy"/"r") == before


LOCKER = """
import sys, time
from vlmrepro.core import VlmreproError, file_lock
try:
    with file_lock(sys.argv[1], wait=False):
        print("got", flush=True); time.sleep(float(sys.argv[2]))
except VlmreproError as e: print("busy", e, flush=True)
"""


@pytest.mark.slow
def test_lock_has_one_winner_and_dies_with_its_holder(tmp_path):
    "Six processes race for one lock: one wins. A holder killed with SIGKILL leaves nothing stale behind."
    lock = tmp_path/".r.lock"
    procs = [subprocess.Popen([sys.executable, "-c", LOCKER, str(lock), "3"], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum(o.startswith("got") for o in outs) == 1, outs
    assert all("in use by process" in o for o in outs if o.startswith("busy")), outs
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(lock), "60"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().startswith("got")
    holder.kill(); holder.wait()
    with file_lock(lock, wait=False): pass


def test_zoo_build_waits_for_the_core_lock_and_pins_one_thread(tmp_path, monkeypatch):
    "A zoo entry's build takes the same lock as the runner (core.file_lock), and builds with one torch thread."
    import threading, torch
    from vlmrepro import zoo
    seen = []
    def train(out, p):
        seen.append(torch.get_num_threads()); (out/"w.txt").write_text("x"); return {"val/x": 1.0}
    monkeypatch.setitem(zoo.ZOO, "toy-entry", zoo.Recipe("toy-entry", "toy", train, {"seed": 0}, default=False))
    root = tmp_path/"zoo"; root.mkdir()
    with file_lock(root/".toy-entry.lock", wait=False):
        t = threading.Thread(target=zoo.build, args=("toy-entry", root)); t.start()
        time.sleep(1.0)
        assert t.is_alive() and not seen                                       # waiting for the lock
    t.join(60)
    assert seen == [1] and zoo.entry_info("toy-entry", root)["torch_threads"] == 1 and zoo.is_current("toy-entry", root)


# ---- 4. a kernel that dies ----

def test_dead_kernel_fails_the_run_and_the_sweep_goes_on(tmp_path, toy):
    from vlmrepro.runner import report_markdown, sweep
    spec = tmp_path/"s.yaml"; spec.write_text(f"system: {toy}\nname: k\nruns:\n  - {{die: true}}\n  - {{seed: 1}}\n")
    res = tmp_path/"res"
    out = sweep(spec, res, log=quiet)
    assert [r.status for r in out] == ["failed", "done"]
    assert "kernel died" in out[0].error
    status = json.loads((res/"toy"/"k-000"/"status.json").read_text())
    assert status["status"] == "failed" and "kernel died" in status["error"] and "cell" in status["error"]
    assert (res/"toy"/"k-000"/"toy.ipynb").exists()                          # the partial notebook is kept
    summary = json.loads((res/"toy"/"sweeps"/"k.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["failed", "done"] and "kernel died" in summary["runs"][0]["error"]
    assert "kernel died" in report_markdown(res)


def test_cell_timeout_fails_the_run(tmp_path):
    from vlmrepro.runner import RunFailed, run
    nb = notebook(tmp_path/"slow.ipynb", "import time\ntime.sleep(60)", "run_dir = None")
    with pytest.raises(RunFailed, match="timeout"):
        run(str(nb), run_id="t", results=tmp_path/"res", log=quiet, timeout=3)
    assert "timeout" in json.loads((tmp_path/"res"/"slow"/"t"/"status.json").read_text())["error"]


def test_interrupt_marks_the_run_failed_and_stops_the_sweep(tmp_path, toy):
    "Ctrl-C in the runner: the run is marked failed ('interrupted'), the summary names it and the runs not started."
    import papermill
    from vlmrepro.runner import sweep
    spec = tmp_path/"s.yaml"; spec.write_text(f"system: {toy}\nname: i\nruns:\n  - {{seed: 0}}\n  - {{seed: 1}}\n")

    def interrupted(*a, **k): raise KeyboardInterrupt
    orig, papermill.execute_notebook = papermill.execute_notebook, interrupted
    try:
        with pytest.raises(KeyboardInterrupt): sweep(spec, tmp_path/"res", log=quiet)
    finally: papermill.execute_notebook = orig
    status = json.loads((tmp_path/"res"/"toy"/"i-000"/"status.json").read_text())
    assert status["status"] == "failed" and "interrupted" in status["error"]
    summary = json.loads((tmp_path/"res"/"toy"/"sweeps"/"i.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["failed", "not started"]


# ---- 6. damaged run directories; parameters that are not parameters ----

def _fake_run(root: Path, system: str, run_id: str, **files):
    d = root/system/run_id; d.mkdir(parents=True)
    defaults = {"config.json": json.dumps({"system": system, "preset": "tiny", "params": {"seed": 0}}),
                "status.json": json.dumps({"status": "done"}), "metrics.json": json.dumps({"val/acc": 0.5})}
    for name, text in {**defaults, **{k.replace("_json", ".json"): v for k, v in files.items()}}.items():
        if text is not None: (d/name).write_text(text)
    return d


@pytest.mark.parametrize("damage", [{"config_json": "[]"}, {"config_json": "{nope"}, {"status_json": "5"},
                                    {"metrics_json": "{bad"}, {"metrics_json": '["x"]'}, {"metric_sources_json": "7"},
                                    {"config_json": None}])
def test_one_damaged_run_does_not_stop_report_and_list(tmp_path, damage):
    from vlmrepro.cli import main
    from vlmrepro.runner import list_runs, report
    res = tmp_path/"res"
    _fake_run(res, "quickstart", "good")
    _fake_run(res, "quickstart", "broken", **damage)
    (res/"quickstart"/"sweeps").mkdir(); (res/"quickstart"/"sweeps"/"s.json").write_text("{truncated")
    md = report(res).read_text()
    assert "| good | tiny | val/acc | 0.5 |" in md
    assert "| quickstart | broken | damaged |" in md and "| quickstart | sweeps/s.json | damaged |" in md
    runs = {r["run_id"]: r["status"] for r in list_runs(res)}
    assert runs == {"good": "done", "broken": "damaged"}
    assert main(["list", "--results", str(res)]) == 0


@pytest.mark.parametrize("args, message", [
    (["run", "quickstart", "-p", "run_dir", "2020-01-01"], "'run_dir' is set by the runner"),
    (["run", "quickstart", "-p", "preset", "small"], "choose the preset with --preset"),
    (["run", "nxtp", "-p", "data_root", "!!binary aGk="], "parameter 'data_root'"),
    (["run", "nxtp", "-p", "data_root", "!!set {a}"], "parameter 'data_root'"),
    (["run", "nxtp", "-p", "data_root", "!!timestamp 2020-01-01"], "parameter 'data_root'"),
    (["run", "nxtp", "-p", "val_splits", "{1: shards/val}"], "parameter 'val_splits'"),
])
def test_values_that_are_not_parameters_are_one_line_errors(tmp_path, args, message, capsys):
    from vlmrepro.cli import main
    assert main([*args, "--results", str(tmp_path/"res")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path/"res").exists() or not any((tmp_path/"res").rglob("config.json"))


def test_a_date_like_value_stays_a_string(tmp_path):
    from vlmrepro.registry import coerce_value
    assert coerce_value("data_root", "2020-01-01", None) == "2020-01-01"


# ---- 8. seed groups in the report ----

def test_report_groups_runs_that_differ_only_in_seed(tmp_path):
    from vlmrepro.runner import report_markdown
    res = tmp_path/"res"
    for i, (seed, acc) in enumerate([(0, 0.5), (1, 0.7), (2, 0.6)]):
        _fake_run(res, "quickstart", f"s-{i:03d}", config_json=json.dumps({"preset": "tiny", "params": {"seed": seed, "lr": 0.01}}),
                  metrics_json=json.dumps({"val/acc": acc}))
    _fake_run(res, "quickstart", "other-lr", config_json=json.dumps({"preset": "tiny", "params": {"seed": 0, "lr": 0.1}}))
    md = report_markdown(res)
    assert "| s-000, s-001, s-002 | tiny | lr=0.01 | val/acc | 0.6 | 0.1 | 3 |" in md, md
    assert "| other-lr | tiny | val/acc | 0.5 |" in md                         # the single runs stay listed
    assert "other-lr |" not in md.split("across seeds")[1].split("\n## ")[0]


def test_report_counts_a_seed_run_twice_once(tmp_path):
    "The preset's own run (seed 0) beside a sweep that also ran seed 0: the group has three seeds, the sweep's run for seed 0."
    from vlmrepro.runner import report_markdown
    res = tmp_path/"res"
    for rid, seed, acc in [("tiny", 0, 0.5), ("seeds-000", 0, 0.5), ("seeds-001", 1, 0.7), ("seeds-002", 2, 0.6)]:
        _fake_run(res, "quickstart", rid, config_json=json.dumps({"preset": "tiny", "params": {"seed": seed}}),
                  metrics_json=json.dumps({"val/acc": acc}))
    md = report_markdown(res)
    assert "| seeds-000, seeds-001, seeds-002 | tiny | defaults | val/acc | 0.6 | 0.1 | 3 |" in md, md


# ---- 9. no absolute path of the machine in what a run keeps ----

def test_saved_files_hold_no_absolute_path(tmp_path, toy):
    from vlmrepro.runner import run
    res = tmp_path/"res"
    r = run(str(toy), run_id="p", results=res, log=quiet)
    run(str(toy), {"value": "1"}, run_id="p", results=res, rerun=True, log=quiet)       # a rerun, written beside and swapped in
    nb = (r.run_dir/"toy.ipynb").read_text()
    assert 'run_dir = \\"toy/p\\"' in nb                                     # the injected parameter: relative to the results root
    assert "wrote into <results>/toy/p" in nb                                # the kernel wrote to the right absolute place
    for name in ("toy.ipynb", "config.json", "status.json", "metrics.json"):
        text = (r.run_dir/name).read_text()
        for machine in {str(tmp_path), str(REPO), str(Path.home()), "/tmp/", sys.prefix}:
            assert machine not in text, (name, machine)
    meta = json.loads(nb)["metadata"]["papermill"]
    assert meta["output_path"] == "<results>/toy/p/toy.ipynb" and meta["parameters"]["run_dir"] == "toy/p"


# ---- 10. the data preflight ----

FAKE_SYSTEM = '''
from dataclasses import dataclass, field
from vlmrepro.registry import DataFile
from vlmrepro.train import TrainConfig

@dataclass
class Config:
    data_root: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

NOTEBOOK_ONLY = ("preset",)

def data_files(cfg):
    if cfg.data_root is None: return []
    return [DataFile(f"{cfg.data_root}/train", "directory of WebDataset shards", pattern="*.tar"),
            DataFile(f"{cfg.data_root}/captions.json", "COCO caption JSON"),
            DataFile(f"{cfg.data_root}/extra.tsv", "optional extra pairs (TSV)", required=False)]
'''


@pytest.fixture
def fake_system(tmp_path, monkeypatch):
    "A registered system 'fakesys' whose contract module describes the files it reads."
    from vlmrepro import registry
    (tmp_path/"fakesys_contract.py").write_text(FAKE_SYSTEM)
    nb = notebook(tmp_path/"fakesys.ipynb", "from vlmrepro.runner import start_run\nrun_dir = start_run(run_dir)",
                  params="preset = 'tiny'\nseed = 0\ndata_root = None\nrun_dir = None")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.SYSTEMS, "fakesys", registry.SystemEntry("fakesys", "fakesys_contract", str(nb), "example"))
    root = tmp_path/"data"; (root/"train").mkdir(parents=True)
    return root


def test_check_lists_what_a_system_reads(fake_system, capsys):
    from vlmrepro.cli import main
    assert main(["check", "fakesys", "-p", "data_root", str(fake_system)]) == 2
    out = capsys.readouterr().out
    assert "missing" in out and "train" in out and "*.tar" in out and "captions.json" in out and "COCO caption JSON" in out
    (fake_system/"train"/"00000.tar").write_bytes(b""); (fake_system/"captions.json").write_text("{}")
    assert main(["check", "fakesys", "-p", "data_root", str(fake_system)]) == 0
    out = capsys.readouterr().out
    assert "missing" in out and "extra.tsv" in out and "(optional)" in out     # an optional file may be missing
    assert main(["check", "fakesys"]) == 0 and "reads no files" in capsys.readouterr().out


def test_run_with_a_data_root_is_checked_before_anything(fake_system, tmp_path, capsys):
    from vlmrepro.cli import main
    assert main(["run", "fakesys", "-p", "data_root", str(fake_system), "--results", str(tmp_path/"res")]) == 2
    err = capsys.readouterr().err
    assert "captions.json" in err and "vlmrepro check" in err and err.count("\n") == 1, err
    assert not (tmp_path/"res").exists() or not any((tmp_path/"res").rglob("config.json"))


def test_nxtp_and_quickstart_describe_their_data(tmp_path):
    from vlmrepro.registry import check_data
    assert check_data("quickstart") == []
    assert check_data("nxtp") == []                                             # the synthetic world: written, not read
    rows = check_data("nxtp", {"data_root": str(tmp_path)})
    assert [(r.file.path, r.file.pattern) for r in rows] == [(str(tmp_path/"shards/train"), "*.tar"), (str(tmp_path/"shards/val"), "*.tar")]
    assert not any(r.present for r in rows)
    (tmp_path/"shards/train").mkdir(parents=True); (tmp_path/"shards/train/00000.tar").write_bytes(b"")
    assert [r.present for r in check_data("nxtp", {"data_root": str(tmp_path)})] == [True, False]
    (tmp_path/"shards/val").mkdir(parents=True); (tmp_path/"shards/val/00000.tar").write_bytes(b"")
    assert all(r.present for r in check_data("nxtp", {"data_root": str(tmp_path)}))


MACHINE_PATH = __import__("re").compile(r"""(?:^|["'\s(=])/(?:work|root|home|tmp|Users|var|opt|mnt|scratch)/""")


def _committed(run_dir: Path):
    return pytest.param(run_dir, id=f"{run_dir.parent.name}/{run_dir.name}")


@pytest.mark.parametrize("run_dir", [_committed(p.parent) for p in sorted((REPO/"results").glob("*/*/config.json"))])
def test_committed_runs_hold_no_machine_paths(run_dir):
    for f in [*run_dir.glob("*.ipynb"), *run_dir.glob("*.json")]:
        text = f.read_text(encoding="utf-8")
        hits = [m.group(0) for m in MACHINE_PATH.finditer(text)] + [p for p in (str(REPO), str(Path.home())) if p in text]
        assert not hits, f"{f.relative_to(REPO)} names paths of the machine that made it: {hits[:3]}"
