"Prismer: expert labelling resumes after a kill, the CLI, and a tiny end-to-end run far above chance."
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmrepro.cli import main as cli_main
from vlmrepro.core import VlmreproError
from vlmrepro.data.readers import PRISMER_EXPERTS, read_answer_list, read_prismer
from vlmrepro.data.synth import synthetic_world
from vlmrepro.systems.prismer.experts import CannyEdges, DepthNormals, OracleExpert, TextFeatures, label_dataset, list_images
from vlmrepro.metrics.caption import evaluate_captions
from vlmrepro.metrics.vqa import evaluate_vqa
from vlmrepro.systems.prismer.model import (Prismer, PrismerCollator, PrismerConfig, evaluate_answering, evaluate_captioning,
                                     train_prismer)
from vlmrepro.train import TrainConfig


@pytest.fixture(scope="module")
def world():
    return synthetic_world(n_train=400, n_val=50, n_test=50, image_size=64)   # the paper notebook's tiny world


class Killed(Exception): pass


class DiesAfter(CannyEdges):
    "Canny that 'kills the run' on its n-th image, after its label of the previous one was written."
    def __init__(self, n): super().__init__(); self.n, self.calls = n, 0
    def __call__(self, image, ctx):
        self.calls += 1
        if self.calls == self.n: raise Killed()
        return super().__call__(image, ctx)


def test_labelling_resumes_after_a_kill(world, tmp_path):
    imgs = list_images(world/"images", [world/"prismer/caption_val.json"])[:6]
    experts = [OracleExpert("depth", world), DepthNormals(), DiesAfter(4)]
    with pytest.raises(Killed): label_dataset(experts, world/"images", tmp_path, "synth", imgs, progress=False)
    assert not list(tmp_path.rglob("*.tmp"))                            # no half file left behind
    assert len(list((tmp_path/"edge").rglob("*.png"))) == 3 and len(list((tmp_path/"depth").rglob("*.png"))) == 4
    stats = label_dataset([OracleExpert("depth", world), DepthNormals(), CannyEdges()], world/"images", tmp_path, "synth", imgs, progress=False)
    assert stats.skipped == {"depth": 4, "normal": 4, "edge": 3} and stats.written == {"depth": 2, "normal": 2, "edge": 3}
    again = label_dataset([OracleExpert("depth", world), DepthNormals(), CannyEdges()], world/"images", tmp_path, "synth", imgs, progress=False)
    assert sum(again.written.values()) == 0


def test_experts_cli(world, tmp_path, capsys):
    assert cli_main(["experts", "--data", str(world), "--experts", "depth,normal,edge,seg,det,ocr", "--label-root", str(tmp_path),
                     "--list", str(world/"prismer/caption_test.json")]) == 0
    assert "ocr_detection" in capsys.readouterr().out
    stems = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*")}
    assert "obj_detection/synth/test/COCO_test_000002000000.json" in stems
    assert "ocr_detection/synth/test/COCO_test_000002000000.safetensors" in stems
    assert len([s for s in stems if s.endswith(".png")]) == 6 * 50
    assert cli_main(["experts", "--data", str(world), "--experts", "dpth", "--label-root", str(tmp_path)]) == 2
    assert "unknown expert 'dpth'" in capsys.readouterr().err


def _labels(world, tmp_path, experts=("depth",)):
    root = tmp_path/"labels"
    label_dataset([OracleExpert(e, world) for e in experts], world/"images", root, "synth", list_images(world/"images"), progress=False)
    return root


def test_tiny_prismer_far_above_chance(world, tmp_path):
    "Captioning CIDEr-D beats the best constant caption by a wide margin; VQA beats a blind per-question baseline."
    torch.manual_seed(0)
    labels = _labels(world, tmp_path)
    exp = ("depth",)                                  # a dense expert: cheap per step (code experts are covered in 81_prismer_model)
    cfg = PrismerConfig(experts=exp, expert_size=32, stem_width=32, latents=16, resampler_layers=2, code_dim=16)   # the paper notebook's tiny sizes
    data = lambda split, task: list(read_prismer(world, split, task=task, experts=exp, label_root=labels, verbose=False))
    tc = lambda steps, lr=1e-3: TrainConfig(epochs=100, max_steps=steps, batch_size=32, lr=lr, weight_decay=0.05, warmup_steps=5,
                                            progress=False)

    model = Prismer(cfg)
    col = PrismerCollator(model.tokenizer, cfg)
    train_prismer(model, data("train", "caption"), col, tc(120), tmp_path/"cap")
    val = data("val", "caption")
    r, _ = evaluate_captioning(model, val, PrismerCollator(model.tokenizer, cfg, train=False), world/"annotations/captions_val.json",
                               50, 3, 3, 30)
    const = Counter(c for s in read_prismer(world, "train", verbose=False) for c in s.captions).most_common(1)[0][0]
    chance = 100 * evaluate_captions(world/"annotations/captions_val.json", [{"image_id": s.image_id, "caption": const} for s in val],
                                     fast=True)["CIDEr"]
    assert sum(col.missing.values()) == 0
    assert r["cider"] > 2 * chance, (r, chance)      # the best constant caption already scores ~25-30 here

    # VQA with the notebook's recipe: 300 steps at lr 3e-3
    model = Prismer(cfg)
    train_prismer(model, data("train", "vqa"), PrismerCollator(model.tokenizer, cfg, task="vqa"), tc(300, 3e-3), tmp_path/"vqa")
    vq = data("val", "vqa")
    ann = world/"annotations/v2_mscoco_val_annotations.json"
    _, preds = evaluate_answering(model, vq, PrismerCollator(model.tokenizer, cfg, task="vqa", train=False), ann, read_answer_list(world), 64)
    ours = evaluate_vqa(preds, ann)
    train_qa = list(read_prismer(world, "train", task="vqa", verbose=False))
    by_q = {}
    for s in train_qa: by_q.setdefault(s.question, Counter())[s.answers[0]] += s.meta.get("weight", 1.0)
    top = Counter(a for s in train_qa for a in s.answers).most_common(1)[0][0]
    blind = evaluate_vqa([{"question_id": s.question_id, "answer": by_q[s.question].most_common(1)[0][0] if s.question in by_q else top}
                          for s in vq], ann)                 # the best a model that ignores the image can do per question text
    assert ours["accuracy"] > blind["accuracy"] + 5, (ours["accuracy"], blind["accuracy"])
    assert ours["per_question_type"]["how many"] > blind["per_question_type"]["how many"] + 25, (ours, blind)   # it counts
