#!/usr/bin/env bash
# Issue 23's seeds of the PO steps (docs/po_selection.md, "the seeds' design", fixed before any seed ran):
#   bash scripts/po_seeds.sh N [pipeline flags …]      (N = 1 … 6; e.g. --until dpo to stop after the DPO round)
# copies seed 42's seed-independent stages (rewrite, split, mean prompt, SFT, the validation cache) into
# checkpoints/pipeline/real_gemma_p<N> and runs one DPO round with its selection, the compute-matched control and the
# test decodes there, the PO steps seeded N, with seed 42's validation choices (RPO β 0.3, self-play pairs). A killed
# seed resumes where it stopped when run again. DRY_RUN=1 prints which stages would run and why, and runs nothing.
set -euo pipefail
n=${1:?usage: po_seeds.sh N [pipeline flags …]}
shift
src=checkpoints/pipeline/real_gemma
dst=checkpoints/pipeline/real_gemma_p$n
[ -f "$src/sft/adapter_model.safetensors" ] || { echo "$src: no seed-42 SFT adapter (run the real config first)" >&2; exit 1; }
mkdir -p "$dst"
for stage in rewrite split mean_prompt sft select_cache; do
  [ -e "$dst/$stage" ] || cp -a "$src/$stage" "$dst/"
done
# one cache of greedy test answers for every seed: the base and the shared SFT are decoded once, not once a seed
mkdir -p "$src/predict_cache"
if [ -d "$dst/predict_cache" ] && [ ! -L "$dst/predict_cache" ]; then
  echo "$dst/predict_cache is a folder of its own: this seed does not share the seeds' cache" >&2
elif [ ! -L "$dst/predict_cache" ]; then
  ln -s "../$(basename "$src")/predict_cache" "$dst/predict_cache"
fi
exec "${PYTHON:-.venv/bin/python}" pipeline/run.py --config pipeline/configs/real_gemma.yaml --run_dir "$dst" \
  --dpo_rounds 1 --mbr_candidates 0 --grpo_recipe "" --reward_recipe "" \
  --extra sft:--learning_rate=3e-4 dpo:--beta=0.3 "pairs:--chosen_sources policy" "candidates:--seed=$n" \
  "dpo:--seed=$n" "control:--seed=$n" ${DRY_RUN:+--dry_run true} "$@"
