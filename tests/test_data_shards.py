"""WebDataset shards: compatibility with the webdataset library and img2dataset output, splitting across ranks and
DataLoader workers, and damaged shards (truncated, corrupt header, corrupt image) skipped, counted and named."""
import json
from pathlib import Path

import pytest
import torch

from vlmrepro.core import VlmreproError, read_json, write_json
from vlmrepro.data.collate import CaptionCollator, toy_tokenizer
from vlmrepro.cli import dispatch, main
from vlmrepro.data.readers import track
from vlmrepro.data.records import Dropped, DropLog, Sample
from vlmrepro.data.shards import ShardDataset, write_shards
from vlmrepro.data.synth import synth_samples, write_world

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


# ---- a used output directory, and shards the manifest does not list ----

def _tar_keys(root):
    return sorted(s.image_id for s in ShardDataset(root) if isinstance(s, Sample))


def test_synth_into_a_used_directory_refuses_unless_overwrite(tmp_path, capsys):
    out = tmp_path/"w"
    small = ["--n-val", "1", "--n-test", "1", "--image-size", "32", "--shard-size", "1"]
    assert main(["synth", "--out", str(out), "--n-train", "6", *small]) == 0
    assert main(["synth", "--out", str(out), "--n-train", "2", *small]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and err.count("\n") == 1, err
    assert len(list((out/"shards"/"train").glob("*.tar"))) == 6                     # nothing was touched
    assert main(["synth", "--out", str(out), "--n-train", "2", *small, "--overwrite"]) == 0
    assert sorted(p.name for p in (out/"shards"/"train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert len(_tar_keys(out/"shards"/"train")) == 2 and read_json(out/"world.json")["counts"]["train"] == 2


def test_pack_into_a_used_directory_refuses_unless_overwrite(tmp_path, capsys):
    world = write_world(tmp_path/"world", n_train=6, n_val=2, n_test=0, image_size=32, shard_size=2)
    out = tmp_path/"packed"
    args = ["--format", "coco", "--root", str(world), "--out", str(out), "--maxcount", "1"]
    assert main(["pack", *args, "--split", "train"]) == 0
    assert main(["pack", *args, "--split", "val"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["pack", *args, "--split", "val", "--overwrite"]) == 0
    assert len(list(out.glob("*.tar"))) == 2 and {s.split for s in ShardDataset(out)} == {"val"}   # no train image left


def test_overwrite_clears_only_what_the_tools_wrote(tmp_path):
    world = write_world(tmp_path/"world", n_train=2, n_val=1, n_test=0, image_size=32)
    notes = tmp_path/"notes"; notes.mkdir(); (notes/"thesis.tex").write_text("years of work")
    with pytest.raises(VlmreproError, match="thesis.tex"):
        dispatch(["pack", "--format", "coco", "--root", str(world), "--split", "train", "--out", str(notes), "--overwrite"])
    with pytest.raises(VlmreproError, match="thesis.tex"):
        write_world(notes, n_train=1, n_val=0, n_test=0, image_size=32, overwrite=True)
    assert (notes/"thesis.tex").read_text() == "years of work"
    with pytest.raises(VlmreproError, match="is inside the output directory"):      # re-sharding onto its own input
        dispatch(["pack", "--format", "webdataset", "--root", str(world/"shards"/"train"), "--split", "train",
                  "--out", str(world/"shards"/"train"), "--overwrite"])
    assert len(list((world/"shards"/"train").glob("*.tar"))) == 1


def test_reader_reads_the_manifest_and_names_stray_shards(tmp_path):
    write_shards(synth_samples(4, "val", image_size=32), tmp_path/"val", maxcount=2)
    write_shards(synth_samples(6, "train", image_size=32), tmp_path/"train", maxcount=2)
    (tmp_path/"val"/"00007.tar").write_bytes((tmp_path/"train"/"00002.tar").read_bytes())   # a leftover of an earlier write
    with pytest.warns(UserWarning, match=r"00007\.tar.*not listed in its manifest"):
        ds = ShardDataset(tmp_path/"val")
    assert [p.name for p in ds.shards] == ["00000.tar", "00001.tar"]
    assert {s.split for s in ds} == {"val"} and ds.total_samples() == 4
    (tmp_path/"val"/"00001.tar").unlink()
    with pytest.raises(VlmreproError, match=r"00001\.tar.*listed in .*manifest\.json"):
        ShardDataset(tmp_path/"val")


# ---- shards written by other tools ----

def _plain_tar_shards(root, n_shards=2, per_shard=3, stats=None):
    "Shards as a plain `tarfile` script writes them: jpg + txt per key, nothing else."
    import io, tarfile
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root/f"part-{s}.tar", "w") as tf:
            for i in range(per_shard):
                buf = io.BytesIO(); Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(buf, "JPEG")
                for name, data in ((f"sample{s}_{i}.jpg", buf.getvalue()), (f"sample{s}_{i}.txt", f"a photo {s} {i}".encode())):
                    ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
        if stats: write_json(root/f"part-{s}_stats.json", stats)
    return root


def test_shards_without_stats_are_counted_from_their_headers(tmp_path):
    root = _plain_tar_shards(tmp_path/"plain")
    ds = ShardDataset(root)
    assert ds.total_samples() == 6 == len([s for s in ds if isinstance(s, Sample)])
    assert [s.captions for s in ds][:2] == [["a photo 0 0"], ["a photo 0 1"]]


def test_img2dataset_stats_count_successes_not_attempts(tmp_path):
    root = _plain_tar_shards(tmp_path/"i2d", stats={"count": 10, "successes": 3, "failed_to_download": 7})
    assert ShardDataset(root).total_samples() == 6


def test_nxtp_sizes_its_schedule_from_plain_shards(tmp_path):
    from vlmrepro.systems.nxtp.system import Config, train_config
    root = _plain_tar_shards(tmp_path/"plain")
    n = ShardDataset(root).total_samples()
    assert n == 6 and train_config(Config(), n).max_steps >= 1


def test_pack_drops_a_caption_that_is_not_unicode_and_leaves_nothing_half_written(tmp_path):
    world = write_world(tmp_path/"world", n_train=4, n_val=0, n_test=0, image_size=32)
    ann = world/"annotations"/"captions_train.json"
    ann.write_text(ann.read_text().replace('"caption": "', '"caption": "\\ud800 ', 1))       # valid JSON, not valid text
    args = ["pack", "--format", "coco", "--root", str(world), "--split", "train"]
    with pytest.raises(VlmreproError, match="malformed row: captions_train.json annotations"):
        dispatch([*args, "--out", str(tmp_path/"strict")])
    assert not (tmp_path/"strict").exists() or not list((tmp_path/"strict").iterdir())
    assert dispatch([*args, "--out", str(tmp_path/"p"), "--max-bad-fraction", "0.5"]) == 0
    m = read_json(tmp_path/"p"/"manifest.json")
    assert m["count"] == 4 and m["reader"]["reasons"] == {"malformed row": 1}     # the image keeps its other 4 captions


def test_write_shards_drops_text_that_is_not_unicode_and_cleans_up_when_it_stops(tmp_path):
    samples = synth_samples(4, image_size=32)
    samples[1].captions = ["a red \ud800 square"]                   # a Sample from any source, not only a reader
    m = write_shards(samples, tmp_path/"lenient", maxcount=2, log=DropLog("lenient", max_bad_fraction=0.5))
    assert m["count"] == 3 and m["drop_reasons"] == {"malformed row": 1} and "\\ud800" in str(m["drop_examples"])
    with pytest.raises(VlmreproError, match="not valid Unicode"):
        write_shards(samples, tmp_path/"strict", maxcount=1)
    assert list((tmp_path/"strict").iterdir()) == []                  # no .tar.tmp, no finished shard without a manifest


ORDER = """import json, sys, torch
from vlmrepro.data.shards import ShardDataset
ds = ShardDataset(sys.argv[1], shuffle_buffer=3, seed=7); ds.set_epoch(1)
dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda xs: [x.image_id for x in xs])
print(json.dumps([b for b in dl]))"""


@pytest.mark.slow
def test_same_seed_same_order_run_to_run_and_a_resume_skips_exactly(shards):
    "The order depends on (seed, epoch, rank, worker) only, not on the process's hash seed: a resumed run can skip batches."
    import os, subprocess, sys
    from accelerate import skip_first_batches
    runs = [subprocess.run([sys.executable, "-c", ORDER, str(shards)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    orders = [json.loads(r.stdout) for r in runs]
    assert orders[0] == orders[1] and sorted(i for b in orders[0] for i in b) == list(range(16)), [r.stderr[-500:] for r in runs]
    ds = ShardDataset(shards, shuffle_buffer=3, seed=7); ds.set_epoch(1)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda xs: [x.image_id for x in xs])
    assert [b for b in dl] == orders[0]
    assert [b for b in skip_first_batches(dl, 3)] == orders[0][3:]
