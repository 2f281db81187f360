"""Every paper notebook, executed once through `vlmrepro run` with its `smoke` preset: every cell runs, at minimal sizes.

nbdev_test skips nbs/papers (see nbs/papers/.notest), so this is the one place CI executes them.
"""
import json, subprocess
from pathlib import Path

import pytest

from vlmrepro.registry import SYSTEMS, find_systems, notebook_presets

PAPERS = sorted(n for n, e in SYSTEMS.items() if e.kind == "paper")


@pytest.mark.slow
@pytest.mark.parametrize("system", PAPERS)
def test_paper_notebook_runs_end_to_end(system, tmp_path, vlmrepro_cmd):
    presets, _ = notebook_presets(find_systems()[system])
    assert "smoke" in presets, f"nbs/papers/{system}.ipynb needs a `smoke` preset (every cell, minimal sizes) for CI"
    out = subprocess.run([*vlmrepro_cmd, "run", system, "--preset", "smoke", "--run-id", "smoke", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path/system/"smoke"
    metrics = json.loads((run_dir/"metrics.json").read_text())
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values())
    assert json.loads((run_dir/"status.json").read_text())["status"] == "done"
    assert list((run_dir/"figures").glob("*.png")), "a paper notebook saves its figures"


@pytest.mark.slow
def test_backbones_notebook_runs(tmp_path, vlmrepro_cmd):
    out = subprocess.run([*vlmrepro_cmd, "run", "00_backbones", "--run-id", "t", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path/"00_backbones"/"t"/"metrics.json").read_text())
