"The eval CLI on files, as a user runs it: official captions (COCO and VizWiz formats), VQA, and bad input."
import json, shutil, subprocess, sys

import pytest

from vlmrepro.core import VlmreproError, write_json
from vlmrepro.cli import dispatch, main

RUN = [sys.executable, "-m", "vlmrepro.cli", "eval"]


@pytest.fixture
def files(tmp_path):
    write_json(tmp_path/"coco.json", {"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "A dog runs on the grass."}, {"id": 2, "image_id": 1, "caption": "A brown dog running."},
        {"id": 3, "image_id": 2, "caption": "A cat sleeps on a sofa."}, {"id": 4, "image_id": 2, "caption": "A sleeping cat."}]})
    write_json(tmp_path/"vizwiz.json", {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}], "annotations": [
        {"image_id": 1, "caption": "A can of soup on a counter.", "is_rejected": False, "is_precanned": False},
        {"image_id": 1, "caption": "Quality issues are too severe to recognize visual content.", "is_rejected": False, "is_precanned": True},
        {"image_id": 2, "caption": "A bottle of water.", "is_rejected": False, "is_precanned": False}]})
    write_json(tmp_path/"pred.json", [{"image_id": 1, "caption": "a dog running on grass"}, {"image_id": 2, "caption": "a cat on a sofa"}])
    write_json(tmp_path/"vw_pred.json", [{"image_id": 1, "caption": "a can of soup on a counter"}])
    return tmp_path


@pytest.mark.skipif(shutil.which("java") is None, reason="the official path needs Java")
def test_official_captions_cli(files):
    run = subprocess.run([*RUN, "captions", "--pred", str(files/"pred.json"), "--gt", str(files/"coco.json"), "--spice"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout)                                 # stdout holds exactly one JSON object
    assert res["path"] == "official" and set(res) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}


def test_vizwiz_subset_cli(files, capsys):
    assert dispatch(["eval", "captions", "--pred", str(files/"vw_pred.json"), "--gt", str(files/"vizwiz.json"), "--fast", "--subset"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_images"] == 1 and res["Bleu_1"] > 0.99
    with pytest.raises(VlmreproError, match="--subset"):
        dispatch(["eval", "captions", "--pred", str(files/"vw_pred.json"), "--gt", str(files/"vizwiz.json"), "--fast"])


def test_bad_arguments_and_files(files):
    with pytest.raises(VlmreproError, match="vlmrepro eval"): dispatch(["eval", "captions", "--gt", str(files/"coco.json")])
    with pytest.raises(VlmreproError, match="vlmrepro eval"): dispatch(["eval", "bleu"])
    with pytest.raises(VlmreproError, match="not valid JSON"):
        (files/"broken.json").write_text("[{")
        dispatch(["eval", "captions", "--pred", str(files/"broken.json"), "--gt", str(files/"coco.json"), "--fast"])


@pytest.mark.parametrize("which", ["pred", "gt"])
def test_text_that_is_not_unicode_is_named(files, capsys, which):
    "A lone surrogate ('\\ud800' in the JSON) is valid JSON but not text: one line naming the file and the entry, exit 2."
    bad = files/f"{which}_bad.json"
    src = files/("pred.json" if which == "pred" else "coco.json")
    bad.write_text(src.read_text().replace("a cat on a sofa" if which == "pred" else "A sleeping cat.", "a cat \\ud800 sofa"))
    args = {"pred": str(files/"pred.json"), "gt": str(files/"coco.json"), which: str(bad)}
    for fast in (["--fast"], []):
        assert main(["eval", "captions", "--pred", args["pred"], "--gt", args["gt"], *fast]) == 2
        err = capsys.readouterr().err
        assert bad.name in err and "caption" in err and "\\ud800" in err and err.count("\n") == 1, err


def test_per_image_output_is_checked_before_scoring(files, monkeypatch):
    import vlmrepro.metrics.cli as mcli
    monkeypatch.setattr(mcli, "evaluate_captions", lambda *a, **k: pytest.fail("scored before checking --per-image"))
    (files/"blocker").write_text("a file where a directory should be")
    for target in (files, files/"blocker"/"per.json"):
        with pytest.raises(VlmreproError, match=f"{target}.*per-image"):
            dispatch(["eval", "captions", "--pred", str(files/"pred.json"), "--gt", str(files/"coco.json"), "--fast",
                      "--per-image", str(target)])
