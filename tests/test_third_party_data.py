"""Data nobody here made: the paper notebooks run end to end on data sets written by other code, in the upstream's
layouts, with words, objects and counts unlike the synthetic world's.

NxTP: WebDataset shards written by plain `tarfile` code (no stats files, no manifest), as another tool would leave them.
"""
import io, json, subprocess, tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# A vocabulary of household objects, nothing like the synthetic world's coloured shapes.
OBJECTS = {"apple": (200, 30, 30), "banana": (230, 210, 40), "cup": (60, 90, 200), "lamp": (240, 240, 200),
           "book": (120, 60, 20), "chair": (90, 140, 60), "clock": (200, 200, 200), "plant": (30, 160, 70)}


def draw_objects(names: list[str], rng: np.random.Generator, size: int = 64) -> Image.Image:
    "A picture with one blob per object, in the object's colour, on a textured background."
    img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    for n in names:
        x, y = rng.integers(4, size - 20, 2); w, h = rng.integers(10, 18, 2)
        (d.ellipse if n in ("apple", "clock", "plant") else d.rectangle)([x, y, x + w, y + h], fill=OBJECTS[n])
    return img


def write_plain_shards(out: Path, n: int, seed: int, per_shard: int = 16) -> None:
    "Shards `00000.tar`, ... of <key>.jpg + <key>.txt written with `tarfile` alone: no stats, no manifest."
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for s in range(0, n, per_shard):
        with tarfile.open(out/f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                names = list(rng.choice(sorted(OBJECTS), rng.integers(1, 4), replace=False))
                buf = io.BytesIO(); draw_objects(names, rng).save(buf, "JPEG")
                caption = "a photo of " + " and ".join(f"a {n}" for n in names) + " on a table"
                for suffix, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}"); info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_nxtp_runs_on_plain_tar_shards_without_stats(tmp_path, vlmrepro_cmd):
    root = tmp_path/"objects"
    write_plain_shards(root/"shards"/"train", 96, seed=1)
    write_plain_shards(root/"shards"/"val", 16, seed=2)
    assert not list(root.rglob("*.json"))                                        # nothing but tars
    check = subprocess.run([*vlmrepro_cmd, "check", "nxtp", "--preset", "smoke", "-p", "data_root", str(root)],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    out = subprocess.run([*vlmrepro_cmd, "run", "nxtp", "--preset", "smoke", "-p", "data_root", str(root),
                          "--run-id", "objects", "--results", str(tmp_path/"results")], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path/"results"/"nxtp"/"objects"/"metrics.json").read_text())
    assert 0 <= metrics["synth/f1"] <= 1 and "synth/f1_shuffled_pairs" in metrics, metrics      # the control trains on any shards


@pytest.mark.slow
def test_check_names_what_is_missing_before_training(tmp_path, vlmrepro_cmd):
    root = tmp_path/"objects"
    write_plain_shards(root/"shards"/"train", 16, seed=1)                       # no validation shards
    out = subprocess.run([*vlmrepro_cmd, "run", "nxtp", "--preset", "smoke", "-p", "data_root", str(root),
                          "--run-id", "x", "--results", str(tmp_path/"results")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "shards/val" in out.stderr, out.stderr
    assert not (tmp_path/"results"/"nxtp"/"x"/"metrics.json").exists()
