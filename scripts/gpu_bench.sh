#!/usr/bin/env bash
# On a bare GPU machine (torch, transformers, peft, accelerate, sentence-transformers; no network): install what
# scripts/gpu_wheels.sh fetched, then run the GPU benchmarks. Writes JSON to OUT (default bench_out/).
#   bash scripts/gpu_bench.sh [DIR=.whl]
# Figures: QLoRA SFT and DPO tokens/s, MFU and peak memory at 1x1024 for the Phi-2 and Mistral-7B shapes, whether
# each fits a 16 GB T4 (bench/gpu_qlora.py); 4-bit Mistral-7B-shaped inference rows/s (bench/bench_predict.py --gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
OUT=${OUT:-bench_out}
SITE=${SITE:-/tmp/promptrec-site}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DIR"/*.whl
if ls "$DIR"/deepspeed-*.tar.gz >/dev/null 2>&1; then
  PYTHONPATH="$SITE" DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target "$SITE" "$DIR"/deepspeed-*.tar.gz || echo "(deepspeed did not install: only ZeRO launches need it)"
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
python3 -c "import torch, trl, datasets, bitsandbytes, peft, promptrec; print('torch', torch.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())"
python3 bench/gpu_qlora.py --tokenizer "$DIR/tokenizer" --output "$OUT/gpu_qlora.json"
python3 bench/bench_predict.py --gpu --tokenizer "$DIR/tokenizer" --triplets reference --rows 64 --single_rows 0 \
  --mbr_candidates 0 --output "$OUT/gpu_predict.json"
