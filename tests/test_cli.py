"""The `vlmrepro` command as a user starts it: every command answers --help, the commands that need no model start
without torch or transformers, and `vlmrepro --help` starts fast."""
import json, subprocess, sys, time

import pytest

from conftest import REPO, vlmrepro_command
from vlmrepro.cli import COMMANDS, main
from vlmrepro.core import write_json

HEAVY = ("torch", "transformers")
# Runs `main(argv)` in a fresh interpreter, then prints which heavy modules the command imported.
PROBE = """import json, sys
from vlmrepro.cli import main
try: rc = main(json.loads(sys.argv[1]))
except SystemExit as e: rc = e.code
print(json.dumps({"rc": rc, "heavy": [m for m in %r if m in sys.modules]}))""" % (HEAVY,)


def probe(argv):
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


@pytest.fixture
def eval_files(tmp_path):
    write_json(tmp_path/"gt.json", {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a red square"}]})
    write_json(tmp_path/"pred.json", [{"image_id": 1, "caption": "a red square"}])
    write_json(tmp_path/"q.json", {"questions": [{"question_id": 7, "image_id": 1, "question": "what color?"}]})
    write_json(tmp_path/"a.json", {"annotations": [{"question_id": 7, "image_id": 1, "answer_type": "other", "question_type": "what",
                                                    "multiple_choice_answer": "red", "answers": [{"answer": "red"}] * 10}]})
    write_json(tmp_path/"p.json", [{"question_id": 7, "answer": "red"}])
    return tmp_path


def test_commands_without_a_model_import_no_torch(eval_files):
    d = eval_files
    for argv in (["--help"], ["list", "--results", str(d/"res")], ["report", "--results", str(d/"res")],
                 ["eval", "captions", "--pred", str(d/"pred.json"), "--gt", str(d/"gt.json"), "--fast"],
                 ["eval", "vqa", "--pred", str(d/"p.json"), "--questions", str(d/"q.json"), "--annotations", str(d/"a.json")],
                 ["eval", "--help"], ["list", "--help"]):
        got, err = probe(argv)
        assert got == {"rc": 0, "heavy": []}, (argv, got, err[-1000:])


@pytest.mark.parametrize("module", ["vlmrepro.cli", "vlmrepro.core", "vlmrepro.runner", "vlmrepro.metrics.caption",
                                    "vlmrepro.metrics.vqa", "vlmrepro.metrics.cli"])
def test_light_modules_import_no_torch(module):
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(m for m in imported if m.split(".")[0] in HEAVY)[:5]


def test_help_starts_fast():
    "Loosely bounded (the machines are shared); the figure itself is in results/benchmarks/."
    cmd = [*vlmrepro_command(), "--help"]
    times = []
    for _ in range(3):
        t0 = time.perf_counter(); run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - t0)
        assert run.returncode == 0 and "COMMAND" in run.stdout, run.stderr
    assert min(times) < 1.0, times


def test_every_command_answers_help(capsys):
    helps = [[name] for name in COMMANDS] + [["eval", "captions"], ["eval", "vqa"], ["zoo", "list"], ["zoo", "build"]]
    for argv in helps:
        with pytest.raises(SystemExit) as e: main([*argv, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: vlmrepro {' '.join(argv)}"), (argv, out[:200])


@pytest.mark.parametrize("argv, message", [
    (["pack", "--format", "tsv", "--root", ".", "--split", "val", "--out", "x"], "vlmrepro pack: argument --format: invalid choice: 'tsv'"),
    (["synth", "--out", "x", "--n-train", "many"], "vlmrepro synth: argument --n-train: invalid int value: 'many'"),
    (["zoo", "build", "tiny-nope", "--root", "{tmp}"], "unknown zoo entry ['tiny-nope']"),
    (["bench", "--only", "speed", "--out", "{tmp}"], "unknown benchmark 'speed'"),
    (["experts", "--data", "{tmp}", "--experts", "dpth"], "unknown expert 'dpth'"),
    (["evl", "captions"], "unknown command 'evl'; did you mean 'eval'?"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmrepro: error: ") and message in err and err.count("\n") == 1, err
