"""Issue 24's reward-labelled pairs (West-of-N) against SCS-labelled pairs, on validation rows only (the protocol is
fixed in docs/reward_model.md, "Reward-labelled pairs").

    python scripts/west_of_n.py --run checkpoints/pipeline/real_gemma_rm

From a pipeline run with a reward stage (``<run>/reward/model``): 160 train triplets that round 1 did not sample
(so the reward model never saw them), the SFT policy's own 4 samples each; pairs best against worst, labelled once
by SCS against the true prompt (arm ``scs``) and once by the reward model (arm ``reward``); DPO from SFT with the
run's round-1 settings plus ``--beta``; each final adapter scored greedily on the validation rows by
``dpo/select_adapter.py``. Every step is skipped when its output exists, so a killed run resumes. Writes
``<output_dir>/west_of_n.json`` and prints each arm's validation mean, reward − scs and each arm − SFT (paired,
prompt-cluster bootstrap), and how often the reward model's pair has the order SCS gives it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from po_loss_choice import final_predictions  # noqa: E402

from promptrec.evaluation import bootstrap_ci  # noqa: E402
from promptrec.scoring import ScorerArguments  # noqa: E402
from promptrec.splits import CLUSTER_COLUMN  # noqa: E402
from promptrec.tables import write_json, write_table  # noqa: E402

PY = sys.executable
ARMS = {"scs": [], "reward": ["--reward_model"]}  # the reward arm's flag takes <run>/reward/model
PAIRING = ["--config", "data_generation/configs/pairs_smollm2.yaml", "--strategy", "best_vs_worst",
           "--max_pairs_per_example", "1", "--min_margin", "0", "--rejected_sources", "policy"]


def step(done: Path, cmd: list) -> None:
    if not done.exists():
        subprocess.run([str(c) for c in cmd], check=True, cwd=REPO)


def fresh_triplets(run: Path, out: Path) -> Path:
    """The run's train triplets that round 1's candidates did not use (as the pipeline's round 2 draws them)."""
    path = out / "fresh_triplets.parquet"
    if not path.is_file():
        train = pd.read_parquet(run / "split/train.parquet")
        used = set(pd.read_parquet(run / "candidates/triplets.parquet")["id"])
        write_table(train[~train["id"].isin(used)], path)
    return path


def arm(run: Path, out: Path, name: str, candidates: Path, beta: float, steps: int) -> Path:
    pairs, dpo = out / name / "pairs", out / name / "dpo"
    flags = [*ARMS[name], run / "reward/model"] if ARMS[name] else []
    step(pairs / "summary.json", [PY, "data_generation/build_pairs.py", *PAIRING, "--candidates",
                                  candidates / "candidates.parquet", "--scorer", "embedded", "--output_dir", pairs,
                                  "--seed", 42, *flags])
    step(dpo / "adapter_model.safetensors",
         [PY, "dpo/train.py", "--config", "dpo/configs/smollm2.yaml", "--sft_adapter", run / "sft", "--train_pairs",
          pairs / "train.jsonl", "--eval_pairs", pairs / "eval.jsonl", "--max_steps", steps, "--scorer", "embedded",
          "--output_dir", dpo, "--max_eval_pairs", 16, "--eval_scs_samples", 16, "--save_strategy", "no",
          "--use_cpu", "true", "--bf16", "true", "--seed", 42, "--beta", beta])
    selected = dpo / "selected"
    step(selected / "selection.json",
         [PY, "dpo/select_adapter.py", "--sft_adapter", run / "sft", "--po_run", dpo, "--validation",
          run / "split/validation.parquet", "--mean_prompt", run / "mean_prompt/mean_prompt.json", "--scorer",
          "embedded", "--alphas", "", "--checkpoints", "false", "--output_dir", selected, "--seed", 42])
    return selected


def label_agreement(out: Path) -> dict:
    """How often the reward arm's pairs (chosen, rejected) have SCS(chosen) > SCS(rejected)."""
    scs = pd.read_parquet(out / "scs/pairs/scores.parquet")
    key = lambda i, text: (str(i), " ".join(str(text).split()))  # noqa: E731  as the pairs' answer turns have it
    score = {key(i, c): s for i, c, s in zip(scs["id"], scs["candidate"], scs["score"].astype(float))}
    pairs = pd.concat([pd.read_json(out / "reward/pairs" / f, lines=True) for f in ("train.jsonl", "eval.jsonl")])
    order = [score[key(i, c[-1]["content"])] > score[key(i, r[-1]["content"])]
             for i, c, r in zip(pairs["id"], pairs["chosen"], pairs["rejected"])]
    return {"pairs": len(order), "scs_agrees": float(np.mean(order)) if order else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="checkpoints/pipeline/real_gemma_rm",
                        help="A run whose sft, candidates and reward stages are done.")
    parser.add_argument("--output_dir", default=None, help="Default: <run>_west_of_n.")
    parser.add_argument("--beta", type=float, default=0.3, help="DPO beta (real_gemma.yaml's).")
    parser.add_argument("--steps", type=int, default=20, help="DPO steps (real_gemma.yaml's dpo_steps).")
    parser.add_argument("--triplets", type=int, default=160, help="Fresh train triplets (candidate_triplets).")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "reward/model/run_config.json").is_file():
        raise SystemExit(f"{run}/reward/model: no reward model (run the pipeline with a reward_recipe)")
    out = Path(args.output_dir or f"{run}_west_of_n")
    out.mkdir(parents=True, exist_ok=True)
    candidates = out / "candidates"
    step(candidates / "candidates.parquet",
         [PY, "data_generation/candidates.py", "--config", "data_generation/configs/candidates_smollm2.yaml",
          "--triplets", fresh_triplets(run, out), "--policy_adapter", run / "sft", "--sources", "policy",
          "--num_samples", 4, "--mean_prompt", run / "mean_prompt/mean_prompt.json", "--scorer", "embedded",
          "--limit", args.triplets, "--output_dir", candidates, "--seed", 42])
    selected = {name: arm(run, out, name, candidates, args.beta, args.steps) for name in ARMS}

    validation = pd.read_parquet(run / "split/validation.parquet")
    truth = validation["rewrite_prompt"].tolist()
    groups = validation[CLUSTER_COLUMN].to_numpy() if CLUSTER_COLUMN in validation.columns else None
    scorer = ScorerArguments(scorer="embedded").build()
    sft = pd.read_parquet(selected["scs"] / "validation_predictions.parquet")["pred_sft"].tolist()
    scores = {"sft": scorer.score(sft, truth)}
    scores |= {name: scorer.score(final_predictions(s), truth) for name, s in selected.items()}
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}

    def paired(a: str, b: str) -> dict:
        d = scores[a] - scores[b]
        low, high = bootstrap_ci(d, 1000, seed=42, groups=groups)
        return {"diff": float(d.mean()), "ci_low": low, "ci_high": high}

    result = {"n_validation": len(validation), "means": {k: float(v.mean()) for k, v in scores.items()},
              "reward_minus_scs": paired("reward", "scs"), "scs_minus_sft": paired("scs", "sft"),
              "reward_minus_sft": paired("reward", "sft"), "label_agreement": label_agreement(out),
              "pairs": {name: sum(1 for f in ("train.jsonl", "eval.jsonl")
                                  for _ in open(out / name / "pairs" / f, encoding="utf-8")) for name in ARMS},
              "beta": args.beta, "steps": args.steps}
    write_json(result, out / "west_of_n.json")
    for k, v in result["means"].items():
        print(f"{k:>7}: {v:.4f}")
    for k in ("reward_minus_scs", "scs_minus_sft", "reward_minus_sft"):
        r = result[k]
        print(f"{k}: {r['diff']:+.4f} ({r['ci_low']:+.4f} … {r['ci_high']:+.4f})")
    print(f"label agreement: {result['label_agreement']}; pairs {result['pairs']}")


if __name__ == "__main__":
    main()
