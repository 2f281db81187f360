"Prismer: expert labelling resumes after a kill, the CLI, the presets, and the paper notebook end to end on the synthetic world and on a dataset unlike it."
import json, subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmrepro.cli import main as cli_main
from vlmrepro.data.synth import synthetic_world
from vlmrepro.systems.prismer.experts import CannyEdges, DepthNormals, OracleExpert, label_dataset, list_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return synthetic_world(n_train=400, n_val=50, n_test=50, image_size=64)


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


def test_presets_map_onto_the_config():
    from vlmrepro.registry import system_config
    paper = system_config("prismer", preset="paper")
    assert (paper.vision, paper.language, paper.image_size, paper.expert_size, paper.latents, paper.code_dim) == \
        ("openai/clip-vit-base-patch16", "roberta-base", 480, 224, 64, 64)
    assert (paper.pretrain.lr, paper.pretrain.batch_size, paper.pretrain.epochs, paper.pretrain.warmup_steps) == (3e-4, 1024, 20, 2000)
    assert (paper.train.lr, paper.train.batch_size, paper.train.epochs, paper.vqa.lr, paper.vqa.batch_size, paper.vqa.epochs) == \
        (5e-5, 256, 3, 5e-5, 512, 10)
    assert "depth=" in paper.expert_checkpoints and paper.expert_device == "cuda"
    assert system_config("prismer", preset="smoke").vqa.max_steps == 4


def test_paper_preset_refuses_without_its_files():
    from vlmrepro.core import VlmreproError
    from vlmrepro.registry import system_config
    from vlmrepro.systems.prismer.system import check_data
    with pytest.raises(VlmreproError, match="/path/to/coco_vqa/images not found"):
        check_data(system_config("prismer", preset="paper"))


def _run(cmd, tmp_path, *args):
    return subprocess.run([*cmd, "run", "prismer", "--preset", "smoke", "--results", str(tmp_path/"results"), *args],
                          capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.mark.slow
def test_smoke_preset_runs_the_notebook(vlmrepro_cmd, tmp_path):
    r = _run(vlmrepro_cmd, tmp_path, "--run-id", "smoke")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((tmp_path/"results/prismer/smoke/metrics.json").read_text())
    for k in ("test/cider_zeroshot", "test/cider_zeroshot_prismerz", "val/vqa_acc", "val/vqa_acc_prismerz_tokens", "val/vqa_acc_without_all",
              "val/vqa_acc_experts_1", "val/vqa_acc_only_edge", "val/vqa_acc_experts_only", "val/vqa_acc_seed_mean"):
        assert k in m, k
    assert {"expert_maps.png", "vqa_question_types.png", "expert_knockout.png", "zeroshot_captions.png"} <= \
        {p.name for p in (tmp_path/"results/prismer/smoke/figures").iterdir()}


def third_party_dataset(root: Path, n=(24, 8, 8), seed: int = 3) -> Path:
    "A small dataset unlike the synthetic world: PNG scenes of dots on striped fields, their own words, questions and answers."
    rng = np.random.default_rng(seed)
    tones = {"amber": (230, 160, 20), "teal": (20, 150, 150), "crimson": (180, 20, 50), "olive": (120, 130, 30)}
    fields = {"pale": (235, 235, 220), "dusky": (70, 70, 90)}
    caps, vqa_rows, ann_caps, ann_vqa, answers = {}, {}, {}, [], []
    for split, count in zip(("train", "val", "test"), n):
        (root/"images"/split).mkdir(parents=True, exist_ok=True)
        caps[split], vqa_rows[split], ann_caps[split] = [], [], {"images": [], "annotations": []}
        for i in range(count):
            iid = {"train": 0, "val": 5000, "test": 9000}[split] + i
            tone, field, k = rng.choice(list(tones)), rng.choice(list(fields)), int(rng.integers(1, 6))
            im = Image.new("RGB", (64, 64), fields[field]); dr = ImageDraw.Draw(im)
            for y in range(0, 64, 8): dr.line([(0, y), (63, y)], fill=tuple(int(c * 0.9) for c in fields[field]))
            for _ in range(k):
                x, y = rng.integers(6, 58, 2); dr.ellipse([x - 4, y - 4, x + 4, y + 4], fill=tones[tone])
            rel = f"images/{split}/pic{iid:05d}.png"; im.save(root/rel)
            texts = [f"{k} {tone} dots on a {field} striped field", f"a {field} field with {k} {tone} dots"]
            if split == "train": caps[split] += [{"image": rel, "caption": t} for t in texts]
            else:
                caps[split].append({"image": rel, "image_id": iid})
                ann_caps[split]["images"].append({"id": iid, "file_name": rel})
                ann_caps[split]["annotations"] += [{"id": iid * 10 + j, "image_id": iid, "caption": t} for j, t in enumerate(texts)]
            for j, (q, a, qt, at) in enumerate([("how many dots can you count", str(k), "how many", "number"),
                                                ("which tone do the dots have", tone, "which tone", "other"),
                                                ("is the field dusky", "yes" if field == "dusky" else "no", "is the", "yes/no")]):
                qid = iid * 10 + j; answers.append(a)
                if split == "train": vqa_rows[split].append({"image": rel, "question": q, "answer": a, "weight": 1.0, "dataset": "vqa"})
                else:
                    vqa_rows[split].append({"image": rel, "question": q, "question_id": qid})
                    if split == "val":
                        ann_vqa.append({"image_id": iid, "question_id": qid, "question_type": qt, "answer_type": at, "multiple_choice_answer": a,
                                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": t + 1} for t in range(10)]})
    (root/"prismer").mkdir(); (root/"annotations").mkdir()
    for split in ("train", "val", "test"):
        (root/"prismer"/f"caption_{split}.json").write_text(json.dumps(caps[split]))
        (root/"prismer"/f"vqa_{split}.json").write_text(json.dumps(vqa_rows[split]))
        if split != "train": (root/"annotations"/f"captions_{split}.json").write_text(json.dumps({"type": "captions", **ann_caps[split]}))
    (root/"annotations/v2_mscoco_val_annotations.json").write_text(json.dumps({"annotations": ann_vqa}))
    (root/"prismer/answer_list.json").write_text(json.dumps(sorted(set(answers))))
    return root


@pytest.mark.slow
def test_smoke_preset_on_a_third_party_dataset(vlmrepro_cmd, tmp_path):
    data = third_party_dataset(tmp_path/"dots")
    r = _run(vlmrepro_cmd, tmp_path, "--run-id", "dots", "-p", "data_root", str(data), "-p", "experts", "edge", "-p", "single_experts", "[edge]",
             "-p", "cumulative", "['', edge]")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((tmp_path/"results/prismer/dots/metrics.json").read_text())
    assert "val/vqa_acc_q_which_tone" in m and "val/vqa_acc_without_edge" in m and not any("how_many_shapes" in k for k in m)
    assert len(list((data/"labels"/"edge").rglob("*.png"))) == 40                       # the classic edge expert labelled every image
    # a normal expert without depth is refused before any work, naming the fix
    r = _run(vlmrepro_cmd, tmp_path, "--run-id", "dots-normal", "-p", "data_root", str(data), "-p", "experts", "normal")
    assert r.returncode != 0 and "add depth to experts" in r.stdout + r.stderr
    (data/"annotations/captions_val.json").unlink()
    r = _run(vlmrepro_cmd, tmp_path, "--run-id", "dots-nocaps", "-p", "data_root", str(data), "-p", "experts", "edge")
    assert r.returncode == 2 and "annotations/captions_val.json" in r.stderr and "not found" in r.stderr   # refused before any work
