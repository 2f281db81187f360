"Caption metrics: identity with pycocoevalcap, the fast-vs-official bound, read-only installs, bad inputs."
import json, math, os, random, shutil, subprocess, sys, tempfile
from pathlib import Path

import pytest

from vlmrepro.core import VlmreproError
from vlmrepro.metrics.caption import (FAST_METRICS, OFFICIAL_METRICS, coco_eval_cap_reference, evaluate_captions,
                                      meteor_normalize, meteor_normalize_all, meteor_score, ptb_tokenize, pycocoevalcap_dir)

FIXTURE = Path(__file__).parent/"fixtures"/"metrics"/"captions_bound.json"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the official path needs Java")

# |fast - official| on the committed caption set, x100 scale (measured: see the fixture test's message)
FAST_BOUND_X100 = {"Bleu_1": 0.5, "Bleu_2": 0.5, "Bleu_3": 0.5, "Bleu_4": 0.5, "ROUGE_L": 0.5, "CIDEr": 0.5}


@pytest.fixture(scope="module")
def caption_set():
    d = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return d["references"], d["predictions"], d["official"]


@needs_java
def test_official_identical_to_cocoevalcap(caption_set):
    refs, preds, committed = caption_set
    ours = evaluate_captions(refs, preds)
    theirs = coco_eval_cap_reference({int(k) if k.isdigit() else k: v for k, v in refs.items()},
                                     {int(k) if k.isdigit() else k: v for k, v in preds.items()})
    assert ours["path"] == "official"
    for m in OFFICIAL_METRICS:
        assert ours[m] == theirs[m], (m, ours[m], theirs[m])      # bit-identical
        assert ours[m] == committed[m], (m, ours[m], committed[m])


def test_fast_within_bound_of_official(caption_set):
    refs, preds, official = caption_set
    fast = evaluate_captions(refs, preds, fast=True)
    assert fast["path"] == "fast" and "METEOR" not in fast
    diffs = {m: abs(100 * (fast[m] - official[m])) for m in FAST_METRICS}
    assert all(diffs[m] <= FAST_BOUND_X100[m] for m in FAST_METRICS), diffs


@needs_java
def test_official_path_with_read_only_pycocoevalcap():
    "pycocoevalcap's own tokenizer writes into its package dir; ours must not need to."
    tmp_path = Path(tempfile.mkdtemp(prefix="vlmrepro-ro-", dir="/tmp")); tmp_path.chmod(0o777)
    try: _run_read_only(tmp_path)
    finally: shutil.rmtree(tmp_path, ignore_errors=True)


def _run_read_only(tmp_path):
    pkg = pycocoevalcap_dir()
    before = sorted(p.name for p in pkg.rglob("*"))
    code = ("import json; from vlmrepro.metrics.caption import evaluate_captions as e; "
            "print(json.dumps(e({1: ['A dog runs.', 'A brown dog.'], 2: ['A cat sleeps.']}, {1: 'a dog', 2: 'a cat'})))")
    env = dict(os.environ)
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # root ignores permissions: run as 'nobody', for whom the installed package dir is genuinely read-only
        cache = tmp_path/"cache"; (cache/"meteor").mkdir(parents=True)
        src = Path(os.environ.get("VLMREPRO_CACHE") or Path.home()/".cache"/"vlmrepro")/"meteor"/"paraphrase-en.phrases"
        if src.exists():                                 # reuse the built index (hard links, or a copy)
            try: shutil.copytree(src, cache/"meteor"/src.name, copy_function=os.link)
            except OSError: shutil.copytree(src, cache/"meteor"/src.name)
        for p in [tmp_path, *tmp_path.rglob("*")]: p.chmod(0o777 if p.is_dir() else 0o666)
        env.update(VLMREPRO_CACHE=str(cache), HOME=str(tmp_path))
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
        if subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-w", str(pkg)]).returncode == 0:
            pytest.skip(f"{pkg} is writable even for nobody")
    elif not os.access(pkg, os.W_OK): cmd = [sys.executable, "-c", code]
    else: pytest.skip("cannot make pycocoevalcap's directory read-only here (not root, and it is writable)")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout)
    assert res["path"] == "official" and res["CIDEr"] >= 0 and 0 <= res["METEOR"] <= 1
    assert sorted(p.name for p in pkg.rglob("*")) == before


# ---------------------------------------------------------------- bad input: a clear error or a documented handling
REFS = {1: ["A dog runs on grass.", "A brown dog running."], 2: ["A cat sleeps on a sofa.", "A sleeping cat."]}


@pytest.mark.parametrize("fast", [True, False])
def test_empty_predictions(fast):
    with pytest.raises(VlmreproError, match="predictions are empty"): evaluate_captions(REFS, [], fast=fast)
    with pytest.raises(VlmreproError, match="predictions are empty"): evaluate_captions(REFS, {}, fast=fast)


def test_missing_and_extra_image_ids():
    with pytest.raises(VlmreproError, match="have no prediction.*--subset"): evaluate_captions(REFS, {1: "a dog"}, fast=True)
    with pytest.raises(VlmreproError, match="have no reference"): evaluate_captions(REFS, {1: "a", 2: "b", 3: "c"}, fast=True)
    sub = evaluate_captions(REFS, {1: "a dog"}, fast=True, subset=True)
    assert sub["n_images"] == 1


def test_string_and_int_ids_meet():
    a = evaluate_captions({"1": REFS[1], "2": REFS[2]}, [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}], fast=True)
    b = evaluate_captions(REFS, {"1": "a dog", "2": "a cat"}, fast=True)
    assert a == b


@pytest.mark.parametrize("bad", [None, 3, ["a dog", "two captions"], {"text": "a dog"}])
def test_non_string_captions(bad):
    with pytest.raises(VlmreproError, match="caption must be a string"): evaluate_captions(REFS, {1: bad, 2: "a cat"}, fast=True)
    with pytest.raises(VlmreproError, match="caption must be a string"): evaluate_captions({1: [bad], 2: ["a"]}, {1: "a", 2: "b"}, fast=True)


def test_duplicate_predictions():
    with pytest.raises(VlmreproError, match="more than one caption"):
        evaluate_captions(REFS, [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}, {"image_id": 2, "caption": "c"}])


def test_malformed_rows_and_files(tmp_path):
    with pytest.raises(VlmreproError, match="needs 'image_id' and 'caption'"): evaluate_captions(REFS, [{"image": 1}], fast=True)
    with pytest.raises(VlmreproError, match="file not found"): evaluate_captions(tmp_path/"nope.json", {1: "a"}, fast=True)
    (tmp_path/"bad.json").write_text("{oops")
    with pytest.raises(VlmreproError, match="not valid JSON"): evaluate_captions(tmp_path/"bad.json", {1: "a"}, fast=True)


@pytest.mark.parametrize("fast", [True, pytest.param(False, marks=needs_java)])
def test_unicode_and_whitespace_captions(fast):
    refs = {1: ["Un café crème sur la table.", "Ein Käse-Brot 🍞 auf dem Tisch."], 2: ["A dog\nruns.", "A dog\r\nrunning\u2028fast."],
            3: ["A cat.", "Cats."]}
    preds = {1: "un café crème sur la table", 2: "a dog\rruns", 3: ""}   # an empty caption is allowed and scores 0
    res = evaluate_captions(refs, preds, fast=fast, per_image=True)
    assert all(math.isfinite(res[m]) for m in (OFFICIAL_METRICS if not fast else FAST_METRICS))
    per = res["per_image"]
    assert per["3"]["CIDEr"] == 0.0 and per["3"]["Bleu_1"] < 1e-6
    assert per["1"]["Bleu_1"] > 0.99                     # non-ASCII text tokenizes alike in references and prediction
    # a carriage return inside a caption must not shift the next captions' lines: image 2 scores as if it were a space
    clean = evaluate_captions({2: ["A dog runs.", "A dog running fast."], 1: refs[1], 3: refs[3]},
                              {2: "a dog runs", 1: preds[1], 3: ""}, fast=fast, per_image=True)["per_image"]
    assert per["2"]["Bleu_1"] == clean["2"]["Bleu_1"]


@needs_java
def test_spice_reported_unavailable_not_crashing():
    res = evaluate_captions(REFS, {1: "a dog", 2: "a cat"}, spice=True)
    if res.get("SPICE") is None: assert "stanford-corenlp-3.6.0" in res["SPICE_unavailable"]
    else: assert 0 <= res["SPICE"] <= 1


def test_vizwiz_format_drops_rejected_and_precanned():
    gt = {"images": [{"id": 5, "file_name": "x.jpg"}], "annotations": [
        {"image_id": 5, "caption": "A can of soup.", "is_rejected": False, "is_precanned": False},
        {"image_id": 5, "caption": "Quality issues are too severe to recognize visual content.", "is_precanned": True},
        {"image_id": 5, "caption": "junk", "is_rejected": True}]}
    res = evaluate_captions(gt, [{"image_id": 5, "caption": "a can of soup"}], fast=True, per_image=True)
    assert res["n_images"] == 1 and res["Bleu_1"] > 0.99


# ------------------------------------------------------------------ a pathological caption: memory stays bounded
ROUGE_MEMORY = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))           # 2 GiB of address space for the whole process
from vlmrepro.metrics.caption import evaluate_captions
long = " ".join(["a", "b"] * 1_000_000)                               # 2M words
refs = {i: ["a dog on the grass", "the dog runs"] for i in range(500)}
preds = {i: "a dog runs on the grass" for i in range(500)}
refs[0][0] = long; preds[0] = "a b c"                                 # a 2M-word reference ...
preds[1] = long                                                       # ... and a 2M-word hypothesis
res = evaluate_captions(refs, preds, fast=True, per_image=True)
print(json.dumps({k: res["per_image"][k]["ROUGE_L"] for k in ("0", "1", "2")}))
"""


def _rouge_l(pairs, n_hyp, beta=1.2):
    "pycocoevalcap's ROUGE-L of one image from its (LCS, reference length) pairs: F of the best precision and recall."
    p, r = max(lcs / float(n_hyp) for lcs, _ in pairs), max(lcs / float(n) for lcs, n in pairs)
    return ((1 + beta**2) * p * r) / float(r + beta**2 * p) if p and r else 0.0


def test_rouge_memory_bounded_on_a_2m_word_caption():
    "Padding every pair to the longest caption asked for 15 GiB here; the process now stays within 2 GiB."
    run = subprocess.run([sys.executable, "-c", ROUGE_MEMORY], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["0"] == _rouge_l([(2, 2_000_000), (0, 3)], 3)          # "a b" in common with the long reference
    assert got["1"] == _rouge_l([(1, 5), (0, 3)], 2_000_000)          # the long hypothesis shares "a" with one reference
    assert got["2"] == _rouge_l([(5, 5), (2, 3)], 6)


# ------------------------------------------------------------------ METEOR: its tokens and the cut paraphrase table
TRICKY = ["a", "dog", "'s", "n't", "-lrb-", "-rrb-", "black-and-white", "u.s.", "a.m.", "dr.", "mr.", "no.", "1,000", "3.5",
          "caf\u00e9", "na\u00efve", "x--y", "don't", "it's", "'", "''", "``", "`", "\u2018", "\u2019", "\u201c", "\u201d", "\u2013",
          "\u2014", "-", "--", ",", ".", "..", "...", "....", "a.b", "e.g.", "i.e.", "12", "12.", "1990's", "rock'n'roll", "o'clock",
          "&", "@", "#", "$", "%", "*", "+", "=", "<", ">", "/", "\\", "|", "~", "^", "?", "!", ";", ":", "(", ")", "[", "]", "{", "}",
          "\U0001f35e", "\u65e5\u672c", "\u03b5\u03bb\u03bb\u03ac\u03b4\u03b1", "\u043c\u043e\u0441\u043a\u0432\u0430", "\u0130stanbul",
          "\ua66e", "\u00a0", "\u2009", "a\u00a0b", "x.y.z", "5-year-old", "1-2", "a-", "-b", ".5", "5.", "St.", "v.", "vs.", "Nos.",
          "pp.", "z.", "DOTMULTI", "dotmulti", "a..b", "a...", "'tis", "dogs'", "'90s", "l'homme", "x,", ",x", "1,", ",1", "a,b",
          "1,2", "Mr.", "Ph.D.", "etc.", "U.S.A.", "A.", "I.", "the", "man", "on", "bike", "in", "park", "5", "two"]


def _jar_normalized(lines: list[str], tmp: Path) -> list[str]:
    "What METEOR 1.5 itself makes of each line under -norm: the test lines of its -writeAlignments output."
    (tmp/"t.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp/"r.txt").write_text("x\n" * len(lines), encoding="utf-8")
    jar = pycocoevalcap_dir()/"meteor"/"meteor-1.5.jar"
    subprocess.run(["java", "-Dfile.encoding=UTF-8", "-Xmx1G", "-jar", str(jar), str(tmp/"t.txt"), str(tmp/"r.txt"), "-l", "en",
                    "-norm", "-m", "exact", "-writeAlignments", "-f", str(tmp/"o")], cwd=tmp, capture_output=True, check=True, timeout=600)
    out = (tmp/"o-align.out").read_text(encoding="utf-8").split("\n")
    return [out[i + 1] for i, line in enumerate(out) if line.startswith("Alignment\t")]


@needs_java
def test_meteor_normalize_matches_the_jar(tmp_path):
    "The paraphrase cut looks phrases up in meteor_normalize's tokens: they must be the jar's, on text full of traps."
    rng = random.Random(0)
    lines = []
    for _ in range(4000):
        toks = [rng.choice(TRICKY) for _ in range(rng.randint(1, 12))]
        lines.append((" " if rng.random() < 0.8 else "").join(toks))
    lines = [s for s in lines if s.strip()]
    jar = _jar_normalized(lines, tmp_path)
    assert len(jar) == len(lines)
    bad = [(s, j, meteor_normalize(s)) for s, j in zip(lines, jar) if meteor_normalize(s) != j]
    assert not bad, f"{len(bad)} of {len(lines)} lines differ, e.g. {bad[:3]}"
    assert meteor_normalize_all(lines) == jar                         # all lines at once, as the paraphrase cut runs it



@needs_java
def test_meteor_corpus_score_without_per_image_is_the_same():
    "Without per-image scores the jar gets the statistics already added up: the same corpus METEOR, perfect matches too."
    refs = {i: [f"A dog {w} on the grass.", "a dog runs"] for i, w in enumerate(["runs", "sits", "jumps", "sleeps", "naps"])}
    preds = {0: "a dog runs", 1: "A dog sits on the grass.", 2: "a cat", 3: "grass the on sleeps dog a", 4: "dogs nap on grass"}
    per = evaluate_captions(refs, preds, per_image=True)
    assert evaluate_captions(refs, preds)["METEOR"] == per["METEOR"] and per["per_image"]["0"]["METEOR"] > 0.9

@needs_java
@pytest.mark.slow
def test_paraphrase_cut_scores_like_the_full_table():
    "METEOR on the entries whose phrases occur in one image equals METEOR on the whole table, per image."
    from vlmrepro.tools.bench_metrics import realistic_captions, synthetic_captions
    for refs, preds in (realistic_captions(300, seed=3), synthetic_captions(300, seed=3)):
        ids = list(refs)
        toks = ptb_tokenize([c for i in ids for c in refs[i]] + [preds[i] for i in ids])
        it = iter(toks); rt = [[next(it) for _ in refs[i]] for i in ids]; ht = list(it)
        assert meteor_score(rt, ht) == meteor_score(rt, ht, full_table=True)
