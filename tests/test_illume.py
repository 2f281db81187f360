"""ILLUME: the critic rule and the consistency score on hand-written explanations, the learning rate under a fake
world size, the converter on an upstream-layout checkpoint, the paper preset refusing to start without converted
weights, a loop that resumes exactly, and (slow) the notebook's smoke preset on a third-party VQA-X data set."""
import json, shutil, subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmrepro.core import VlmreproError
from vlmrepro.systems.illume.loop import IllumeLoop, LoopSettings, MetricCritic, StopLoop, illume_optimizer, rouge_l, split_features
from vlmrepro.train import TrainConfig
from vlmrepro.systems.illume.magma import build_magma, trainable


def test_consistency_on_hand_written_explanations():
    from vlmrepro.systems.illume.world import judge_explanation, vocabulary
    objs = [{"shape": "star", "color": "red", "position": "top left"}, {"shape": "circle", "color": "blue", "position": "bottom right"},
            {"shape": "square", "color": "green", "position": "top right"}]
    ok = lambda e, q="what color is the star?", a="red": judge_explanation(e, q, a, objs, vocabulary())["consistent"]
    assert ok("the red star is in the top left")                  # a new fact (where), true
    assert not ok("the red star is in the bottom left")           # one word from the reference, false: ROUGE-L would accept it
    assert not ok("the star is red")                              # true but says nothing new
    assert not ok("the green square is in the top right")         # true and new, but not about the star
    assert ok("the red star is next to a green square") and not ok("the red star is next to a green circle")
    assert ok("there is a red star, a blue circle and a green square", "how many shapes are there?", "3")
    assert not ok("there is a red star, a blue circle and a yellow square", "how many shapes are there?", "3")
    assert ok("the star is red", "is there a blue star?", "no")   # names the star's real colour
    claims = judge_explanation("the star in the top right is red", "what shape is in the top right?", "star", objs, vocabulary())["claims"]
    assert [(c["attrs"], c["grounded"]) for c in claims] == [({"shape": "star", "position": "top right", "color": "red"}, False)]


def test_learning_rate_counts_every_process(monkeypatch):
    from vlmrepro.systems.illume.system import Config, optimizer
    from vlmrepro.train import TrainConfig
    model = torch.nn.Linear(2, 2)
    cfg = Config(train=TrainConfig(batch_size=32, grad_accum=1))
    assert optimizer(model, cfg).param_groups[0]["lr"] == pytest.approx(1.12e-3 * (32 / 256) ** 0.5)
    monkeypatch.setenv("WORLD_SIZE", "8")                         # upstream: 8 GPUs x 32 = 256 -> 1.12e-3
    assert optimizer(model, cfg).param_groups[0]["lr"] == pytest.approx(1.12e-3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = Config(train=TrainConfig(batch_size=16, grad_accum=4))
    assert optimizer(model, cfg).param_groups[0]["lr"] == pytest.approx(1.12e-3 * (128 / 256) ** 0.5)


def test_converter_round_trips_an_upstream_layout_file(tmp_path):
    from safetensors.torch import load_file
    from vlmrepro.systems.illume.convert import convert_checkpoint, deepspeed_checkpoint, load_clip_grid, upstream_state_dict
    from vlmrepro.systems.illume.magma import Magma, load_magma_weights, trainable
    from transformers import AutoModelForCausalLM
    up = upstream_state_dict()
    out = convert_checkpoint(deepspeed_checkpoint(up, tmp_path/"mp_rank_00_model_states.pt"), tmp_path/"magma",
                             {"encoder_name": "clip_resnet_large", "image_size": 64, "adapter_config": {
                                 "mlp": {"adapter_type": "normal", "downsample_factor": 4}, "attention": {"adapter_type": "normal", "downsample_factor": 4}}})
    lm = AutoModelForCausalLM.from_pretrained(out/"lm")
    model = Magma(lm, 256, 4, sites=("attn", "mlp"))
    trainable(model, "prefix", "adapters"); load_magma_weights(model, out/"magma.safetensors")
    grid, _ = load_clip_grid(out/"grid")
    ours = {**{f"lm.{k}": v for k, v in lm.state_dict().items()}, **{f"prefix.{k}": v for k, v in model.prefix.state_dict().items()},
            **{f"adapters.{k}": v for k, v in model.adapters.state_dict().items()}, **{f"grid.{k}": v for k, v in grid.state_dict().items()}}
    back = {"lm.transformer.h.1.attn.attn_block.attention.v_proj.weight": "lm.transformer.h.1.attn.v_proj.weight",
            "lm.transformer.h.0.mlp.0.c_fc.bias": "lm.transformer.h.0.mlp.fc_in.bias", "lm.lm_head.weight": "lm.lm_head.weight",
            "lm.transformer.h.1.mlp.1.adapter.0.weight": "adapters.1.mlp.down.weight", "lm.transformer.h.0.attn.adapter.2.bias": "adapters.0.attn.up.bias",
            "image_prefix.proj.weight": "prefix.proj.weight", "image_prefix.ln.bias": "prefix.norm.bias",
            "image_prefix.enc.layer3.0.downsample.1.running_var": "grid.layer3.0.downsample.1.running_var"}
    for theirs, mine in back.items(): assert torch.equal(ours[mine].detach(), up[theirs]), theirs
    import re
    upstream = [k for k in up if not k.startswith(("transformer.", "word_embedding")) and not re.search(r"attention\.(bias|masked_bias|scale_attn|sin|cos)$", k)]
    converted = [k for f in ("lm/model.safetensors", "grid/model.safetensors", "magma.safetensors") for k in load_file(str(out/f))]
    assert len(converted) == len(upstream)                         # every tensor lands somewhere; aliases and buffers are dropped
    assert len(load_file(str(out/"magma.safetensors"))) == 2 * 2 * 4 + 4   # 2 blocks x 2 adapters x (down, up) x (weight, bias) + prefix
    bad = dict(up); bad["lm.transformer.h.0.mlp.c_fc2.weight"] = torch.ones(1)
    with pytest.raises(VlmreproError, match=r"lm\.transformer\.h\.0\.mlp\.c_fc2\.weight"):
        convert_checkpoint(deepspeed_checkpoint(bad, tmp_path/"bad.pt"), tmp_path/"bad")


def test_paper_preset_without_weights_names_the_file():
    from vlmrepro.registry import create_system
    with pytest.raises(VlmreproError, match=r"checkpoints/magma-converted/magma\.json: pretrained MAGMA not found.*vlmrepro convert illume"):
        create_system("illume", preset="paper")


@pytest.mark.slow
def test_paper_preset_run_stops_naming_the_file(tmp_path, vlmrepro_cmd):
    out = subprocess.run([*vlmrepro_cmd, "run", "illume", "--preset", "paper", "--run-id", "p", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "illume cannot start" in out.stderr and "vlmrepro check illume" in out.stderr
    check = subprocess.run([*vlmrepro_cmd, "check", "illume", "--preset", "paper"], capture_output=True, text=True, timeout=600)
    assert check.returncode == 2
    assert "checkpoints/magma-converted/magma.json" in check.stdout and "vlmrepro convert illume" in check.stdout, check.stdout


def test_critic_rule():
    c = MetricCritic()
    assert c.score("no", ["no"]) == 0.0                      # under 3 characters scores 0, even when it matches
    assert c.score("red", ["red"]) == 1.0                    # 3 characters is enough
    assert c.score("  the star is red ", ["The Star IS red"]) == 1.0   # reference lowercased, both stripped
    assert c.score("The star is red", ["the star is red"]) < 1.0       # the sample is not lowercased (nlg-eval's rule)
    assert c.score("the circle is red", ["the circle in the top left is red"]) == pytest.approx(0.62887, abs=1e-4)
    rows = [{"question_id": "1", "references": ["the circle in the top left is red"],
             "samples": [{"text": "the circle is red"}, {"text": "the red circle is in the top left"}, {"text": "ok"}]}]
    scores = c.scores(rows)[0]
    assert [s >= c.threshold for s in scores] == [False, True, False]      # threshold 0.7: 0.63 rejected, 0.75+ accepted
    assert rouge_l("a b", ["c d"]) == 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmrepro.data.readers import read_vqax
    from vlmrepro.data.synth import synthetic_world
    from vlmrepro.backbones import grid_encoder
    root = synthetic_world(tmp_path_factory.mktemp("world"), n_train=12, n_val=6, n_test=0, image_size=64, seed=1)
    enc, proc = grid_encoder("tiny-grid")
    d = tmp_path_factory.mktemp("features")
    return (split_features(read_vqax(root, "train", verbose=False), enc, proc, d/"train.safetensors"),
            split_features(read_vqax(root, "val", verbose=False), enc, proc, d/"val.safetensors"))


def make_loop(run_dir, world, callbacks=()):
    train, val = world
    dim = train.features.shape[-1]
    def make_model():
        torch.manual_seed(0)
        m, _ = build_magma("tiny-llama", dim); trainable(m, "adapters"); return m
    _, tok = build_magma("tiny-llama", dim)
    settings = LoopSettings(iterations=2, n_per_temperature=2, max_new_tokens=12, gen_batch_size=64, n_vqa_only=8,
                            official_metrics=False)
    tune = TrainConfig(epochs=2, batch_size=8, schedule="constant", max_grad_norm=None, progress=False, seed=0)
    critic = MetricCritic(threshold=0.3)                 # lenient: an untrained prefix accepts some samples
    return IllumeLoop(run_dir, settings, tune, make_model, lambda m: illume_optimizer(m, 3e-3), tok, train, val, critic,
                      log=lambda s: None, callbacks=callbacks)


def outcome(run_dir):
    "Everything a finished loop decided: samples, critic, datasets, selections and adapter bytes."
    out = {}
    for t in range(2):
        for f in ("samples.json", "critic.json", "dataset.json", "selected.json"):
            out[f"it{t}/{f}"] = json.loads((run_dir/f"it{t}"/f).read_text())
        tensors = load_file(str(run_dir/f"it{t}"/"adapters.safetensors"))      # values, not file bytes (header order varies)
        out[f"it{t}/adapters"] = {k: v.numpy().tobytes() for k, v in tensors.items()}
    return out


class Interrupt(Exception): pass

class KillAt:
    "Interrupt the tune stage of iteration 1 after `step` optimizer steps (like a kill between checkpoints)."
    def __init__(self, step): self.step, self.armed = step, True
    def after_step(self, model, st):
        if self.armed and st["step"] == self.step: self.armed = False; raise Interrupt


def test_resume_gives_the_same_result(world, tmp_path):
    ref = tmp_path/"uninterrupted"
    summary = make_loop(ref, world).run()
    assert [r["iteration"] for r in summary] == [0, 1]
    want = outcome(ref)
    assert want["it1/dataset.json"]["explanations"], "the test needs accepted explanations to be meaningful"

    # stopped after the sample stage of iteration 1, resumed by a new loop object
    a = tmp_path/"stopped"
    with pytest.raises(StopLoop): make_loop(a, world).run(stop_after=("sample", 1))
    assert not (a/"it1"/"critic.json").exists()
    assert make_loop(a, world).run() == summary and outcome(a) == want

    # later stages' artifacts deleted: they are recomputed identically
    for f in ("dataset.json", "selected.json", "adapters.safetensors"): (a/"it1"/f).unlink()
    shutil.rmtree(a/"it1"/"tune")
    assert make_loop(a, world).run() == summary and outcome(a) == want

    # interrupted inside tune (iteration 1, mid second epoch): fit resumes from the epoch checkpoint
    b = tmp_path/"killed"
    shutil.copytree(ref/"it0", b/"it0"); shutil.copytree(ref/"base", b/"base")
    n_items = len(want["it1/dataset.json"]["explanations"]) + len(want["it1/dataset.json"]["answer_only"])
    steps_per_epoch = -(-n_items // 8)
    with pytest.raises(Interrupt): make_loop(b, world, callbacks=[KillAt(steps_per_epoch + 1)]).run()
    assert not (b/"it1"/"selected.json").exists() and (b/"it1"/"tune"/"checkpoints"/"latest.json").exists()
    assert make_loop(b, world).run() == summary and outcome(b) == want


def test_loop_refuses_a_model_with_more_than_adapters_trainable(world, tmp_path):
    loop = make_loop(tmp_path, world)
    inner = loop.make_model
    def bad():
        m = inner(); trainable(m, "prefix", "adapters"); return m
    loop.make_model = bad
    with pytest.raises(VlmreproError, match="only they"): loop.model_at(0)


def fruit_stand_vqax(root: Path, n_train: int = 16, n_val: int = 6) -> Path:
    "A third-party data set in VQA-X's layout, unlike ILLUME's world: fruit on a table, its own questions, answers and words; PNG, 64 px."
    import random
    from PIL import Image, ImageDraw
    fruit = {"apple": ((200, 30, 30), "round and red"), "banana": ((230, 210, 40), "long and yellow"), "plum": ((90, 30, 120), "small and dark")}
    rng = random.Random(11)
    for split, n in (("train", n_train), ("val", n_val)):
        (root/"images"/split).mkdir(parents=True)
        ann = {}
        for i in range(n):
            kind, k = rng.choice(sorted(fruit)), rng.randint(1, 3)
            im = Image.new("RGB", (64, 64), (245, 238, 225)); dr = ImageDraw.Draw(im)
            dr.rectangle([0, 44, 63, 63], fill=(120, 80, 40))                            # the table
            for j in range(k): dr.ellipse([6 + 19 * j, 26, 20 + 19 * j, 42], fill=fruit[kind][0])
            name = f"stand_{split}_{i:04d}.png"; im.save(root/"images"/split/name)
            qas = [("which fruit is for sale?", kind, f"the fruit on the counter is {fruit[kind][1]}"),
                   ("how many pieces of fruit are on the table?", str(k), f"{k} of them lie in a row on the wooden table")]
            for q_i, (q, a, e) in enumerate(qas):
                ann[f"{split}{i:04d}{q_i}"] = {"question": q, "image_id": f"{split}-{i}", "image_name": name,
                                               "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
                                               "explanation": [e] * (1 if split == "train" else 3)}
        (root/"annotations").mkdir(exist_ok=True)
        (root/"annotations"/f"vqaX_{split}.json").write_text(json.dumps(ann))
    return root


@pytest.mark.slow
def test_smoke_preset_on_a_third_party_vqax_set(tmp_path, vlmrepro_cmd):
    root = fruit_stand_vqax(tmp_path/"fruit_stand")
    out = subprocess.run([*vlmrepro_cmd, "run", "illume", "--preset", "smoke", "-p", "data_root", str(root), "--run-id", "fruit",
                          "--results", str(tmp_path/"results")], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path/"results"/"illume"/"fruit"
    metrics = json.loads((run_dir/"metrics.json").read_text())
    assert {"val/vqa_acc", "val/vqa_acc_no_image", "val/cider", "train/acceptance_it0"} <= set(metrics)
    assert not any("consistency" in k or "human_critic" in k for k in metrics), "no scene files: no consistency, no simulated human"
    nb = (run_dir/"illume.ipynb").read_text()
    assert "no scene files" in nb and "fruit_stand" in nb
    assert list((run_dir/"figures").glob("*.png"))
