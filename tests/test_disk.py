"""A full disk or a read-only output directory is a clear VlmreproError before any work starts (runner, fit, experts, zoo).

Read-only is made two ways: chmod 0o500 (skipped when the tests run as root, where chmod does not stop writes) and an
output path below a regular file (which nobody, root included, can create). A full disk is `shutil.disk_usage`
monkeypatched to report 5 MiB free.
"""
import os, shutil
from pathlib import Path

import pytest

from vlmrepro.core import VlmreproError


def _readonly(tmp_path) -> Path:
    d = tmp_path/"ro"; d.mkdir(); d.chmod(0o500)
    try: (d/"probe").write_text("x")
    except PermissionError: return d
    d.chmod(0o700)
    pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod does not stop writes, so a read-only directory cannot be made")


def _under_a_file(tmp_path) -> Path:
    f = tmp_path/"plain-file"; f.write_text("not a directory"); return f/"out"


@pytest.fixture
def full_disk(monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20))


def _runner(out):
    from vlmrepro.runner import run
    run("quickstart", results=out, run_id="disk", log=lambda *a: None)


def _zoo(out):
    from vlmrepro.zoo import build
    build("tiny-clip", root=out)


def _fit(out):
    import torch
    from vlmrepro.train import TrainConfig, fit
    model = torch.nn.Linear(2, 1)
    data = [{"x": torch.ones(2), "y": torch.ones(1)}] * 4
    fit(model, data, TrainConfig(max_steps=2, batch_size=2, progress=False, device="cpu"), out,
        loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"]))


WORLD = {}


@pytest.fixture(scope="module", autouse=True)
def world(tmp_path_factory):
    "The experts' input, written before any test fakes a full disk."
    from vlmrepro.data.synth import write_world
    WORLD["root"] = write_world(tmp_path_factory.mktemp("w")/"world", n_train=4, n_val=0, n_test=0, image_size=32, seed=5)


def _experts(out):
    from vlmrepro.systems.prismer.experts import label_experts
    label_experts(WORLD["root"], "edge", label_root=out, backends={"edge": "classic"})


CASES = [pytest.param(_runner, id="runner"), pytest.param(_zoo, id="zoo"),
         pytest.param(_fit, id="fit"), pytest.param(_experts, id="experts")]


@pytest.mark.parametrize("job", CASES)
def test_unwritable_output_fails_before_work(tmp_path, job):
    out = _under_a_file(tmp_path)
    with pytest.raises(VlmreproError, match="not writable"): job(out)


@pytest.mark.parametrize("job", CASES)
def test_readonly_output_fails_before_work(tmp_path, job):
    out = _readonly(tmp_path)/"out"
    with pytest.raises(VlmreproError, match="not writable"): job(out)


@pytest.mark.parametrize("job", CASES)
def test_full_disk_fails_before_work(tmp_path, full_disk, job):
    out = tmp_path/"out"
    with pytest.raises(VlmreproError, match="only 5 MiB free"): job(out)
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True   # nothing half-done left behind


def test_threshold_is_configurable(tmp_path, full_disk, monkeypatch):
    from vlmrepro.core import ensure_writable_dir
    monkeypatch.setenv("VLMREPRO_MIN_FREE_MB", "0")
    assert ensure_writable_dir(tmp_path/"a") == tmp_path/"a"
    monkeypatch.setenv("VLMREPRO_MIN_FREE_MB", "lots")
    with pytest.raises(VlmreproError, match="VLMREPRO_MIN_FREE_MB"): ensure_writable_dir(tmp_path/"b")


def test_cli_reports_a_full_results_dir_in_one_line(tmp_path, full_disk, capsys):
    from vlmrepro.cli import main
    assert main(["run", "quickstart", "--results", str(tmp_path/"res")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmrepro: error: results directory") and "MiB free" in err and "Traceback" not in err
