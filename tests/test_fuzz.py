"""Bad input, fuzzed: every reader and the CLI's parameters get malformed JSON, wrong types, huge values, path traversal,
files that are not images and zero-size files. The contract: a result (bad items dropped and counted) or a
`VlmreproError` that names the input, never another exception, a hang or a path outside the data root.

hypothesis runs derandomized (the same examples on every machine), with few examples per property and no deadline,
so the file stays fast and deterministic in CI.
"""
import io, json, os, struct, tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from vlmrepro.core import VlmreproError, read_json

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=12) | st.sampled_from(["", "a.jpg", "../a.jpg", "/etc/passwd", "train/../../x.jpg", "\x00"]))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
UNSAFE = ["../a.jpg", "../../etc/passwd", "/etc/passwd", "train/../../a.jpg", "..", ""]


def either(valid):
    "The valid value most of the time, else any JSON value (wrong type, huge, nested, empty)."
    return st.one_of(st.just(valid), st.just(valid), JSON)


def _jpeg(size=8) -> bytes:
    buf = io.BytesIO(); Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="JPEG"); return buf.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    "A data root with one good image (train/a.jpg, and its VQAv2 name), one zero-size and one non-image 'jpg'."
    r = tmp_path_factory.mktemp("fuzzroot")
    (r/"train").mkdir(); (r/"annotations").mkdir(); (r/"prismer").mkdir()
    (r/"train"/"a.jpg").write_bytes(_jpeg())
    (r/"train"/"COCO_train_000000000001.jpg").write_bytes(_jpeg())
    (r/"train"/"empty.jpg").write_bytes(b"")
    (r/"train"/"text.jpg").write_text("not an image")
    (r/"outside.jpg").write_bytes(_jpeg())           # a real file one level up from train/: traversal must not reach it
    return r


def _check_read(fmt, root, **kw):
    "Run a reader; it must return Samples whose images all lie under `root`, or raise VlmreproError."
    from vlmrepro.data.readers import read
    try: out = read(fmt, root, "train", verbose=False, **kw)
    except VlmreproError as e:
        assert str(e).strip(); return None
    for s in out:
        p = Path(os.path.normpath(s.image_path if os.path.isabs(s.image_path) else root/s.image_path))
        assert p.is_relative_to(root), f"{fmt}: sample image {s.image_path} escapes {root}"
    assert out.log.seen >= len(out)
    return out


COCO_DOC = st.fixed_dictionaries({
    "images": either([{"id": 1, "file_name": "a.jpg"}]) | st.lists(st.fixed_dictionaries(
        {"id": either(1), "file_name": either("a.jpg") | st.sampled_from(UNSAFE + ["empty.jpg", "text.jpg"])}), max_size=3),
    "annotations": either([{"image_id": 1, "caption": "a red tile"}]) | st.lists(st.fixed_dictionaries(
        {"image_id": either(1), "caption": either("a red tile")}), max_size=3)})


@FUZZ
@given(doc=COCO_DOC | JSON, bound=st.sampled_from([0.01, 1.0]), verify=st.booleans())
def test_coco_and_vizwiz_readers(root, doc, bound, verify):
    (root/"annotations"/"captions_train.json").write_text(json.dumps(doc))
    (root/"annotations"/"train.json").write_text(json.dumps(doc))
    for fmt in ("coco", "vizwiz"): _check_read(fmt, root, max_bad_fraction=bound, verify=verify)


@FUZZ
@given(doc=st.fixed_dictionaries({"images": st.lists(st.fixed_dictionaries(
    {"split": either("train"), "filepath": either("train") | st.sampled_from(UNSAFE), "filename": either("a.jpg") | st.sampled_from(UNSAFE),
     "cocoid": either(1), "sentences": either([{"raw": "a tile"}])}), max_size=3)}) | JSON, bound=st.sampled_from([0.01, 1.0]))
def test_karpathy_reader(root, doc, bound):
    (root/"annotations"/"dataset_coco.json").write_text(json.dumps(doc))
    _check_read("karpathy", root, max_bad_fraction=bound)


@FUZZ
@given(q=st.fixed_dictionaries({"questions": st.lists(st.fixed_dictionaries(
           {"image_id": either(1), "question": either("what?"), "question_id": either(10)}), max_size=3)}) | JSON,
       a=st.fixed_dictionaries({"annotations": st.lists(st.fixed_dictionaries(
           {"question_id": either(10), "answers": either([{"answer": "red"}] * 10), "multiple_choice_answer": either("red"),
            "answer_type": either("other")}), max_size=3)}) | JSON, bound=st.sampled_from([0.01, 1.0]))
def test_vqav2_reader(root, q, a, bound):
    (root/"annotations"/"v2_OpenEnded_mscoco_train_questions.json").write_text(json.dumps(q))
    (root/"annotations"/"v2_mscoco_train_annotations.json").write_text(json.dumps(a))
    _check_read("vqav2", root, max_bad_fraction=bound)


@FUZZ
@given(doc=st.dictionaries(st.text(max_size=4), st.fixed_dictionaries(
    {"question": either("why?"), "answers": either([{"answer": "red"}]), "explanation": either(["it is red"]),
     "image_name": either("a.jpg") | st.sampled_from(UNSAFE)}), max_size=3) | JSON, bound=st.sampled_from([0.01, 1.0]))
def test_vqax_reader(root, doc, bound):
    (root/"annotations"/"vqaX_train.json").write_text(json.dumps(doc))
    _check_read("vqax", root, max_bad_fraction=bound)


@FUZZ
@given(rows=st.lists(st.tuples(st.text(max_size=8), st.sampled_from(["train/a.jpg", "train/empty.jpg"] + UNSAFE) | st.text(max_size=8)),
                     max_size=4),
       header=st.sampled_from(["caption\timage", "image\tcaption", "caption", ""]), extra_tabs=st.booleans())
def test_cc3m_tsv_reader(root, rows, header, extra_tabs):
    lines = [header] + [f"{c}\t{i}" + ("\tx" if extra_tabs else "") for c, i in rows]
    (root/"cc3m_train.tsv").write_text("\n".join(lines) + "\n")
    _check_read("cc3m", root, max_bad_fraction=1.0)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"image": either("train/a.jpg") | st.sampled_from(UNSAFE), "caption": either("a tile")}),
                     max_size=4) | JSON, experts=st.sampled_from([(), ("depth",), ("normal", "ocr_detection")]))
def test_prismer_reader(root, rows, experts):
    (root/"prismer"/"caption_train.json").write_text(json.dumps(rows))
    _check_read("prismer", root, max_bad_fraction=1.0, experts=experts)


@pytest.mark.parametrize("bad", UNSAFE[:4])
def test_traversal_in_data_lists_is_dropped_and_named(root, bad):
    (root/"prismer"/"caption_train.json").write_text(json.dumps([{"image": "train/a.jpg", "caption": "x"}, {"image": bad, "caption": "y"}]))
    out = _check_read("prismer", root, max_bad_fraction=1.0)
    assert len(out) == 1 and out.log.reasons["unsafe path"] == 1 and "caption_train.json[1]" in out.log.examples["unsafe path"][0]
    from vlmrepro.data.readers import read
    with pytest.raises(VlmreproError, match="unsafe path"): read("prismer", root, "train", verbose=False)
    (root/"annotations"/"captions_train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "../outside.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    out = _check_read("coco", root, max_bad_fraction=1.0)
    assert len(out) == 0 and out.log.reasons["unsafe path"] == 1


@FUZZ
@given(data=st.binary(max_size=64) | st.sampled_from([b"", b"\xff\xd8\xff", _jpeg()[:40], b"GIF89a" + b"\0" * 10, b"\x89PNG\r\n\x1a\n"]))
def test_load_image_bytes_and_files(tmp_path, data):
    from vlmrepro.data.records import BadInputError, load_image
    p = tmp_path/"x.jpg"; p.write_bytes(data)
    for src in (data, p):
        try: im = load_image(src, "probe.jpg")
        except BadInputError as e: assert "probe.jpg" in str(e); continue
        assert im.mode == "RGB"


@FUZZ
@given(data=st.binary(max_size=200), expert=st.sampled_from(["depth", "normal", "ocr_detection"]))
def test_expert_label_reader(tmp_path, data, expert):
    "A label map that is not an image (or is empty) is a BadInputError that names it."
    from vlmrepro.data.readers import load_expert
    p = tmp_path/"label.png"; p.write_bytes(data)
    try: m = load_expert(p, expert, 8)
    except VlmreproError as e: assert "label.png" in str(e); return
    assert m.shape[:2] == (8, 8)


# ---- WebDataset shards ----

def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@FUZZ
@given(cut=st.integers(0, 4000), flip=st.lists(st.integers(0, 4000), max_size=3), json_doc=JSON | st.binary(max_size=20))
def test_shard_reader_on_damaged_tars(tmp_path, cut, flip, json_doc):
    "Truncated, bit-flipped tars and bad json members: samples or Dropped placeholders, never an exception."
    from vlmrepro.data.records import Dropped, Sample
    from vlmrepro.data.shards import ShardDataset
    meta = json_doc if isinstance(json_doc, bytes) else json.dumps(json_doc).encode()
    raw = bytearray(_tar([("000000.jpg", _jpeg()), ("000000.json", meta), ("000001.jpg", b"junk"), ("000001.txt", b"cap")]))
    for i in flip:
        if i < len(raw): raw[i] ^= 0xFF
    (tmp_path/"00000.tar").write_bytes(bytes(raw[:cut]) if cut < len(raw) else bytes(raw))
    for s in ShardDataset(tmp_path):
        assert isinstance(s, (Sample, Dropped)), s


@pytest.mark.parametrize("name", ["../../evil.jpg", "/abs/evil.jpg", "a/../../evil.jpg"])
def test_tar_member_traversal_is_rejected(tmp_path, name):
    from vlmrepro.data.records import Dropped
    from vlmrepro.data.shards import ShardDataset
    (tmp_path/"00000.tar").write_bytes(_tar([(name, _jpeg()), ("good.jpg", _jpeg())]))
    got = list(ShardDataset(tmp_path))
    assert any(isinstance(s, Dropped) and "unsafe" in s.reason for s in got), got


def _samples_tar(n=3) -> bytearray:
    return bytearray(_tar([(f"{k:06d}.{e}", _jpeg() if e == "jpg" else f"cap {k}".encode()) for k in range(n) for e in ("jpg", "txt")]))


def _offsets(raw) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf: return [m.offset for m in tf.getmembers()]


def _reseal(raw, h):
    "Recompute the checksum of the header at `h` (a tool that writes a bad field writes a valid checksum with it)."
    raw[h + 148:h + 156] = b"        "
    raw[h + 148:h + 156] = b"%06o\0 " % sum(raw[h:h + 512])


def _read_all(tmp_path, raw):
    from vlmrepro.data.records import Dropped, Sample
    from vlmrepro.data.shards import ShardDataset
    (tmp_path/"00000.tar").write_bytes(bytes(raw))
    out = list(ShardDataset(tmp_path))
    assert all(isinstance(s, (Sample, Dropped)) for s in out), out
    return [s.meta["key"] for s in out if isinstance(s, Sample)], [s for s in out if isinstance(s, Dropped)]


@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_any_flipped_header_byte_drops_the_rest_of_the_shard_by_name(tmp_path, mask):
    "One flipped byte anywhere in sample 2's first header (checksum field included): samples before it, then one named drop."
    raw = _samples_tar(); h = _offsets(raw)[4]
    for i in range(512):
        bad = bytearray(raw); bad[h + i] ^= mask
        keys, drops = _read_all(tmp_path, bad)
        if i == 155:                                               # after the checksum's NUL: no reader looks at it
            assert (keys, drops) == (["000000", "000001", "000002"], []); continue
        assert keys == ["000000"], (i, keys)                      # sample 1 may have lost members after the damage: dropped too
        assert [(d.reason, d.source) for d in drops] == [("corrupt shard", str(tmp_path/"00000.tar"))], (i, drops)
        assert f"at byte {h}" in drops[0].detail, (i, drops[0])


@pytest.mark.parametrize("size", [b"\x80" + (2**88 - 1).to_bytes(11, "big"), b"\xff" * 12, b"0000000001x\0", b"77777777777\0"])
def test_impossible_member_sizes_are_named_not_allocated(tmp_path, size):
    "A size field past the end of the file (2^88 bytes, negative, not octal): a named drop at once, no MemoryError, no hang."
    import signal, time
    raw = _samples_tar(); h = _offsets(raw)[4]
    raw[h + 124:h + 136] = size; _reseal(raw, h)
    signal.alarm(30)
    try: t0 = time.perf_counter(); keys, drops = _read_all(tmp_path, raw)
    finally: signal.alarm(0)
    assert time.perf_counter() - t0 < 10 and keys == ["000000"]
    assert len(drops) == 1 and drops[0].reason in ("corrupt shard", "truncated shard") and "000002.jpg" in drops[0].detail, drops


@pytest.mark.parametrize("where", ["name", "prefix", "pax", "gnu"])
def test_member_names_that_are_not_utf8_are_named_and_skipped(tmp_path, where):
    "A non-UTF-8 member name (ustar name or prefix, pax path, GNU long name): that member is skipped and named, the rest read."
    members = [("000000.jpg", _jpeg()), ("000000.txt", b"cap 0"), ("000001.jpg", _jpeg()), ("000002.jpg", _jpeg())]
    fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(where, tarfile.USTAR_FORMAT)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            if name == "000001.jpg" and where in ("pax", "gnu"): name = "\udcff" * 101 + ".jpg"   # long: a pax / GNU record
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    if where in ("name", "prefix"):
        h = _offsets(raw)[2]
        if where == "name": raw[h] = 0xFF
        else: raw[h + 345:h + 348] = b"\xffab"
        _reseal(raw, h)
    keys, drops = _read_all(tmp_path, raw)
    assert "000000" in keys and "000002" in keys and "000001" not in keys, keys
    assert [d.reason for d in drops] == ["unreadable member name"] and str(tmp_path/"00000.tar") in drops[0].source, drops
    assert "\\xff" in drops[0].detail, drops[0]


# ---- metrics CLI input files ----

@FUZZ
@given(pred=JSON | st.lists(st.fixed_dictionaries({"image_id": either(1), "caption": either("a red tile")}), max_size=2),
       gt=JSON | st.fixed_dictionaries({"annotations": st.lists(st.fixed_dictionaries(
           {"image_id": either(1), "caption": either("a red tile")}), max_size=2)}))
def test_eval_captions_cli_inputs(tmp_path, pred, gt):
    from vlmrepro.cli import dispatch
    (tmp_path/"p.json").write_text(json.dumps(pred)); (tmp_path/"g.json").write_text(json.dumps(gt))
    try: assert dispatch(["eval", "captions", "--pred", str(tmp_path/"p.json"), "--gt", str(tmp_path/"g.json"), "--fast"]) == 0
    except VlmreproError as e: assert str(e)


@FUZZ
@given(pred=JSON | st.lists(st.fixed_dictionaries({"question_id": either(10), "answer": either("red")}), max_size=2),
       anns=JSON | st.fixed_dictionaries({"annotations": st.lists(st.fixed_dictionaries(
           {"question_id": either(10), "answers": either([{"answer": "red", "answer_id": 1}] * 10),
            "answer_type": either("other"), "question_type": either("what"), "image_id": either(1),
            "multiple_choice_answer": either("red")}), max_size=2)}),
       qs=JSON | st.fixed_dictionaries({"questions": st.lists(st.fixed_dictionaries(
           {"question_id": either(10), "question": either("what color?"), "image_id": either(1)}), max_size=2)}))
def test_eval_vqa_cli_inputs(tmp_path, pred, anns, qs):
    from vlmrepro.cli import dispatch
    for n, d in (("p", pred), ("a", anns), ("q", qs)): (tmp_path/f"{n}.json").write_text(json.dumps(d))
    try: assert dispatch(["eval", "vqa", "--pred", str(tmp_path/"p.json"), "--annotations", str(tmp_path/"a.json"),
                           "--questions", str(tmp_path/"q.json")]) == 0
    except VlmreproError as e: assert str(e)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00garbage", b"[" * 100_000, b"1e999999", b"\x00" * 10])
def test_json_files_that_are_not_json(tmp_path, content):
    "Zero-size, truncated, not UTF-8, nested past the recursion limit: each a VlmreproError naming the file."
    from vlmrepro.cli import dispatch
    p = tmp_path/"bad.json"; p.write_bytes(content)
    try: read_json(p)
    except VlmreproError as e: assert "bad.json" in str(e)
    with pytest.raises(VlmreproError, match="bad.json|predictions|references"):
        dispatch(["eval", "captions", "--pred", str(p), "--gt", str(p), "--fast"])


@pytest.mark.parametrize("argv", [[], ["captions"], ["captions", "--pred"], ["nope"], ["vqa", "--pred", "x"]])
def test_eval_cli_usage_errors_are_vlmrepro_errors(argv):
    "argparse's SystemExit would end a caller's process; the tools raise VlmreproError like every other input error."
    from vlmrepro.cli import dispatch
    with pytest.raises(VlmreproError, match="vlmrepro eval"): dispatch(["eval", *argv])


# ---- retrieval index ----

@pytest.fixture
def index_dir(tmp_path):
    from vlmrepro.systems.fromage.index import IndexWriter
    w = IndexWriter(tmp_path/"idx"); w.add(np.eye(3, 4, dtype=np.float32), ["a.jpg", "b.jpg", "c.jpg"]); return w.finish()


@FUZZ
@given(field=st.sampled_from(["format", "file", "count", "dim", "dtype", None]), value=JSON,
       paths=st.none() | JSON, cut=st.none() | st.integers(0, 200), header=st.none() | st.binary(max_size=16))
def test_index_loader(index_dir, field, value, paths, cut, header):
    from vlmrepro.systems.fromage.index import RetrievalIndex
    import shutil
    d = index_dir.parent/"fz"; shutil.rmtree(d, ignore_errors=True); shutil.copytree(index_dir, d)
    meta = json.loads((d/"index.json").read_text())
    if field: meta[field] = value
    (d/"index.json").write_text(json.dumps(meta))
    if paths is not None: (d/"paths.json").write_text(json.dumps(paths))
    emb = d/"embeddings.safetensors"
    raw = emb.read_bytes()
    if header is not None: raw = header + raw[len(header):]
    if cut is not None: raw = raw[:cut]
    emb.write_bytes(raw)
    try: idx = RetrievalIndex.load(d)
    except VlmreproError as e: assert str(e); return
    s, i = idx.search(np.ones((1, idx.dim), np.float32), k=2)       # what loads must also answer queries
    assert i.shape == (1, min(2, len(idx))) and all(isinstance(idx.paths[j], str) for j in i[0])


def test_index_loader_refuses_pickles_and_npy_object_arrays(tmp_path, index_dir):
    from vlmrepro.systems.fromage.index import RetrievalIndex
    (tmp_path/"cc3m_embeddings.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(VlmreproError, match="pickle"): RetrievalIndex.load(tmp_path)
    np.save(index_dir/"embeddings.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    meta = json.loads((index_dir/"index.json").read_text()); meta["file"] = "embeddings.npy"
    (index_dir/"index.json").write_text(json.dumps(meta))
    with pytest.raises(VlmreproError, match="embeddings.npy"): RetrievalIndex.load(index_dir)


# ---- the CLI's parameters ----

DEFAULTS = [0, 1.5, True, "lora", None, [1, 2], {"a": 1}]


@FUZZ
@given(default=st.sampled_from(DEFAULTS), text=st.text(max_size=20) | st.sampled_from(
    ["1e-3", "1e999", "-1", "nan", "inf", "[1, 2", "{a: [", "yes", "~", "0x10", "99999999999999999999999", "!!python/object:os.system ''",
     "*ref", "&a [*a]", "1" * 4000]))
def test_run_param_coercion(default, text):
    "`vlmrepro run -p KEY VALUE`: a value of the default's type, or a VlmreproError naming the parameter."
    from vlmrepro.registry import coerce_value
    try: v = coerce_value("k", text, default)
    except VlmreproError as e: assert "'k'" in str(e); return
    if v is None:                                    # YAML's null is how a command line sets an optional parameter to None
        assert text.strip() in ("", "~", "null", "Null", "NULL") or default is None; return
    if isinstance(default, bool): assert isinstance(v, bool)
    elif isinstance(default, float): assert isinstance(v, float) and np.isfinite(v)
    elif isinstance(default, int): assert isinstance(v, int) and not isinstance(v, bool)
    elif isinstance(default, str): assert isinstance(v, str)


def test_run_param_with_a_huge_integer():
    from vlmrepro.registry import coerce_value
    with pytest.raises(VlmreproError, match="'k'"): coerce_value("k", "1" * 5000, 0)


@FUZZ
@given(spec=st.dictionaries(st.sampled_from(["system", "grid", "runs", "params", "x"]), JSON, max_size=3) | st.fixed_dictionaries({"system": either("quickstart"), "grid": either({"seed": [0, 1]})}, optional={
    "params": JSON, "runs": JSON, "name": either("s"), "preset": either("tiny")}))
def test_sweep_spec(spec):
    "A parsed sweep spec gives parameter dicts or a VlmreproError."
    from vlmrepro.runner import sweep_runs
    try: runs = sweep_runs(spec)
    except VlmreproError as e: assert str(e); return
    assert isinstance(runs, list) and all(isinstance(r, dict) for r in runs)


@pytest.mark.parametrize("text", ["5", "1.5", "- a\n- b\n", "just words"])
def test_sweep_file_that_is_not_a_mapping(tmp_path, text):
    from vlmrepro.runner import sweep
    p = tmp_path/"s.yaml"; p.write_text(text)
    with pytest.raises(VlmreproError, match="s.yaml"): sweep(p, tmp_path/"results", log=lambda *a: None)


@pytest.mark.parametrize("text", ["{", "system: [", "\t- x", "system: quickstart\ngrid: 3\n", ""])
def test_sweep_file_malformed(tmp_path, text):
    from vlmrepro.runner import sweep
    p = tmp_path/"s.yaml"; p.write_text(text)
    with pytest.raises(VlmreproError): sweep(p, tmp_path/"results", log=lambda *a: None)


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    "A flow-style YAML list whose nested aliases stand for width**levels values: ~300 bytes."
    parts = ["&a0 [" + ",".join(["1"] * width) + "]"]
    parts += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_param_value_of_nested_aliases_is_refused_at_once():
    "`-p KEY VALUE` with a few hundred bytes of nested aliases: an error naming the parameter, not a minute and a MemoryError."
    import time
    from vlmrepro.registry import coerce_value, resolve_params, find_systems
    bomb = _alias_bomb()
    assert len(bomb) < 420
    t = time.time()
    for default in (None, [1], {"a": 1}):
        with pytest.raises(VlmreproError, match="parameter 'k': the YAML stands for more than"): coerce_value("k", bomb, default)
    with pytest.raises(VlmreproError, match="parameter 'data_root'"):
        resolve_params(find_systems()["nxtp"], overrides={"data_root": bomb})
    assert time.time() - t < 5


def test_sweep_grid_of_aliases_is_refused_with_its_size(tmp_path):
    "A 130-byte grid whose aliases make a billion combinations: refused, naming the size, before anything runs."
    import time
    from vlmrepro.runner import sweep
    p = tmp_path/"g.yaml"
    p.write_text("system: quickstart\ngrid: {a: &a [1,2,3,4,5,6,7,8,9,0], b: *a, c: *a, d: *a, e: *a, f: *a, g: *a, h: *a, i: *a}\n")
    t = time.time()
    with pytest.raises(VlmreproError, match=r"'grid' has 1,000,000,000 combinations \(10 x 10 x 10"):
        sweep(p, tmp_path/"res", log=lambda *a: None)
    assert time.time() - t < 5 and not (tmp_path/"res").exists()
    p.write_text("system: quickstart\nruns: [" + _alias_bomb(5, 12) + "]\n")          # a value that expands past the file limit
    with pytest.raises(VlmreproError, match="g.yaml: the YAML stands for more than 100,000 values"):
        sweep(p, tmp_path/"res", log=lambda *a: None)


def test_pack_cli_usage_and_bad_input(tmp_path, root):
    from vlmrepro.cli import dispatch
    for argv in ([], ["--format", "nope", "--root", str(root), "--split", "train", "--out", str(tmp_path/"o")],
                 ["--format", "coco", "--root", str(tmp_path/"missing"), "--split", "train", "--out", str(tmp_path/"o")],
                 ["--format", "coco", "--root", str(root), "--split", "train", "--out", str(tmp_path/"o"), "--maxcount", "0"],
                 ["--format", "coco", "--root", str(root), "--split", "train", "--out", str(tmp_path/"o"), "--maxcount", "x"]):
        with pytest.raises(VlmreproError): dispatch(["pack", *argv])


@pytest.mark.parametrize("data", [b"", b"garbage!", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_ocr_feature_reader_names_a_damaged_file(tmp_path, data):
    from vlmrepro.systems.prismer.experts import read_word_features
    p = tmp_path/"words.safetensors"; p.write_bytes(data)
    with pytest.raises(VlmreproError, match="words.safetensors"): read_word_features(p)


@pytest.mark.parametrize("bad", ["../../outside.jpg", "/etc/passwd"])
def test_experts_data_list_traversal_is_rejected(tmp_path, bad):
    from vlmrepro.systems.prismer.experts import list_images
    (tmp_path/"images").mkdir(); (tmp_path/"prismer").mkdir()
    (tmp_path/"prismer"/"caption_train.json").write_text(json.dumps([{"image": "images/a.jpg"}, {"image": bad}]))
    try: rels = list_images(tmp_path/"images", [tmp_path/"prismer"/"caption_train.json"])
    except VlmreproError as e: assert "caption_train.json" in str(e); return
    assert all(not os.path.isabs(r) and not os.path.normpath(r).startswith("..") for r in rels), rels
