"""ILLUME: the critic rule on fixed strings, and a loop that resumes (after a stage, after deleted artifacts, after
an interruption inside `tune`) ending exactly where an uninterrupted loop ends."""
import json, shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmrepro.core import VlmreproError
from vlmrepro.systems.illume.loop import IllumeLoop, LoopSettings, MetricCritic, StopLoop, illume_optimizer, rouge_l, split_features
from vlmrepro.train import TrainConfig
from vlmrepro.systems.illume.magma import build_magma, trainable


def test_critic_rule():
    c = MetricCritic()
    assert c.score("no", ["no"]) == 0.0                      # under 3 characters scores 0, even when it matches
    assert c.score("red", ["red"]) == 1.0                    # 3 characters is enough
    assert c.score("  the star is red ", ["The Star IS red"]) == 1.0   # reference lowercased, both stripped
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
