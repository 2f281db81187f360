"NxTP R/P/F1: the offline NLTK pipeline and the metric on a small realistic case."
import pytest

from vlmrepro.core import VlmreproError
from vlmrepro.metrics.recognition import LabelEmbedder, evaluate_recognition, extract_labels, nlp_sources


@pytest.fixture(scope="module")
def embed(): return LabelEmbedder()


def test_nlp_sources_are_reported():
    src = nlp_sources()
    assert set(src) == {"punkt", "tagger", "wordnet"} and all(isinstance(v, str) and v for v in src.values())


def test_coco_style_labels():
    caps = ["A man sitting at a table with a laptop and a cup of coffee.", "A person working on his laptop in a cafe.",
            "Man using a laptop computer at a wooden table.", "A guy typing on a notebook near a mug.",
            "Someone works at a laptop; there's coffee too."]
    labels = extract_labels(caps)
    assert {"man", "table", "laptop", "cup", "coffee", "mug"} <= set(labels)
    assert "lap" not in labels and "person" not in labels        # word-boundary noise removal
    assert len(labels) == len(set(labels))                         # deduplicated after lemmatizing


def test_metric_orders_good_and_bad_predictions(embed):
    refs = {1: ["A dog catching a frisbee in a park."], 2: ["A plate with pizza and a glass of beer."]}
    good = {1: ["dog", "frisbee", "park", "grass"], 2: ["pizza", "plate", "beer", "table"]}
    bad = {1: ["airplane", "runway"], 2: ["giraffe", "tree"]}
    g = evaluate_recognition(good, refs, embed=embed, references_are_captions=True)
    b = evaluate_recognition(bad, refs, embed=embed, references_are_captions=True)
    assert g["f1"] > b["f1"] + 0.2 and g["recall"] > 0.9
    assert g["nlp_sources"] == nlp_sources() and g["k"] == 10


def test_top_k_cut(embed):
    refs = {1: ["dog"]}
    res1 = evaluate_recognition({1: ["dog"] + ["volcano"] * 20}, refs, k=1, embed=embed)
    res10 = evaluate_recognition({1: ["dog"] + ["volcano"] * 20}, refs, k=10, embed=embed)
    assert res1["precision"] > 0.99 and res10["precision"] < res1["precision"]


def test_bad_inputs(embed):
    with pytest.raises(VlmreproError, match="empty"): evaluate_recognition({}, {1: ["dog"]}, embed=embed)
    with pytest.raises(VlmreproError, match="caption must be a string"): extract_labels([None])
