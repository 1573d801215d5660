"""Issue 24's margin-aware reward model against the plain one, on validation rows only (the protocol is fixed in
docs/reward_model.md, "The margin-aware variant").

    python scripts/rm_margin.py --run checkpoints/pipeline/real_gemma_rm

Retrains the run's reward model with the pipeline's own command (``<run>/reward/stage.json``) plus ``--margin true``
into ``<output_dir>/model`` (skipped when it exists; a killed training resumes from its last checkpoint), scores
the candidates the run's validation decode recorded (``<run>/predict/validation/mbr.raw.parquet``) with it, and
compares both reward models' rules on those same rows (:func:`promptrec.rerank.validation_choice`): RM rerank and
RM + MBR means, within-row Spearman, and the paired difference of the RM rerank picks (margin − plain,
prompt-cluster bootstrap). Writes ``<output_dir>/margin.json``.
Nothing here reads a test row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from promptrec import rerank as R  # noqa: E402
from promptrec.evaluation import bootstrap_ci  # noqa: E402
from promptrec.predict import load_rewarder  # noqa: E402
from promptrec.scoring import ScorerArguments  # noqa: E402
from promptrec.splits import CLUSTER_COLUMN  # noqa: E402
from promptrec.tables import write_json  # noqa: E402


def train_margin_model(run: Path, out: Path) -> Path:
    model = out / "model"
    if not (model / "adapter_model.safetensors").is_file():
        command = shlex.split(json.loads((run / "reward/stage.json").read_text())["commands"]["model"])
        command[command.index("--output_dir") + 1] = str(model)
        subprocess.run([*command, "--margin", "true", "--resume_from_checkpoint", "last"], check=True, cwd=REPO)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="checkpoints/pipeline/real_gemma_rm",
                        help="A run whose reward and predict stages are done.")
    parser.add_argument("--output_dir", default=None, help="Default: <run>_rm_margin.")
    args = parser.parse_args()
    run = Path(args.run)
    out = Path(args.output_dir or f"{run}_rm_margin")
    model = train_margin_model(run, out)

    raw = pd.read_parquet(run / "predict/validation/mbr.raw.parquet")
    validation = pd.read_parquet(run / "split/validation.parquet").set_index("id").loc[raw["id"]]
    truth = validation["rewrite_prompt"].tolist()
    candidates = [json.loads(c) for c in raw["candidates"]]
    rewards = load_rewarder(str(model)).score(validation["original_text"].tolist(),
                                              validation["rewritten_text"].tolist(), candidates)
    margin_raw = raw.assign(rewards=[json.dumps([float(x) for x in np.round(r, 9)]) for r in rewards])
    mean_prompt = json.loads((run / "mean_prompt/mean_prompt.json").read_text())["mean_prompt"]
    scorer = ScorerArguments(scorer="embedded").build()
    result = {name: R.validation_choice(frame, truth, scorer, mean_prompt)
              for name, frame in (("plain", raw), ("margin", margin_raw))}

    scores = scorer.score_candidates(candidates, truth)
    fallback = scorer.score([mean_prompt] * len(truth), truth)
    picked = {name: R.picked_scores(scores, R.rule_picks("rm", *R.recorded(frame)[1:]), fallback)
              for name, frame in (("plain", raw), ("margin", margin_raw))}
    diff = picked["margin"] - picked["plain"]
    groups = validation[CLUSTER_COLUMN].to_numpy() if CLUSTER_COLUMN in validation.columns else None
    low, high = bootstrap_ci(diff, 1000, seed=42, groups=groups)
    result["rm_margin_minus_plain"] = {"diff": float(diff.mean()), "ci_low": low, "ci_high": high}
    result["own_eval"] = {name: json.loads((m / "metrics.json").read_text()).get("ranking")
                          for name, m in (("plain", run / "reward/model"), ("margin", model))}
    write_json(result, out / "margin.json")
    for name in ("plain", "margin"):
        r = result[name]
        print(f"{name:>6}: rm {r['means']['rm']:.4f}  rm_mbr {r['hybrid_means']} (w {r['mbr_weight']})  "
              f"spearman {r['spearman_within_row']:.3f}  own eval {result['own_eval'][name]}")
    d = result["rm_margin_minus_plain"]
    print(f"rm rerank, margin − plain: {d['diff']:+.4f} ({d['ci_low']:+.4f} … {d['ci_high']:+.4f})")


if __name__ == "__main__":
    main()
