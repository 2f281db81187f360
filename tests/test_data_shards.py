"""WebDataset shards: compatibility with the webdataset library and img2dataset output, splitting across ranks and
DataLoader workers, and damaged shards (truncated, corrupt header, corrupt image) skipped, counted and named."""
import json
from pathlib import Path

import pytest
import torch

from vlmrepro.core import VlmreproError, read_json
from vlmrepro.data.collate import CaptionCollator, toy_tokenizer
from vlmrepro.cli import dispatch
from vlmrepro.data.readers import track
from vlmrepro.data.records import Dropped, Sample
from vlmrepro.data.shards import ShardDataset, write_shards
from vlmrepro.data.synth import synth_samples

FIX = Path(__file__).parent/"fixtures"/"data"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(synth_samples(16, image_size=32), out, maxcount=4)
    return out


def test_our_shards_read_by_the_webdataset_library(shards):
    import webdataset as wds
    got = list(wds.WebDataset(str(shards/"{00000..00003}.tar"), shardshuffle=False))
    assert len(got) == 16 and got[0]["__key__"] == "000000"
    rec = json.loads(got[5]["json"])
    assert rec["key"] == got[5]["__key__"] == "000011"         # shard 1, sample 1 (1 digit for 4 per shard) and rec["status"] == "success"
    assert got[5]["txt"].decode() == rec["captions"][0]


def test_img2dataset_shard_uses_txt_caption_and_names_corrupt_image():
    out = list(ShardDataset(FIX/"wds"))
    good = [x for x in out if isinstance(x, Sample)]
    assert [s.captions for s in good] == [[f"caption {a} {b}"] for a, b in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]
    bad = [x for x in out if isinstance(x, Dropped)]
    assert [(b.reason, b.source) for b in bad] == [("corrupt image", "00001.tar:000010002")]


def test_truncated_fixture_shard():
    out = list(ShardDataset(FIX/"wds_truncated"))
    assert isinstance(out[-1], Dropped) and out[-1].reason == "truncated shard"
    assert "wds_truncated/00000.tar" in out[-1].source and "samples read before it" in out[-1].detail


def test_corrupt_header_is_named(tmp_path, shards):
    import tarfile
    with tarfile.open(shards/"00000.tar") as tf: at = tf.getmembers()[4].offset         # header of sample 1's .txt
    raw = bytearray((shards/"00000.tar").read_bytes()); raw[at + 2] ^= 0xFF             # flip a byte of its name
    (tmp_path/"00000.tar").write_bytes(bytes(raw))
    out = list(ShardDataset(tmp_path))
    assert [x.image_id for x in out[:-1]] == [0]
    assert out[-1].reason == "corrupt shard" and f"checksum at byte {at}" in out[-1].detail


def test_ranks_times_workers_read_every_sample_once(shards):
    seen = []
    for rank in range(2):
        ds = ShardDataset(shards, rank=rank, world_size=2, shuffle_buffer=3, seed=7)
        dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda xs: [x.image_id for x in xs])
        seen += [i for b in dl for i in b]
    assert sorted(seen) == list(range(16))


def test_track_counts_drops_across_workers_and_stops_past_the_bound():
    tok = toy_tokenizer(["caption", "0", "1", "2"])
    dl = torch.utils.data.DataLoader(ShardDataset(FIX/"wds"), batch_size=2, num_workers=2,
                                     collate_fn=CaptionCollator(tok, image_size=16))
    assert sum(b["n"] for b in track(dl, "wds", max_bad_fraction=0.2, verbose=False)) == 5
    with pytest.raises(VlmreproError, match="00001.tar:000010002"): list(track(dl, "wds", verbose=False))


def test_pack_cli_counts_reader_and_packer_drops(tmp_path):
    coco = FIX/"coco"
    assert dispatch(["pack", "--format", "coco", "--root", str(coco), "--split", "val", "--out", str(tmp_path/"p"),
                      "--maxcount", "1", "--max-bad-fraction", "0.5"]) == 0
    m = read_json(tmp_path/"p"/"manifest.json")
    assert m["count"] == 2 and len(m["shards"]) == 2                         # 42 and 99; 73 is a truncated JPEG
    assert m["drop_reasons"] == {"corrupt image": 1}
    assert m["reader"]["reasons"] == {"malformed row": 1, "missing image": 1}
    with pytest.raises(VlmreproError, match="more than 1%"):
        dispatch(["pack", "--format", "coco", "--root", str(coco), "--split", "val", "--out", str(tmp_path/"q")])
    assert not (tmp_path/"q").exists()                                       # the reader stops before any shard is written
