"""BLIP on VizWiz, end to end through `vlmrepro run`: the three rows of the study in one run, a LoRA row started from a
saved adapter directory continues exactly where the earlier run stopped, and bad settings fail with a clear error."""
import json, subprocess

import pytest

from conftest import REPO, vlmrepro_command

SMALL = ["-p", "official_metrics", "false", "-p", "n_train", "200", "-p", "n_val", "40", "-p", "n_test", "10",
         "-p", "epochs", "1", "-p", "lora_epochs", "1"]


def run(results, run_id, *params, ok=True):
    out = subprocess.run([*vlmrepro_command(), "run", "blip_vizwiz", *params, "--run-id", run_id, "--results", str(results)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    if not ok: return out
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    d = results / "blip_vizwiz" / run_id
    return d, json.loads((d / "metrics.json").read_text())


@pytest.mark.slow
def test_three_rows_in_one_run(tmp_path):
    d, m = run(tmp_path, "rows", *SMALL)
    assert {"val/cider_zeroshot", "val/cider_full", "val/cider_lora", "train/trainable_params_lora"} <= set(m), m
    assert m["train/trainable_params_lora"] < 0.05 * m["train/total_params_lora"]
    assert m["train/trainable_params_full"] == m["train/total_params_full"]
    for row in ("full", "lora"):
        sub = json.loads((d / f"test_submission_{row}.json").read_text())
        assert len(sub) == 10 and all(set(r) == {"image_id", "caption"} and isinstance(r["image_id"], int) for r in sub)
    assert (d / "full" / "model" / "model.safetensors").exists() and (d / "figures" / "captions.png").exists()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (d / "lora" / "adapter").iterdir()}


@pytest.mark.slow
def test_lora_run_from_adapter_continues_where_it_stopped(tmp_path):
    lora = [*SMALL, "-p", "rows", "[lora]"]
    d, m = run(tmp_path, "lora", *lora)
    _, m2 = run(tmp_path, "continued", *lora, "-p", "init_adapter", str(d / "lora" / "adapter"))
    assert m2["val/cider_start_lora"] == pytest.approx(m["val/cider_lora"], abs=1e-6), (m, m2)


def test_bad_row_is_a_clear_error(tmp_path):
    out = run(tmp_path, "bad", "--preset", "smoke", "-p", "rows", "[zeroshot, finetune]", ok=False)
    assert out.returncode != 0 and "rows ['finetune'] are not among zeroshot, full, lora" in out.stdout + out.stderr


@pytest.mark.slow
def test_tiny_captioners_are_pretrained_and_large_is_larger():
    from vlmrepro import zoo
    from vlmrepro.backbones import blip_captioner
    cider = {}
    for name in ("tiny-blip-base", "tiny-blip-large"):
        zoo.ensure(name)
        m = zoo.entry_info(name)["metrics"]
        assert m["val_cider"] > m["constant_cider"] + 30, (name, m)
        cider[name] = m["val_cider"]
    assert cider["tiny-blip-large"] > cider["tiny-blip-base"], cider   # the large stand-in is the better captioner, as BLIP-large is
    base, large = (blip_captioner(n)[0].config for n in ("tiny-blip-base", "tiny-blip-large"))
    assert large.vision_config.hidden_size > base.vision_config.hidden_size
    assert large.text_config.to_dict() | {"encoder_hidden_size": 0} == base.text_config.to_dict() | {"encoder_hidden_size": 0}


TINY = REPO / "results" / "blip_vizwiz" / "tiny"


def test_committed_tiny_run_backs_the_claim():
    "The committed tiny run: all three rows, LoRA's trainable count, wall time per row, and the claim itself."
    m = json.loads((TINY / "metrics.json").read_text())
    assert json.loads((TINY / "status.json").read_text())["status"] == "done"
    for row in ("zeroshot", "full", "lora"): assert f"val/cider_{row}" in m and f"time/wall_s_{row}" in m, row
    assert m["train/trainable_params_lora"] < 0.05 * m["train/total_params_lora"]
    assert m["val/cider_lora"] - m["val/cider_zeroshot"] > 20, m
    assert m["val/cider_full"] - m["val/cider_lora"] <= 10, m
    # the vocabulary check: LoRA on the COCO-pretrained captioner gains far more when the captions use only its words
    assert m["check/cider_lora_check"] - m["check/cider_zeroshot_check"] > m["check/cider_lora_vizwiz"] - m["check/cider_zeroshot_vizwiz"] + 10, m


SWEEP = REPO / "results" / "blip_vizwiz" / "sweeps" / "blip_vizwiz_seeds.json"


def test_committed_seed_sweep_backs_the_claim():
    "The committed 3-seed sweep: on every seed, LoRA on the large captioner clearly beats its zero-shot and is within 10 CIDEr-D of full fine-tuning."
    runs = [r["metrics"] for r in json.loads(SWEEP.read_text())["runs"] if r["status"] in ("done", "skipped")]
    assert len(runs) == 3
    for m in runs:
        assert m["val/cider_lora"] - m["val/cider_zeroshot"] > 20, m
        assert m["val/cider_full"] - m["val/cider_lora"] <= 10, m
        assert min(m["val/cider_lora"], m["val/cider_full"]) > m["val/cider_constant"] + 20, m
