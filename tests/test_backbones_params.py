"""Paper-preset architectures built from their written-out configs on the meta device (nothing downloaded, nothing
allocated), with parameter counts checked against the upstream figures."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from vlmrepro.core import VlmreproError
from vlmrepro.backbones import PAPER_BACKBONES, count_parameters, human_count, paper_model

# HF's parameter counts of the released checkpoints (model cards / num_parameters()).
UPSTREAM = {
    "Salesforce/blip-image-captioning-base": 247_414_076,
    "Salesforce/blip-image-captioning-large": 469_732_924,
    "openai/clip-vit-large-patch14": 427_616_513,
    "openai/clip-vit-base-patch16": 149_620_737,
    "openai/clip-vit-base-patch32": 151_277_313,
    "facebook/opt-125m": 125_239_296,
    "gpt2": 124_439_808,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "roberta-base": 124_645_632,
    "roberta-large": 355_359_744,
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_paper_backbone_counts(name):
    assert count_parameters(paper_model(name))[1] == UPSTREAM[name]


def test_every_paper_backbone_builds_on_meta():
    for name in PAPER_BACKBONES:
        model = paper_model(name)
        assert all(p.is_meta for p in model.parameters()), name


def test_billion_scale_rounded_counts():
    # the papers' own rounded figures: OPT-6.7B (FROMAGe's LM), GPT-J-6B (MAGMA/ILLUME's LM, model card 6,053,381,344)
    assert human_count(count_parameters(paper_model("facebook/opt-6.7b"))[1]) == "6.66B"
    gptj = count_parameters(paper_model("EleutherAI/gpt-j-6b"))[1]
    assert abs(gptj - 6_053_381_344) / 6_053_381_344 < 1e-3


def test_blip_large_lora_matches_vizwiz_reproduction():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(paper_model("Salesforce/blip-image-captioning-large"),
                           LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none", target_modules=["query", "value"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (614_400, 470_347_324)
    assert all("text_decoder" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("n_blocks,expected", [(6, 1.78), (1, 0.77)])
def test_nxtp_total(n_blocks, expected):
    vit = paper_model("openai/clip-vit-large-patch14").vision_model
    llama = paper_model("meta-llama/Llama-2-7b-hf", n_blocks=n_blocks)
    with torch.device("meta"): proj = nn.Linear(1024, 4096, bias=False)
    total = sum(count_parameters(m)[1] for m in (vit, proj, llama))
    assert round(total / 1e9, 2) == expected      # NxTP README: 1.78B (6 blocks), 0.77B (1 block)
    assert llama.config.num_hidden_layers == n_blocks and len(llama.model.layers) == n_blocks


def test_prismer_backbone_widths_match():
    # Prismer's RoBERTa cross-attends to ViT tokens of the same width
    assert paper_model("openai/clip-vit-base-patch16").config.vision_config.hidden_size == paper_model("roberta-base").config.hidden_size
    assert paper_model("openai/clip-vit-large-patch14-336").config.vision_config.hidden_size == paper_model("roberta-large").config.hidden_size


def test_unknown_paper_backbone():
    with pytest.raises(VlmreproError, match="no written-out config"):
        paper_model("facebook/opt-66b")
