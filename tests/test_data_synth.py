"""The synthetic world: deterministic per seed, every format round-trips through its reader, the cache honours
VLMREPRO_CACHE, the CLI functions work, and the questions need the image (a pixel-reading oracle beats the prior)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlmrepro.core import VlmreproError, read_json
from vlmrepro.data.readers import read
from vlmrepro.data.records import Sample
from vlmrepro.data.shards import ShardDataset
from vlmrepro.cli import dispatch
from vlmrepro.data.synth import (COLORS, make_scene, synth_samples, synthetic_world, world_digest, write_world)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("w")/"world", n_train=12, n_val=4, n_test=3, image_size=48, seed=5, shard_size=5)


def test_deterministic_per_seed(world, tmp_path):
    again = write_world(tmp_path/"again", n_train=12, n_val=4, n_test=3, image_size=48, seed=5, shard_size=5)
    other = write_world(tmp_path/"other", n_train=12, n_val=4, n_test=3, image_size=48, seed=6, shard_size=5)
    assert world_digest(world) == world_digest(again) != world_digest(other)


def test_every_format_round_trips(world):
    scenes = {sp: [make_scene(5, sp, i, 48) for i in range(n)] for sp, n in (("train", 12), ("val", 4), ("test", 3))}
    for sp, scs in scenes.items():
        caps = [s.captions for s in scs]
        if sp != "test":
            assert [s.captions for s in read("coco", world, sp)] == caps
            assert [s.captions for s in read("karpathy", world, sp)] == caps
            usable = [[a["caption"] for a in s.vizwiz if not (a["is_rejected"] or a["is_precanned"])] for s in scs]
            assert [s.captions for s in read("vizwiz", world, sp, verbose=False)] == usable
            vq = read("vqav2", world, sp)
            qas = [qa for s in scs for qa in s.qas]
            assert [(v.question, v.answers, v.answer_type, v.question_type, v.answer) for v in vq] == \
                   [(q["question"], q["answers"], q["answer_type"], q["question_type"], q["answer"]) for q in qas]
            assert [v.explanations for v in read("vqax", world, sp)] == [q["explanations"] for q in qas]
        assert [s.captions[0] for s in read("cc3m", world, sp)] == [c[0] for c in caps]
        sh = [x for x in ShardDataset(world/"shards"/sp) if isinstance(x, Sample)]
        assert [(x.image_id, x.captions, x.labels, x.meta["text_detected"]) for x in sh] == \
               [(s.image_id, s.captions, s.labels, s.text_detected) for s in scs]
        pv = read("prismer", world, sp, task="vqa")
        if sp == "train":      # one row per distinct answer, weighted by its share of the 10
            assert {(p.image_path, p.question) for p in pv} == {(f"images/{sp}/{s.file_name}", q["question"]) for s in scs for q in s.qas}
            assert sum(p.meta["weight"] for p in pv) == pytest.approx(sum(len(s.qas) for s in scs))
        else:
            assert [p.question_id for p in pv] == [q["question_id"] for s in scs for q in s.qas]
    assert [s.captions for s in read("vizwiz", world, "test")] == [[]] * 3
    ex = read("prismer", world, "val", experts=("depth", "seg_coco", "obj_detection"))
    assert all(p is not None for s in ex for p in s.experts.values())
    w = read_json(world/"world.json")
    assert w["counts"] == {"train": 12, "val": 4, "test": 3} and w["seed"] == 5


def test_cache_honours_env_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMREPRO_CACHE", str(tmp_path/"cache"))
    a = synthetic_world(n_train=3, n_val=1, n_test=1, image_size=32)
    assert a.is_relative_to(tmp_path/"cache") and (a/"world.json").exists()
    stamp = (a/"world.json").stat().st_mtime_ns
    assert synthetic_world(n_train=3, n_val=1, n_test=1, image_size=32) == a
    assert (a/"world.json").stat().st_mtime_ns == stamp                      # not rewritten
    with pytest.raises(VlmreproError, match="different synthetic world"):
        synthetic_world(root=a, n_train=4, n_val=1, n_test=1, image_size=32)


def test_cli_function(tmp_path):
    assert dispatch(["synth", "--out", str(tmp_path/"w"), "--n-train", "2", "--n-val", "1", "--n-test", "1", "--image-size", "32", "--seed", "3"]) == 0
    assert read_json(tmp_path/"w"/"world.json")["seed"] == 3
    with pytest.raises(VlmreproError, match="image_size must be at least 32"):
        dispatch(["synth", "--out", str(tmp_path/"x"), "--image-size", "8", "--n-train", "1"])


def test_questions_need_the_image():
    """Reading the pixel at the object's centre answers colour questions; the best answer prior cannot."""
    qs = [(s, q) for s in (make_scene(0, "val", i, 64, experts=False) for i in range(150)) for q in s.qas if q["kind"] == "color"]
    prior = Counter(q["answer"] for _, q in qs).most_common(1)[0][1] / len(qs)
    def look(s, q):
        o = next(o for o in s.objects if q["question"] == f"what color is the {o.shape}?")
        px = np.asarray(s.image, int)[int(o.center[1]), int(o.center[0])]
        return min(COLORS, key=lambda c: np.abs(px - COLORS[c]).sum())
    acc = np.mean([look(s, q) == q["answer"] for s, q in qs])
    assert len(qs) > 30 and prior < 0.35 and acc > 0.95, (prior, acc)
    yn = [q["answer"] for s in (make_scene(0, "train", i, 64, experts=False) for i in range(150)) for q in s.qas if q["kind"] == "exists"]
    assert 0.35 < yn.count("yes") / len(yn) < 0.65
