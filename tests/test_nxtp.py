"""NxTP: the label mask against a brute-force reading of its rules, the KV-cache benchmark, the presets, and a short
tiny training run that must recognise objects far better than random labels."""
import json, random
from pathlib import Path

import pytest
import torch

from vlmrepro.systems.nxtp import model as nxtp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    "Tiny models run fastest on one thread (and a shared CPU makes torch's spinning threads very slow)."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def reference_mask(ids, n_img, are, comma, n_valid, upstream_last=False):
    "The mask's rules, one (query, key) pair at a time."
    T = len(ids); L = n_img + T
    a = n_img + ids.index(are)
    commas = [n_img + i for i in range(T) if i < n_valid and ids[i] == comma and n_img + i > a]
    seg = lambda p: sum(c < p for c in commas)                    # a comma belongs to the label it ends
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if k >= n_img + n_valid: continue                       # padding key
            if q < n_img and k < n_img: out[q, k] = True            # image block, both ways
            elif k > q: continue                                    # causal
            elif k <= a: out[q, k] = True                           # image and prompt
            elif q >= n_img + n_valid: continue                     # a pad query never sees labels
            elif seg(q) == seg(k) and not (upstream_last and seg(k) == len(commas)): out[q, k] = True
    return out


@pytest.mark.parametrize("upstream_last", [False, True])
def test_mask_matches_its_rules(upstream_last):
    are, comma, n_img = 7, 9, 3
    rng = random.Random(0)
    rows, lens = [], []
    for _ in range(6):
        prompt = [1, 2] + [rng.choice([3, 4, 5]) for _ in range(rng.randint(1, 3))] + [are]
        labels = [[rng.choice([10, 11, 12, 13]) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 4))]
        text = prompt + sum(([*l, comma] for l in labels[:-1]), []) + labels[-1]
        rows.append(text); lens.append(len(text))
    T = max(lens) + 2
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    valid = torch.tensor([[1] * n + [0] * (T - n) for n in lens])
    got = nxtp.nxtp_attention_mask(ids, n_img, are, comma, valid, upstream_last_label=upstream_last)
    for b, r in enumerate(rows):
        ref = reference_mask(ids[b].tolist(), n_img, are, comma, lens[b], upstream_last)
        real = n_img + lens[b]                                      # pad queries: only their keys' rule matters
        assert torch.equal(got[b, :real], ref[:real]), f"sequence {b}: {r}"
        assert not got[b, :, real:].any()


def test_benchmark_writes_its_report(tmp_path, one_thread):
    from vlmrepro.tools.bench_decoding import decoding_benchmark
    res = decoding_benchmark(tmp_path, n_images=1, k=3, max_steps=4, repeats=1, width=64, layers=1)
    assert res["same_labels"] and res["speedup"] > 0
    assert json.loads((tmp_path/"nxtp_decoding.json").read_text())["k"] == 3
    assert "speed-up" in (tmp_path/"nxtp_decoding.md").read_text()


def test_presets_resolve_and_paper_is_upstream():
    from vlmrepro.registry import resolve_params
    nb = REPO/"nbs"/"papers"/"nxtp.ipynb"
    paper = resolve_params(nb, "paper")
    assert (paper["vision"], paper["n_lm_blocks"], paper["lr"], paper["batch_size"] * paper["grad_accum"]) == \
        ("openai/clip-vit-large-patch14", 6, 1e-5, 512)
    # upstream's behaviour in every switch: substring noise removal, its last-label mask, one template per batch, N(0, 1) rows
    assert (paper["word_boundary"], paper["upstream_last_label"], paper["prompt_per_sample"], paper["new_rows"], paper["min_score"]) == \
        (False, True, False, "normal", 0.0)
    tiny = resolve_params(nb, "tiny")
    assert (tiny["word_boundary"], tiny["upstream_last_label"], tiny["prompt_per_sample"], tiny["new_rows"]) == (True, False, True, "mean")
    assert resolve_params(nb, "small")["lm"] == "smollm2-135m"


def test_paper_preflight_refuses_placeholders():
    from vlmrepro.core import VlmreproError
    from vlmrepro.registry import system_config
    from vlmrepro.systems.nxtp import system as nxtp_system
    cfg = system_config("nxtp", preset="paper")
    with pytest.raises(VlmreproError, match=r"data_root is the placeholder '/path/to/data'.*cc3m/cc3m_train/\*\.tar"):
        nxtp_system.data_files(cfg)
    with pytest.raises(VlmreproError, match=r"lm is the placeholder .*params.json, consolidated.00.pth"):
        nxtp_system.data_files(system_config("nxtp", {"data_root": "/data"}, preset="paper"))
    files = nxtp_system.data_files(system_config("nxtp", {"data_root": "/data", "lm": "meta-llama/Llama-2-7b-hf"}, preset="paper"))
    assert [str(f["path"]) for f in files] == ["/data/cc3m/cc3m_train", "/data/sbu/sbu_train", "/data/coco/coco_train",
                                               "/data/cc3m/cc3m_valid", "/data/coco/coco_valid", "/data/openimages_v7/openimages_v7_valid"]
    assert all(f["required"] and "img2dataset" in f["format"] for f in files)


def test_paper_model_has_upstreams_parameter_count():
    "The paper preset's model on the meta device: CLIP ViT-L/14 + Linear(1024, 4096) + LLaMA-2-7B's first 6 blocks = 1.78B."
    paper = nxtp.paper_nxtp()
    total = sum(p.numel() for p in paper.parameters())
    assert total == 1_783_838_720 and next(paper.parameters()).device.type == "meta"


# ---- the converter against independent forwards of upstream's two halves -------------------------------------------

def meta_llama_forward(sd: dict, ids: torch.Tensor, n_heads: int, eps: float, theta: float = 10000.0) -> torch.Tensor:
    "Logits of Meta's LLaMA written from its definition: adjacent channel pairs rotate together, RMSNorm, SwiGLU."
    import torch.nn.functional as F
    h = sd["tok_embeddings.weight"][ids].float()
    B, T, D = h.shape; hd = D // n_heads
    ang = torch.outer(torch.arange(T).float(), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    def rope(x):
        re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([re * cos - im * sin, re * sin + im * cos], -1).flatten(3)
    def norm(x, w): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(n_layers):
        w = lambda n: sd[f"layers.{i}.{n}.weight"].float()
        x = norm(h, w("attention_norm"))
        q, k_, v = ((x @ w(f"attention.{n}").T).view(B, T, n_heads, hd) for n in ("wq", "wk", "wv"))
        q, k_ = rope(q).transpose(1, 2), rope(k_).transpose(1, 2)
        att = (q @ k_.transpose(2, 3) / hd ** 0.5 + torch.full((T, T), float("-inf")).triu(1)).softmax(-1)
        h = h + (att @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, D) @ w("attention.wo").T
        x = norm(h, w("ffn_norm"))
        h = h + (F.silu(x @ w("feed_forward.w1").T) * (x @ w("feed_forward.w3").T)) @ w("feed_forward.w2").T
    return norm(h, sd["norm.weight"].float()) @ sd["output.weight"].float().T


def openai_vit_forward(sd: dict, pixels: torch.Tensor, n_heads: int, eps: float = 1e-5) -> torch.Tensor:
    "Patch tokens of OpenAI CLIP's ViT written from its definition (packed in_proj, QuickGELU), through ln_post."
    import torch.nn.functional as F
    w = lambda n: sd[n].float()
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], w(n + ".weight"), w(n + ".bias"), eps)
    x = F.conv2d(pixels, w("conv1.weight"), stride=sd["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([w("class_embedding").expand(len(x), 1, -1), x], 1) + w("positional_embedding")
    x = ln(x, "ln_pre")
    B, T, D = x.shape; hd = D // n_heads
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n_blocks):
        p = f"transformer.resblocks.{i}."
        y = ln(x, p + "ln_1") @ w(p + "attn.in_proj_weight").T + w(p + "attn.in_proj_bias")
        q, k_, v = (t.view(B, T, n_heads, hd).transpose(1, 2) for t in y.chunk(3, -1))
        o = ((q @ k_.transpose(2, 3)) / hd ** 0.5).softmax(-1) @ v
        x = x + o.transpose(1, 2).reshape(B, T, D) @ w(p + "attn.out_proj.weight").T + w(p + "attn.out_proj.bias")
        y = ln(x, p + "ln_2") @ w(p + "mlp.c_fc.weight").T + w(p + "mlp.c_fc.bias")
        x = x + (y * torch.sigmoid(1.702 * y)) @ w(p + "mlp.c_proj.weight").T + w(p + "mlp.c_proj.bias")
    return ln(x, "ln_post")


@pytest.fixture(scope="module")
def small_nxtp():
    model, tok, proc = nxtp.build_nxtp("tiny-clip", "tiny-llama", n_lm_blocks=2, n_vision_blocks=1)
    return model.eval()


def _rms_eps(cfg): return getattr(cfg, "rms_norm_eps", 1e-6)


def test_converter_matches_upstreams_own_forwards(small_nxtp, tmp_path):
    "An upstream-layout file (DDP names, Meta rotary order, packed in_proj) run by upstream's math equals our converted model."
    from vlmrepro.systems.nxtp.convert import convert_checkpoint, load_converted, nxtp_to_upstream
    m = small_nxtp
    heads, vheads = m.lm.config.num_attention_heads, nxtp.vit(m.vision).config.num_attention_heads
    up = nxtp_to_upstream(m, heads)
    assert all(k.startswith("module.") for k in up) and "module.language_decoder.layers.1.attention.wq.weight" in up
    lm_sd = {k[len("module.language_decoder."):]: v for k, v in up.items() if k.startswith("module.language_decoder.")}
    ids = torch.tensor([[m.ids["bos"]] + m.prompt_ids + [m.ids["comma"]]])
    with torch.no_grad():
        ours = m.lm(input_ids=ids).logits
    theirs = meta_llama_forward(lm_sd, ids, heads, _rms_eps(m.lm.config))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    vit_sd = {k[len("module.vision_encoder."):]: v for k, v in up.items() if k.startswith("module.vision_encoder.")}
    pv = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours_img = m.encode_images(pv)
        theirs_img = openai_vit_forward(vit_sd, pv, vheads)[:, 1:] @ vit_sd["proj.weight"].T
    assert torch.allclose(ours_img, theirs_img, atol=1e-4), (ours_img - theirs_img).abs().max()
    torch.save({"epoch": 3, "global_step": 7, "model": up, "optimizer": {}, "scheduler": {}}, tmp_path/"ckpt.pth")
    out = convert_checkpoint(tmp_path/"ckpt.pth", tmp_path/"conv", {"n_heads": heads})
    assert (out/"model.safetensors").exists() and json.loads((out/"nxtp.json").read_text())["n_lm_blocks"] == 2
    fresh, _, _ = nxtp.build_nxtp("tiny-clip", "tiny-llama", n_lm_blocks=2, n_vision_blocks=1, seed=5)
    with torch.no_grad():
        for p in fresh.parameters(): p.add_(0.1)                   # nothing of the fresh model may survive the load
    load_converted(fresh, out)
    fresh.eval()
    x = torch.tensor([[m.ids["image"], m.ids["bos"]] + m.prompt_ids])
    with torch.no_grad(): assert torch.allclose(fresh(pv, x.expand(2, -1)).logits, m(pv, x.expand(2, -1)).logits, atol=1e-5)


def test_converter_refuses_bad_files_by_key(small_nxtp, tmp_path):
    from vlmrepro.core import VlmreproError
    from vlmrepro.systems.nxtp.convert import convert_checkpoint, nxtp_to_upstream
    up = nxtp_to_upstream(small_nxtp, small_nxtp.lm.config.num_attention_heads, ddp=False)
    torch.save({"model": {**up, "language_decoder.layers.0.attention.wqkv.weight": torch.zeros(2)}}, tmp_path/"extra.pth")
    with pytest.raises(VlmreproError, match=r"unexpected key.*'language_decoder.layers.0.attention.wqkv.weight'"):
        convert_checkpoint(tmp_path/"extra.pth", tmp_path/"a")
    torch.save({"model": {k: v for k, v in up.items() if k != "language_decoder.norm.weight"}}, tmp_path/"missing.pth")
    with pytest.raises(VlmreproError, match=r"missing key.*'language_decoder.norm.weight'"):
        convert_checkpoint(tmp_path/"missing.pth", tmp_path/"b")
    (tmp_path/"pickle.pth").write_bytes(__import__("pickle").dumps({"model": up, "hook": print}))
    with pytest.raises(VlmreproError, match="weights_only=True"):
        convert_checkpoint(tmp_path/"pickle.pth", tmp_path/"c")


def test_meta_llama_download_layout(tmp_path):
    "Meta's params.json + consolidated.00.pth (with its rope.freqs) loads as an HF LLaMA cut to n blocks, same logits."
    from vlmrepro.core import VlmreproError
    from vlmrepro.systems.nxtp.convert import hf_to_meta_rotary, llama_from_meta
    from vlmrepro import backbones as bb
    lm, tok = bb.causal_lm("tiny-llama")
    lm.eval(); cfg = lm.config; H = cfg.num_attention_heads
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    meta = {"tok_embeddings.weight": lm.model.embed_tokens.weight, "norm.weight": lm.model.norm.weight,
            "output.weight": lm.lm_head.weight, "rope.freqs": torch.ones(cfg.hidden_size // H // 2)}
    for i, layer in enumerate(lm.model.layers):
        for hf, mt in names.items():
            w = layer.get_submodule(hf).weight
            meta[f"layers.{i}.{mt}.weight"] = hf_to_meta_rotary(w, H) if mt in ("attention.wq", "attention.wk") else w
    d = tmp_path/"llama-2-7b"; d.mkdir()
    torch.save({k: v.detach().clone() for k, v in meta.items()}, d/"consolidated.00.pth")
    (d/"params.json").write_text(json.dumps({"dim": cfg.hidden_size, "multiple_of": 8, "n_heads": H, "n_layers": cfg.num_hidden_layers,
                                             "norm_eps": _rms_eps(cfg), "vocab_size": -1}))
    got, _ = llama_from_meta(d, n_blocks=1, tokenizer=False)
    cut, _ = bb.causal_lm("tiny-llama", n_blocks=1)
    ids = torch.tensor([tok("the objects in the image are")["input_ids"]])
    with torch.no_grad(): assert torch.allclose(got(input_ids=ids).logits, cut.eval()(input_ids=ids).logits, atol=1e-5)
    torch.save({**{k: v.detach().clone() for k, v in meta.items()}, "layers.0.attention.bogus.weight": torch.zeros(1)}, d/"consolidated.00.pth")
    with pytest.raises(VlmreproError, match="layers.0.attention.bogus.weight"):
        llama_from_meta(d, tokenizer=False)


@pytest.mark.slow
def test_short_run_on_the_recognition_world_learns(tmp_path, one_thread):
    "A short tiny-preset training run on the NxTP world: the loss falls and the top-10 one-shot labels find far more objects than 10 random labels."
    from vlmrepro.data.shards import ShardDataset
    from vlmrepro.metrics.recognition import LabelEmbedder
    from vlmrepro.registry import create_system
    from vlmrepro.systems.nxtp import system as nxtp_system
    from vlmrepro.train import fit
    system = create_system("nxtp", {"n_train": 800, "n_val": 50, "max_eval": 50, "epochs": 12, "min_score": 0.0})
    d = nxtp_system.data(system.cfg)
    loader, n = nxtp_system.train_loader(system.model, system.processors, system.cfg, d.train_shards)
    assert n == 800                                                  # counted by the reader
    result = fit(system.model, loader, nxtp_system.train_config(system.cfg, n), tmp_path/"run", loss_fn=system.loss,
                 optimizer=system.optimizer())
    losses = [r["train/loss"] for r in result.history if "train/loss" in r]
    assert result.step == 12 * 25 and losses[-1] < 0.7 * losses[0]
    val = d.val["synth"]
    refs = nxtp.reference_labels(val)
    embed = LabelEmbedder()
    ours = system.evaluate(val, split="synth", embed=embed)
    vocab = nxtp.label_vocabulary(ShardDataset(d.train_shards, decode=False))
    chance = nxtp_system.score(nxtp.random_labels(refs, vocab), refs, 10, embed, "random_", split="synth")
    print({k: round(v, 3) for k, v in ours.items()}, chance)
    assert ours["synth/exact_recall"] > chance["synth/random_exact_recall"] + 0.15     # both list 10 labels
