"""FROMAGe: exactly the intended parameters train, the [RET] row is renormalised, missing images fail loudly,
the tiny run retrieves far above chance, the retrieval index round-trips without pickle, the presets and the seed
sweep resolve, and the paper notebook runs end to end (smoke preset) through `vlmrepro run`."""
import copy, json, pickle, subprocess, tempfile, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmrepro.core import VlmreproError
from vlmrepro.data.records import Dropped
from vlmrepro.data.synth import synthetic_world
from vlmrepro.systems.fromage.index import RetrievalIndex, build_index, import_upstream_embeddings
from vlmrepro.metrics.retrieval import recall_at_k, target_ranks
from vlmrepro import backbones as bb
from vlmrepro.systems.fromage import model as fr
from vlmrepro.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO/"nbs"/"papers"/"fromage.ipynb"


@pytest.fixture(scope="module")
def world():
    return synthetic_world(n_train=600, n_val=100, n_test=0, image_size=64)


def tiny_model(**kw):
    return fr.fromage_model("tiny-opt", "tiny-clip", fr.FromageConfig(max_len=23, **kw))


def test_only_intended_parameters_train():
    m = tiny_model()
    d_vis, d_lm = m.vision.config.hidden_size, m.embedding.embedding_dim
    counts = fr.trainable_counts(m)
    assert counts == {"lm.model.decoder.embed_tokens.weight": d_lm, "visual_embeddings.weight": d_vis * d_lm,
                      "visual_embeddings.bias": d_lm, "visual_fc.weight": d_vis * 256, "visual_fc.bias": 256,
                      "text_hidden_fcs.0.weight": d_lm * 256, "text_hidden_fcs.0.bias": 256, "logit_scale": 1}
    assert not any(p.requires_grad for n, p in m.vision.named_parameters())
    assert [n for n, p in m.lm.named_parameters() if p.requires_grad] == ["model.decoder.embed_tokens.weight"]
    # the paper model (OPT-6.7B + CLIP ViT-L/14, k=1) on the meta device: 5,513,729 as the SPEC implies
    paper = fr.Fromage(bb.paper_model("facebook/opt-6.7b"), copy.deepcopy(m.tokenizer),
                       bb.paper_model("openai/clip-vit-large-patch14").vision_model, cfg=fr.FromageConfig())
    c = fr.trainable_counts(paper)
    assert c["visual_embeddings.weight"] + c["visual_embeddings.bias"] == 1024 * 4096 + 4096
    assert sum(c.values()) == 1024 * 4096 + 4096 + 1024 * 256 + 256 + 4096 * 256 + 256 + 4096 + 1 == 5_513_729
    vis4 = fr.Fromage(bb.paper_model("facebook/opt-6.7b"), copy.deepcopy(m.tokenizer),
                      bb.paper_model("openai/clip-vit-large-patch14").vision_model, cfg=fr.FromageConfig(n_visual_tokens=4))
    assert fr.trainable_counts(vis4)["visual_embeddings.weight"] == 1024 * 4096 * 4


def test_ret_row_renormalised_and_frozen_rows_unchanged(world):
    m = tiny_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = TrainConfig(max_steps=2, batch_size=8, lr=1e-2, schedule="constant", progress=False, precision="no", device="cpu")
    fit(m, fr.cc3m_dataset(world, "train"), cfg, tempfile.mkdtemp(), collate_fn=fr.FromageCollator(m),
        loss_fn=fr.fromage_loss, optimizer=fr.fromage_optimizer(m, cfg), callbacks=[fr.RetNorm()])
    w = m.embedding.weight.detach()
    w0 = before["lm.model.decoder.embed_tokens.weight"]
    moved = (w != w0).any(1).nonzero().flatten().tolist()
    assert moved == [m.ret_id]
    frozen = torch.cat([w[:m.ret_id], w[m.ret_id + 1:len(m.tokenizer)]])
    torch.testing.assert_close(w[m.ret_id].norm(), frozen.norm(dim=1).mean(), rtol=1e-5, atol=1e-6)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(fr.trainable_counts(m))       # every trained piece moved; nothing else did


def test_missing_image_is_a_clear_error_not_a_hang(world, tmp_path):
    (tmp_path/"cc3m_train.tsv").write_text("caption\timage\na red circle\tpics/missing_cat.png\n")
    t0 = time.time()
    with pytest.raises(VlmreproError, match="missing_cat.png"):
        fr.cc3m_dataset(tmp_path, "train", verbose=False)
    m = tiny_model()
    collate = fr.FromageCollator(m)
    good = fr.cc3m_dataset(world, "train")[0]
    with pytest.raises(VlmreproError, match="gone.jpg"):
        collate([good, Dropped("missing image", "images/train/gone.jpg", "file not found")])
    with pytest.raises(VlmreproError, match="nowhere.jpg"):
        fr.generate_for_images_and_texts(m, [tmp_path/"nowhere.jpg", "a caption"], num_words=2)
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_tiny_run_retrieves_far_above_chance(world):
    from vlmrepro.data.readers import read_coco_captions
    m = tiny_model()
    val = read_coco_captions(world, "val", verbose=False)       # every caption of every image is a query
    paths = [Path(s.image_path) for s in val]
    queries = [[c + "[RET]"] for s in val for c in s.captions]
    targets = [i for i, s in enumerate(val) for _ in s.captions]

    def r_at(model):
        q = fr.query_embeddings(model, queries)
        return recall_at_k(target_ranks(q @ model.embed_images(paths).T, targets), ks=(1, 10))

    before = r_at(m.eval())
    cfg = TrainConfig(max_steps=120, epochs=1000, batch_size=48, lr=5e-3, betas=(0.9, 0.95), warmup_steps=12,
                      schedule="constant", progress=False, precision="no", device="cpu", seed=0)
    fit(m, fr.cc3m_dataset(world, "train"), cfg, tempfile.mkdtemp(), collate_fn=fr.FromageCollator(m),
        loss_fn=fr.fromage_loss, optimizer=fr.fromage_optimizer(m, cfg), callbacks=[fr.RetNorm()])
    after = r_at(m.eval())
    chance = 100 / len(val)
    print(f"caption->image, {len(queries)} queries over {len(val)} images: R@1 {before['R@1']:.1f} -> {after['R@1']:.1f}, "
          f"R@10 {before['R@10']:.1f} -> {after['R@10']:.1f} (chance R@1 {chance:.1f})")
    assert after["R@1"] >= 4 * chance and after["R@10"] >= 3 * 10 * chance
    assert after["R@10"] > before["R@10"]


def test_index_round_trips_and_memory_maps(world, tmp_path):
    m = tiny_model().eval()
    folder = world/"images"/"val"
    idx = RetrievalIndex.load(build_index(folder, m.embed_images, tmp_path/"idx", progress=False))
    assert isinstance(idx.embeddings, np.memmap) and len(idx) == len(list(folder.glob("*.jpg")))
    first = sorted(folder.glob("*.jpg"))[:4]
    np.testing.assert_allclose(idx.embeddings[:4], m.embed_images(first).numpy(), atol=1e-5)
    scores, rows = idx.search(idx.embeddings[:3], k=1)
    assert rows[:, 0].tolist() == [0, 1, 2]
    assert not list(tmp_path.rglob("*.pkl"))
    out = fr.generate_for_images_and_texts(m, [first[0], "a picture[RET]"], num_words=0, index=idx, max_img_per_ret=2)
    assert out[-1][0].image.size == (64, 64) and len(out[-1]) == 2


def test_pickle_importer_refuses_without_trust_flag(tmp_path):
    pkl = tmp_path/"cc3m_embeddings.pkl"
    with open(pkl, "wb") as f: pickle.dump({"paths": ["a.jpg", "b.jpg"], "embeddings": np.eye(2, 4, dtype=np.float32)}, f)
    with pytest.raises(VlmreproError, match="trust_pickle=True"):
        import_upstream_embeddings(pkl, tmp_path/"out")
    assert not (tmp_path/"out").exists()
    with pytest.raises(VlmreproError, match="trust_pickle=True"):
        RetrievalIndex.load(pkl)
    with pytest.warns(UserWarning, match="can run code"):
        idx = RetrievalIndex.load(import_upstream_embeddings(pkl, tmp_path/"out", trust_pickle=True))
    assert idx.paths == ["a.jpg", "b.jpg"] and isinstance(idx.embeddings, np.memmap)


def test_presets_resolve_and_map_onto_the_config():
    from vlmrepro.registry import resolve_params, system_config
    paper = resolve_params(NOTEBOOK, "paper")
    assert (paper["lm"], paper["batch_size"], paper["lr"], paper["max_steps"], paper["precision"]) == \
        ("facebook/opt-6.7b", 180, 3e-4, 20000, "bf16")
    cfg = system_config("fromage", preset="paper")
    assert cfg.train.warmup_steps == 100 and cfg.vist_root and cfg.visdial_root and cfg.n_answer_dialogs is None
    smoke = system_config("fromage", preset="smoke")
    assert smoke.train.max_steps <= 5 and smoke.n_train <= 20


def test_paper_preset_refuses_to_start_without_its_data(tmp_path):
    from vlmrepro.registry import system_config
    from vlmrepro.systems.fromage.system import preflight
    cfg = system_config("fromage", {"data_root": str(tmp_path/"cc3m")}, preset="paper")
    with pytest.raises(VlmreproError, match="cc3m_train.tsv"):
        preflight(cfg)


def test_seed_sweep_file_names_three_seeds_of_the_tiny_preset():
    import yaml
    from vlmrepro.runner import sweep_runs
    spec = yaml.safe_load((REPO/"nbs"/"papers"/"sweeps"/"fromage_seeds.yaml").read_text())
    assert (spec["system"], spec["preset"]) == ("fromage", "tiny")
    assert [r["seed"] for r in sweep_runs(spec)] == [0, 1, 2]


@pytest.mark.slow
def test_smoke_preset_runs_the_notebook_end_to_end(tmp_path, vlmrepro_cmd):
    res = subprocess.run([*vlmrepro_cmd, "run", "fromage", "--preset", "smoke", "--results", str(tmp_path), "--run-id", "smoke"],
                         capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = tmp_path/"fromage"/"smoke"
    metrics = json.loads((run/"metrics.json").read_text())
    for name in ("cc3m/t2i_r@1", "vist_ctx_last/r@1", "vist_ctx_5c/r@1", "vist_ctx_5c4i/r@1", "vist_upstream/r@1",
                 "visdial_rounds_1/r@1", "visdial_rounds_10/r@1", "visdial_upstream/r@1", "visdial_answers/mrr",
                 "visdial_answers/mrr_blind", "visdial_answers_upstream/mrr", "caption/cider", "caption/cider_constant"):
        assert name in metrics, name
    assert {"context.png", "answers_and_captions.png", "retrieved_stories.png"} <= {p.name for p in (run/"figures").iterdir()}


def _upstream_file(model, path, full_embeddings=False, drop=(), extra=None):
    "Write `model`'s trained pieces exactly as upstream's prune_model_ckpt.py does: torch.save({'state_dict': sorted})."
    from collections import OrderedDict
    sd = {"model.logit_scale": model.logit_scale, "ret_input_embeddings.weight": model.embedding.weight[model.ret_id]}
    for part in ("visual_embeddings", "visual_fc"):
        for p in ("weight", "bias"): sd[f"model.{part}.{p}"] = getattr(model, part).get_parameter(p)
    for i, fc in enumerate(model.text_hidden_fcs):
        sd[f"model.text_hidden_fcs.{i}.0.weight"], sd[f"model.text_hidden_fcs.{i}.0.bias"] = fc.weight, fc.bias
    if full_embeddings: sd["model.input_embeddings.weight"] = model.embedding.weight
    sd = {k: v.detach().clone() for k, v in sd.items() if k not in drop} | (extra or {})
    torch.save({"state_dict": OrderedDict(sorted(sd.items()))}, path)
    (path.parent/"model_args.json").write_text(json.dumps({
        "opt_version": "tiny-story-llama", "task": "multitask", "freeze_lm": True, "visual_encoder": "tiny-clip", "freeze_vm": True,
        "n_visual_tokens": model.cfg.n_visual_tokens, "shared_emb_dim": model.cfg.shared_emb_dim,
        "text_emb_layers": list(model.cfg.text_emb_layers), "retrieval_token_idx": model.ret_id}))
    return path


def test_converter_round_trips_an_upstream_layout_file(world, tmp_path):
    from vlmrepro.systems.fromage.convert import convert_checkpoint, load_converted
    torch.manual_seed(0); ours = fr.fromage_model("tiny-story-llama", "tiny-clip", fr.FromageConfig()).eval()
    with torch.no_grad(): ours.embedding.weight[ours.ret_id] += 0.5; ours.logit_scale += 0.3
    images = sorted((world/"images"/"val").glob("*.jpg"))[:3]
    prompts = [[images[0], "a red circle[RET]"], ["a blue star in the top left[RET]"]]
    for full in (False, True):                                   # the released layout, and the newer script's
        ckpt = _upstream_file(ours, tmp_path/f"pretrained_ckpt{int(full)}.pth.tar", full_embeddings=full)
        out = convert_checkpoint(ckpt, tmp_path/f"converted{int(full)}", tmp_path/"model_args.json")
        assert sorted(p.name for p in out.iterdir()) == ["fromage.safetensors", "fromage_config.json"]
        torch.manual_seed(1); fresh = load_converted(fr.fromage_model("tiny-story-llama", "tiny-clip", fr.FromageConfig()).eval(), out)
        torch.testing.assert_close(fresh.embed_images(images), ours.embed_images(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(fr.query_embeddings(fresh, prompts), fr.query_embeddings(ours, prompts), rtol=0, atol=1e-6)


def test_converter_refuses_a_missing_key_and_non_tensor_content_by_name(tmp_path):
    from vlmrepro.systems.fromage.convert import convert_checkpoint
    m = fr.fromage_model("tiny-story-llama", "tiny-clip", fr.FromageConfig())
    ckpt = _upstream_file(m, tmp_path/"ckpt.pth.tar", drop=("model.text_hidden_fcs.0.0.bias",))
    with pytest.raises(VlmreproError, match=r"missing \['model.text_hidden_fcs.0.0.bias'\]"):
        convert_checkpoint(ckpt, tmp_path/"out")
    ckpt = _upstream_file(m, tmp_path/"train.pth.tar", extra={"module.model.lm.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(VlmreproError, match="unexpected.*module.model.lm.lm_head.weight"):
        convert_checkpoint(ckpt, tmp_path/"out")
    torch.save({"state_dict": {"model.logit_scale": Dropped("x", "y")}}, tmp_path/"code.pth.tar")   # an object, not a tensor
    with pytest.raises(VlmreproError, match="cannot be read as plain tensors"):
        convert_checkpoint(tmp_path/"code.pth.tar", tmp_path/"out", tmp_path/"model_args.json")
    assert not (tmp_path/"out").exists()
