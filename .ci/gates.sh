#!/usr/bin/env bash
# CI gates over the notebooks: export and clean must change nothing, then every notebook runs (slow/gpu cells skipped).
set -euo pipefail
bin=${1:-.venv/bin}
snapshot() { git status --porcelain -- "$1"; git diff --no-ext-diff -- "$1" | sha1sum; }

before=$(snapshot vlmrepro)
"$bin/nbdev_export"
if [ "$before" != "$(snapshot vlmrepro)" ]; then
  echo "gate failed: nbdev_export changed vlmrepro/ (the library is out of step with nbs/). Run 'make export' and commit." >&2
  git status --short -- vlmrepro >&2; exit 1
fi
before=$(snapshot nbs)
"$bin/nbdev_clean"
if [ "$before" != "$(snapshot nbs)" ]; then
  echo "gate failed: nbdev_clean changed nbs/. Run 'make clean-nbs' and commit the cleaned notebooks." >&2
  git status --short -- nbs >&2; exit 1
fi
# One torch thread per notebook: nbdev_test runs one notebook per core, and oversubscribed threads spin (20x slower).
# nbs/papers holds a .notest file: the paper notebooks run once each, with their smoke preset, in tests/test_papers.py.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$bin/nbdev_test" --do_print --timing
