"VQA accuracy: the official consensus and normalisation on realistic answers, breakdowns, and bad inputs."
import json
import pytest

from vlmrepro.core import VlmreproError
from vlmrepro.metrics.vqa import evaluate_vqa, normalize_answer, vqa_accuracy


def ann(qid, answers, atype="other", qtype="what is", mc=None):
    return {"question_id": qid, "image_id": 1, "answer_type": atype, "question_type": qtype,
            "multiple_choice_answer": mc or answers[0], "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}


ANNS = {"annotations": [
    ann(1, ["2"] * 6 + ["two", "3", "2", "1"], "number", "how many"),
    ann(2, ["yes"] * 10, "yes/no", "is the"),
    ann(3, ["fire hydrant", "hydrant", "fire hydrant", "fire hydrant", "red hydrant", "fire hydrant", "hydrant",
            "fire hydrant", "fire-hydrant", "fire hydrant"], "other", "what is"),
    ann(4, ["t-shirt", "t shirt", "shirt", "tshirt", "t-shirt", "shirt", "t-shirt", "t shirt", "shirt", "t shirt"], "other", "what is the"),
]}
QS = {"questions": [{"question_id": a["question_id"], "image_id": 1, "question": "?"} for a in ANNS["annotations"]]}


def test_official_consensus_on_realistic_answers():
    # q1: 'Two' -> '2'; 7 of 10 humans say '2' -> 1.0
    assert vqa_accuracy("Two", [a["answer"] for a in ANNS["annotations"][0]["answers"]]) == 1.0
    # q4: the answers differ, so ground truth gets the punctuation step: 't-shirt' -> 't shirt' (no space around '-')
    assert vqa_accuracy("t-shirt", [a["answer"] for a in ANNS["annotations"][3]["answers"]]) == 1.0
    # q3: 'A fire-hydrant.' -> 'fire hydrant'; 6 humans said 'fire hydrant', and 'fire-hydrant' becomes 'fire hydrant' too
    assert vqa_accuracy("A fire-hydrant.", [a["answer"] for a in ANNS["annotations"][2]["answers"]]) == 1.0
    assert abs(vqa_accuracy("hydrant", [a["answer"] for a in ANNS["annotations"][2]["answers"]]) - 0.6) < 1e-12


def test_breakdowns_and_substring():
    preds = [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "no"}, {"question_id": 3, "answer": "hydrant"},
             {"question_id": 4, "answer": "shirt"}]
    res = evaluate_vqa(preds, ANNS, QS)
    assert res["n_questions"] == 4
    assert res["per_answer_type"]["yes/no"] == 0.0 and res["per_answer_type"]["number"] == 100.0
    assert abs(res["per_answer_type"]["other"] - 100 * (0.6 + 0.9) / 2) < 1e-9
    assert abs(res["accuracy"] - 100 * (1 + 0 + 0.6 + 0.9) / 4) < 1e-9
    assert set(res["per_question_type"]) == {"how many", "is the", "what is", "what is the"}
    assert res["substring_accuracy"] == 100 * 3 / 4          # 'hydrant' in 'fire hydrant', 'shirt' in 't-shirt'
    json.dumps(res)


@pytest.mark.parametrize("preds,msg", [
    ([], "empty"),
    ({}, "empty"),
    ([{"question_id": 1, "answer": "2"}], "have no prediction"),
    ([{"question_id": q, "answer": "x"} for q in (1, 2, 3, 4, 99)], "not annotated"),
    ([{"question_id": 1, "answer": None}], "must be a string"),
    ([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}], "more than once"),
    ([{"question": 1, "answer": "a"}], "needs 'question_id' and 'answer'"),
])
def test_bad_predictions(preds, msg):
    with pytest.raises(VlmreproError, match=msg): evaluate_vqa(preds, ANNS, QS)


def test_unicode_answers_and_string_ids():
    anns = {"annotations": [ann(10, ["café"] * 10), ann(11, ["naïve", "naive"] * 5)]}
    res = evaluate_vqa({"10": "Café", "11": "naïve"}, anns)
    assert res["accuracy"] == 100.0                            # lower-cased prediction; unicode compared as is
    assert normalize_answer("Ünïcödé!") == "ünïcödé"


def test_bad_annotation_files(tmp_path):
    with pytest.raises(VlmreproError, match="VQA v2 format"): evaluate_vqa({1: "a"}, {"anns": []})
    with pytest.raises(VlmreproError, match="non-empty 'answers'"): evaluate_vqa({1: "a"}, {"annotations": [{"question_id": 1, "answers": []}]})
    with pytest.raises(VlmreproError, match="file not found"): evaluate_vqa({1: "a"}, tmp_path/"missing.json")
