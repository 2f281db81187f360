"End-to-end tests of `vlmrepro run/sweep/report/list`: resume after kill -9, sweeps past failures, bad input."
import json, os, signal, subprocess, time
from pathlib import Path

import pytest

from conftest import REPO

# Long enough that a kill lands mid-training: ~1,000 optimizer steps of the quickstart CNN.
LONG = ["-p", "n_train", "6144", "-p", "epochs", "5", "-p", "image_size", "24", "-p", "ckpt_every", "10"]


def vlm(cmd, *args, **kw):
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def test_kill_and_resume_matches_uninterrupted(tmp_path, vlmrepro_cmd):
    res = str(tmp_path)
    proc = subprocess.Popen([*vlmrepro_cmd, "run", "quickstart", *LONG, "--run-id", "killed", "--results", res],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "quickstart" / "killed"
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "latest.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    assert not (run_dir / "metrics.json").exists(), "the kill came too late to test resuming"
    time.sleep(2)  # the orphaned kernel notices its parent is gone within a second and exits

    resumed = vlm(vlmrepro_cmd, "run", "quickstart", *LONG, "--run-id", "killed", "--results", res)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming an unfinished run" in resumed.stdout
    executed = (run_dir / "quickstart.ipynb").read_text()
    assert "resumed from" in executed

    full = vlm(vlmrepro_cmd, "run", "quickstart", *LONG, "--run-id", "full", "--results", res)
    assert full.returncode == 0, full.stderr
    m_resumed = json.loads((run_dir / "metrics.json").read_text())
    m_full = json.loads((tmp_path / "quickstart" / "full" / "metrics.json").read_text())
    assert m_resumed == m_full
    assert m_full["val/acc"] > 0.6


def test_sweep_continues_past_a_bad_value_and_report_names_it(tmp_path, vlmrepro_cmd):
    grid = tmp_path / "lr.yaml"
    grid.write_text("system: quickstart\nparams: {epochs: 2, n_train: 1024, n_val: 256}\n"
                    "runs:\n  - {lr: 0.003}\n  - {lr: fast}\n  - {lr: 0.01, width: 8}\n")
    out = vlm(vlmrepro_cmd, "sweep", str(grid), "--results", str(tmp_path / "res"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "2 finished, 1 failed" in out.stdout
    assert "lr-001" in out.stdout and "parameter 'lr' expects float" in out.stdout
    for ok in ("lr-000", "lr-002"):
        assert "val/acc" in json.loads((tmp_path / "res" / "quickstart" / ok / "metrics.json").read_text())
    summary = json.loads((tmp_path / "res" / "quickstart" / "sweeps" / "lr.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done", "failed", "done"]
    report = (tmp_path / "res" / "README.md").read_text()
    assert "## Failed runs" in report and "lr-001" in report and "expects float" in report
    assert "| lr-002 | tiny | val/acc |" in report


def test_failing_cell_keeps_partial_notebook(tmp_path, vlmrepro_cmd):
    out = vlm(vlmrepro_cmd, "run", "quickstart", "-p", "batch_size", "0", "--run-id", "empty", "--results", str(tmp_path))
    assert out.returncode == 1
    run_dir = tmp_path / "quickstart" / "empty"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "batch_size must be >= 1" in status["error"]
    assert (run_dir / "quickstart.ipynb").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "nosuchsystem"], "unknown system 'nosuchsystem'"),
    (["run", "quickstart", "-p", "epoch", "2"], "did you mean 'epochs'"),
    (["run", "quickstart", "-p", "epochs", "two"], "parameter 'epochs' expects int"),
    (["run", "quickstart", "--preset", "huge"], "unknown preset 'huge'"),
    (["run", "missing.ipynb"], "notebook missing.ipynb not found"),
    (["sweep", "nope.yaml"], "sweep file nope.yaml not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, vlmrepro_cmd, args, message):
    out = vlm(vlmrepro_cmd, *args, "--results", str(tmp_path / "res"))
    assert out.returncode == 2, out
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("config.json"))


def test_unwritable_results_dir(tmp_path, vlmrepro_cmd):
    blocker = tmp_path / "file"; blocker.write_text("not a directory")
    out = vlm(vlmrepro_cmd, "run", "quickstart", "--results", str(blocker / "results"))
    assert out.returncode == 2 and "is not writable" in out.stderr, out.stderr


def _committed_quickstart():
    committed = REPO / "results" / "quickstart" / "tiny"
    return committed, json.loads((committed / "config.json").read_text()), json.loads((committed / "metrics.json").read_text())


def test_committed_quickstart_run_is_regenerated_number_for_number(tmp_path):
    "The committed results/quickstart/tiny, run again from its config.json into a scratch results root: the same metrics.json."
    from vlmrepro.runner import run
    committed, cfg, metrics = _committed_quickstart()
    r = run("quickstart", cfg["overrides"], cfg["preset"], run_id="tiny", results=tmp_path, log=lambda *a: None)
    new_cfg = json.loads((r.run_dir / "config.json").read_text())
    assert new_cfg["params"] == cfg["params"], "the notebook's parameters moved away from the committed run's; re-make it"
    assert new_cfg["runtime"]["torch_threads"] == cfg["runtime"]["torch_threads"] == 1
    assert json.loads((r.run_dir / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_reproduce_in_parallel_gives_the_committed_numbers(tmp_path):
    "reproduce with two jobs (quickstart beside another notebook, each in its own process): quickstart's numbers are the committed ones."
    from test_runner_integrity import notebook
    from vlmrepro.runner import reproduce
    _, _, metrics = _committed_quickstart()
    toy = notebook(tmp_path / "toy.ipynb")
    out = reproduce(tmp_path / "res", ["quickstart", str(toy)], jobs=2, log=lambda *a: None)
    assert [(r.system, r.status) for r in out] == [("quickstart", "done"), ("toy", "done")]
    assert json.loads((tmp_path / "res" / "quickstart" / "tiny" / "metrics.json").read_text()) == metrics
    assert "| tiny | tiny | val/score |" in (tmp_path / "res" / "README.md").read_text()
