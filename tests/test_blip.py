"""BLIP on VizWiz, end to end through `vlmrepro run`: fine-tuning beats zero-shot by a wide margin, and a LoRA run
started from a saved adapter directory continues exactly where the earlier run stopped."""
import json, subprocess

import pytest

from conftest import REPO, vlmrepro_command

FAST = ["-p", "official_metrics", "false"]
LORA = [*FAST, "-p", "mode", "lora", "-p", "n_train", "200", "-p", "n_val", "40", "-p", "n_test", "10", "-p", "epochs", "1",
        "-p", "lr", "2e-3"]


def run(results, run_id, *params):
    out = subprocess.run([*vlmrepro_command(), "run", "blip_vizwiz", *params, "--run-id", run_id, "--results", str(results)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    d = results / "blip_vizwiz" / run_id
    return d, json.loads((d / "metrics.json").read_text())


def test_fine_tuning_beats_zero_shot(tmp_path):
    d, m = run(tmp_path, "full", *FAST)
    assert m["val/cider"] > m["val/cider_zeroshot"] + 20, m
    sub = json.loads((d / "test_submission.json").read_text())
    assert len(sub) == 60 and all(set(r) == {"image_id", "caption"} and isinstance(r["image_id"], int) for r in sub)
    assert (d / "model" / "model.safetensors").exists() and (d / "figures" / "captions.png").exists()


def test_lora_run_from_adapter_continues_where_it_stopped(tmp_path):
    d, m = run(tmp_path, "lora", *LORA)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (d / "adapter").iterdir()}
    _, m2 = run(tmp_path, "continued", *LORA, "-p", "init_adapter", str(d / "adapter"))
    assert m2["val/cider_start"] == pytest.approx(m["val/cider_fast"], abs=1e-6), (m, m2)
    assert "val/cider_zeroshot" not in m2


def test_bad_mode_is_refused_before_work(tmp_path, vlmrepro_cmd):
    out = subprocess.run([*vlmrepro_cmd, "run", "blip_vizwiz", "-p", "mode", "finetune", "--results", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "parameter 'mode' is 'finetune', not one of zeroshot, full, lora" in out.stderr
    assert not (tmp_path / "blip_vizwiz").exists()
