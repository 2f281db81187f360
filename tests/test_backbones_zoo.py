"""The tiny zoo is pretrained: every default entry is built once (cached under $VLMREPRO_ZOO or ~/.cache/vlmrepro/zoo)
and its metrics are far from chance; zoo names load through the same factories as hub names."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from vlmrepro.core import VlmreproError
from vlmrepro import backbones as bb
from vlmrepro import zoo, zoo_recipes


@pytest.fixture(scope="module")
def built():
    return {name: zoo.ensure(name) for name, r in zoo.recipes().items() if r.default}


def metrics(name):
    return zoo.entry_info(name)["metrics"]


def test_tiny_clip_retrieval_far_above_chance(built):
    m = metrics("tiny-clip")
    assert m["i2t_r1"] >= 10 * m["chance_r1"] and m["t2i_r1"] >= 10 * m["chance_r1"], m


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_tiny_lm_perplexity_far_below_uniform(built, name):
    m = metrics(name)
    assert m["val_ppl"] < m["uniform_ppl"] / 20, m


def test_tiny_roberta_predicts_masked_tokens(built):
    m = metrics("tiny-roberta")
    assert m["val_masked_acc"] > m["majority_acc"] + 0.2, m


def test_tiny_grid_retrieval_far_above_chance(built):
    m = metrics("tiny-grid")
    assert m["i2t_r1"] >= 10 * m["chance_r1"] and m["t2i_r1"] >= 10 * m["chance_r1"], m


def test_tiny_blip_captions_beat_a_constant_caption(built):
    m = metrics("tiny-blip")
    assert m["val_cider"] > m["constant_cider"] + 20, m


def test_manifest_matches_files(built):
    for name in built:
        assert zoo.verify(name) == built[name]
        info = zoo.entry_info(name)
        assert info["seed"] == zoo.recipes()[name].params["seed"] and "model.safetensors" in info["files"]


def test_zoo_names_load_through_factories(built):
    vt, ip = bb.vision_tower("tiny-clip")
    tt, tok = bb.text_tower("tiny-clip")
    px = ip(images=[zoo_recipes.world(0, 2, 1, 64)["train"][0].image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert vt(pixel_values=px).last_hidden_state.shape[-1] == tt(**tok(["a red circle"], return_tensors="pt")).last_hidden_state.shape[-1]
    lm, ltok = bb.causal_lm("tiny-llama", n_blocks=1)
    assert len(lm.model.layers) == 1
    dec, rtok = bb.roberta_decoder("tiny-roberta")
    assert dec.config.is_decoder and dec.config.add_cross_attention
    grid, gp = bb.grid_encoder("tiny-grid")
    with torch.no_grad():
        assert grid(pixel_values=gp(images=[zoo_recipes.world(0, 2, 1, 64)["train"][0].image], return_tensors="pt")["pixel_values"]
                    ).last_hidden_state.shape == (1, 256, 4, 4)
    blip, bproc = bb.blip_captioner("tiny-blip")
    assert blip.config.text_config.bos_token_id == bproc.tokenizer.bos_token_id


def test_tiny_lm_generates_world_text(built):
    lm, tok = bb.causal_lm("tiny-llama")
    out = lm.generate(**tok(["Q: what color is the"], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert any(w in text for w in ("circle", "square", "triangle", "star", "diamond")), text


def test_cli(built, capsys):
    from vlmrepro.cli import dispatch, main
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-clip" in out and "built" in out
    with pytest.raises(VlmreproError, match="unknown zoo entry"):
        dispatch(["zoo", "build", "tiny-nope"])
    with pytest.raises(VlmreproError, match="unknown zoo entry"):
        zoo.ensure("tiny-nope")
