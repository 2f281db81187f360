"""NxTP: the label mask against a brute-force reading of its rules, the KV-cache benchmark, the presets, and a short
tiny training run that must recognise objects far better than random labels."""
import json, random
from pathlib import Path

import pytest
import torch

from vlmrepro.systems.nxtp import model as nxtp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    "Tiny models run fastest on one thread (and a shared CPU makes torch's spinning threads very slow)."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def reference_mask(ids, n_img, are, comma, n_valid, upstream_last=False):
    "The mask's rules, one (query, key) pair at a time."
    T = len(ids); L = n_img + T
    a = n_img + ids.index(are)
    commas = [n_img + i for i in range(T) if i < n_valid and ids[i] == comma and n_img + i > a]
    seg = lambda p: sum(c < p for c in commas)                    # a comma belongs to the label it ends
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if k >= n_img + n_valid: continue                       # padding key
            if q < n_img and k < n_img: out[q, k] = True            # image block, both ways
            elif k > q: continue                                    # causal
            elif k <= a: out[q, k] = True                           # image and prompt
            elif q >= n_img + n_valid: continue                     # a pad query never sees labels
            elif seg(q) == seg(k) and not (upstream_last and seg(k) == len(commas)): out[q, k] = True
    return out


@pytest.mark.parametrize("upstream_last", [False, True])
def test_mask_matches_its_rules(upstream_last):
    are, comma, n_img = 7, 9, 3
    rng = random.Random(0)
    rows, lens = [], []
    for _ in range(6):
        prompt = [1, 2] + [rng.choice([3, 4, 5]) for _ in range(rng.randint(1, 3))] + [are]
        labels = [[rng.choice([10, 11, 12, 13]) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 4))]
        text = prompt + sum(([*l, comma] for l in labels[:-1]), []) + labels[-1]
        rows.append(text); lens.append(len(text))
    T = max(lens) + 2
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    valid = torch.tensor([[1] * n + [0] * (T - n) for n in lens])
    got = nxtp.nxtp_attention_mask(ids, n_img, are, comma, valid, upstream_last_label=upstream_last)
    for b, r in enumerate(rows):
        ref = reference_mask(ids[b].tolist(), n_img, are, comma, lens[b], upstream_last)
        real = n_img + lens[b]                                      # pad queries: only their keys' rule matters
        assert torch.equal(got[b, :real], ref[:real]), f"sequence {b}: {r}"
        assert not got[b, :, real:].any()


def test_benchmark_writes_its_report(tmp_path, one_thread):
    from vlmrepro.tools.bench_decoding import decoding_benchmark
    res = decoding_benchmark(tmp_path, n_images=1, k=3, max_steps=4, repeats=1, width=64, layers=1)
    assert res["same_labels"] and res["speedup"] > 0
    assert json.loads((tmp_path/"nxtp_decoding.json").read_text())["k"] == 3
    assert "speed-up" in (tmp_path/"nxtp_decoding.md").read_text()


def test_presets_resolve():
    from vlmrepro.registry import resolve_params
    nb = REPO/"nbs"/"papers"/"nxtp.ipynb"
    paper = resolve_params(nb, "paper")
    assert (paper["lm"], paper["n_lm_blocks"], paper["lr"], paper["batch_size"] * paper["grad_accum"]) == \
        ("meta-llama/Llama-2-7b-hf", 6, 1e-5, 512)
    assert resolve_params(nb, "small")["lm"] == "smollm2-135m"


def test_tiny_run_beats_random_labels(tmp_path, one_thread):
    from vlmrepro.data.shards import ShardDataset
    from vlmrepro.metrics.recognition import LabelEmbedder
    from vlmrepro.registry import create_system
    from vlmrepro.systems.nxtp import system as nxtp_system
    from vlmrepro.train import fit
    system = create_system("nxtp", {"n_train": 400, "n_val": 40, "epochs": 5, "warmup_min_steps": 10, "data_root": None})
    d = nxtp_system.data(system.cfg)
    loader, n = nxtp_system.train_loader(system.model, system.processors, system.cfg, d.train_shards)
    cfg = nxtp_system.train_config(system.cfg, n)
    result = fit(system.model, loader, cfg, tmp_path/"run", loss_fn=system.loss, optimizer=system.optimizer())
    assert result.step == 5 * 13
    val = d.val["synth"]
    refs = nxtp.reference_labels(val)
    embed = LabelEmbedder()
    ours = system.evaluate(val, split="synth", embed=embed)
    vocab = nxtp.label_vocabulary(ShardDataset(d.train_shards, decode=False))
    chance = nxtp.evaluate_labels(nxtp.random_labels(refs, vocab), refs, embed=embed)
    print(f"tiny one-shot F1 {ours['synth/f1']:.3f}, random labels {chance['f1']:.3f}")
    assert ours["synth/f1"] > chance["f1"] + 0.1
