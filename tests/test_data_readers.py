"""Every reader on committed fixtures in its real upstream layout, bad inputs included (tests/fixtures/data)."""
import pytest

from vlmrepro.core import VlmreproError
from vlmrepro.data.readers import (read_coco_captions, read_karpathy, read_vizwiz, read_vqav2, read_vqax, read_cc3m_tsv,
                                   read_prismer, load_expert, SampleDataset, track)
from vlmrepro.data.records import Dropped
from vlmrepro.data.collate import CaptionCollator, toy_tokenizer
from pathlib import Path
import torch

FIX = Path(__file__).parent/"fixtures"/"data"
COCO = FIX/"coco"


def test_coco_captions_reports_bad_rows_and_missing_images():
    with pytest.raises(VlmreproError) as e: read_coco_captions(COCO, "val", verbose=False)
    assert "COCO_val2014_000000000074.jpg" in str(e.value) and "max_bad_fraction" in str(e.value)
    r = read_coco_captions(COCO, "val", max_bad_fraction=0.5, verbose=False)
    assert [s.image_id for s in r] == [42, 73, 99]
    assert r[0].captions == ["A red square.", "a red tile"]
    assert dict(r.log.reasons) == {"malformed row": 1, "missing image": 1}
    assert "annotations[5]" in r.log.examples["malformed row"][0]


def test_coco_truncated_jpeg_found_up_front_with_verify():
    r = read_coco_captions(COCO, "val", max_bad_fraction=0.7, verify=True, verbose=False)
    assert [s.image_id for s in r] == [42, 99]
    assert r.log.reasons["corrupt image"] == 1 and "000000000073.jpg" in r.log.examples["corrupt image"][0]


def test_truncated_jpeg_found_lazily_is_skipped_and_counted_by_track():
    r = read_coco_captions(COCO, "val", max_bad_fraction=0.5, verbose=False)
    ds = SampleDataset(r)
    assert isinstance(ds[1], Dropped) and ds[1].reason == "corrupt image"
    dl = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=CaptionCollator(toy_tokenizer(["tile"]), image_size=16))
    assert sum(b["n"] for b in track(dl, "val", max_bad_fraction=0.5, verbose=False)) == 2
    with pytest.raises(VlmreproError, match="000000000073.jpg"): list(track(dl, "val", verbose=False))


def test_karpathy_split_restval_and_bad_rows():
    test = read_karpathy(COCO, "test", max_bad_fraction=0.9, verbose=False)
    assert [s.image_id for s in test] == [42] and test[0].captions == ["A red square."]
    assert dict(test.log.reasons) == {"missing image": 1, "malformed row": 1}
    assert [s.image_id for s in read_karpathy(COCO, "train", verbose=False)] == [99]        # restval joins train


def test_vizwiz_filters_rejected_and_precanned_and_keeps_text_detected():
    r = read_vizwiz(FIX/"vizwiz", "val", verbose=False)
    assert len(r) == 1 and r[0].captions == ["A grey box with a label that says soup."]
    assert r[0].meta["text_detected"] is True
    assert r.filtered == {"precanned caption": 2, "rejected caption": 1, "image with no usable caption": 1}
    assert r.log.dropped == 0                                  # filtering by design is not bad input
    t = read_vizwiz(FIX/"vizwiz", "test", verbose=False)
    assert [(s.image_id, s.captions) for s in t] == [(31181, [])]


def test_vqav2_answers_types_and_bad_rows():
    r = read_vqav2(COCO, "val", max_bad_fraction=0.9, verbose=False)
    assert [s.question_id for s in r] == [42000, 99000]
    s = r[0]
    assert len(s.answers) == 10 and s.answer == "red" and s.answer_type == "other" and s.question_type == "what color is the"
    assert s.image_path.endswith("val2014/COCO_val2014_000000000042.jpg")
    assert dict(r.log.reasons) == {"missing image": 1, "malformed row": 1}


def test_vqax_explanations_and_malformed_item():
    r = read_vqax(COCO, "val", image_dir=COCO/"val2014", max_bad_fraction=0.5, verbose=False)
    assert [s.question_id for s in r] == ["42000", "99001"]
    assert r[0].explanations == ["the square is red", "its colour is red", "the tile is painted red"]
    assert r.log.examples["malformed row"] == ["vqaX_val.json [99000]"]


def test_cc3m_tsv_malformed_row_and_missing_image_with_line_numbers():
    r = read_cc3m_tsv(FIX/"cc3m", "val", max_bad_fraction=0.5, verbose=False)
    assert [s.captions[0] for s in r] == ["actor attends the premiere", "a snowy field"]
    assert r.log.examples["malformed row"] == ["cc3m_val.tsv:4"]
    assert "0000404.jpg" in r.log.examples["missing image"][0]


def test_prismer_lists_and_expert_labels():
    kw = dict(image_root=COCO, label_root=COCO/"labels", dataset="coco", verbose=False)
    r = read_prismer(COCO, "val", "caption", experts=["depth", "normal"], list_file=FIX/"prismer/caption_val.json",
                     max_bad_fraction=0.6, **kw)
    assert [s.image_id for s in r] == [42, 99]
    assert r[0].experts["depth"].name == "COCO_val2014_000000000042.png" and r[0].experts["normal"] is None
    assert r.filtered["missing normal label (zeros used)"] == 2
    assert load_expert(r[0].experts["depth"], "depth", 8).tolist() == [[128] * 8] * 8
    assert load_expert(r[0].experts["normal"], "normal", 8).shape == (8, 8, 3)
    v = read_prismer(COCO, "train", "vqa", list_file=FIX/"prismer/vqa_train.json", **kw)
    assert [(s.answers, s.meta["weight"]) for s in v] == [(["red"], 0.8), (["dark red"], 0.1)]


def test_errors_name_the_input():
    with pytest.raises(VlmreproError, match="data root .* not found"): read_coco_captions(FIX/"nope", "val")
    with pytest.raises(VlmreproError, match="no annotation file"): read_vizwiz(FIX/"vizwiz", "train")
    with pytest.raises(VlmreproError, match="no image directory"): read_coco_captions(FIX/"cc3m", "val", ann_file=COCO/"annotations/captions_val2014.json")


# ---- text that is not valid Unicode: a bad row, dropped and named, never a crash further down ----

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmrepro.data.synth import write_world
    return write_world(tmp_path_factory.mktemp("uni")/"world", n_train=4, n_val=2, n_test=0, image_size=32)


def _spoil(path, field):
    "Put a lone surrogate (JSON's '\\ud800' escape: valid JSON, not valid text) in the first `field` value of a JSON file."
    text = path.read_text(); key = f'"{field}": "'
    assert key in text, (path, field)
    path.write_text(text.replace(key, key + "\\ud800 ", 1))


@pytest.mark.parametrize("fmt, file, field", [
    ("coco", "annotations/captions_train.json", "caption"), ("vizwiz", "annotations/train.json", "caption"),
    ("karpathy", "annotations/dataset_coco.json", "raw"), ("vqav2", "annotations/v2_OpenEnded_mscoco_train_questions.json", "question"),
    ("vqav2", "annotations/v2_mscoco_train_annotations.json", "answer"), ("vqax", "annotations/vqaX_train.json", "explanation"),
    ("prismer", "prismer/caption_train.json", "caption")])
def test_lone_surrogates_are_malformed_rows(world, tmp_path, fmt, file, field):
    import shutil
    from vlmrepro.data.readers import read
    root = tmp_path/"w"; shutil.copytree(world, root)
    if field == "explanation":                                 # a list of strings in VQA-X
        p = root/file; p.write_text(p.read_text().replace('"explanation": ["', '"explanation": ["\\ud800 ', 1))
    else: _spoil(root/file, field)
    r = read(fmt, root, "train", max_bad_fraction=0.9, verbose=False)
    assert r.log.reasons["malformed row"] == 1, dict(r.log.reasons)
    for s in r:
        for t in [*s.captions, *s.answers, *s.explanations, s.question or ""]: t.encode("utf-8")   # what a tokenizer needs


def test_cc3m_tsv_with_a_byte_that_is_not_utf8(world, tmp_path):
    import shutil
    root = tmp_path/"w"; shutil.copytree(world, root)
    lines = (root/"cc3m_train.tsv").read_bytes().split(b"\n")
    lines[2] = b"\xff" + lines[2]
    (root/"cc3m_train.tsv").write_bytes(b"\n".join(lines))
    r = read_cc3m_tsv(root, "train", max_bad_fraction=0.9, verbose=False)
    assert len(r) == 3 and r.log.examples["malformed row"] == ["cc3m_train.tsv:3"]
