"""The main job's report: mean SCS on the held-out split for every baseline and adapter, as Markdown + PNG + JSON.

Rows: the constant "Improve the text to this.", the mean prompt, the base model zero-shot, the SFT adapter, the
DPO adapter, and the DPO adapter with the mean prompt appended (as top competition solutions did).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from promptrec.evaluation import bootstrap_ci
from promptrec.postprocess import DEFAULT_MEAN_PROMPT, PostprocessConfig, postprocess
from promptrec.predict import resolve_mean_prompt
from promptrec.tables import write_json

# Data sizes and steps per preset. "small" is the main job on 2 CPU cores (21.5 min measured); "tiny" is CI's smoke;
# "full" is for a GPU (all triplets, real training lengths).
SIZES = {
    "tiny": {"max_triplets": 16, "rewrite_new_tokens": 48, "max_heldout": 6, "mean_prompt_steps": 2,
             "sft_steps": 2, "dpo_steps": 2, "policy_samples": 2, "eval_samples": 4,
             "candidate_triplets": 12},
    "small": {"max_triplets": 120, "rewrite_new_tokens": 96, "max_heldout": 40, "mean_prompt_steps": 8,
              "sft_steps": 30, "dpo_steps": 12, "policy_samples": 4, "eval_samples": 16,
              "candidate_triplets": 60},
    "full": {"max_triplets": None, "rewrite_new_tokens": 320, "max_heldout": 1000, "mean_prompt_steps": 16,
             "sft_steps": 1500, "dpo_steps": 600, "policy_samples": 6, "eval_samples": 500,
             "candidate_triplets": None},
}


def comparison_predictions(run_dir: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Truth rows of the held-out split and, per method, its prediction for each row (in truth order)."""
    truth = pd.read_csv(run_dir / "split" / "truth.csv")
    mean_file = run_dir / "mean_prompt" / "mean_prompt.json"
    mean = resolve_mean_prompt(str(mean_file)) if mean_file.exists() else DEFAULT_MEAN_PROMPT

    def preds(name: str) -> list[str]:
        sub = pd.read_csv(run_dir / "predict" / f"{name}.csv").set_index("id")
        return [str(sub.loc[i, "rewrite_prompt"]) for i in truth["id"]]

    dpo = preds("dpo")
    with_mean = PostprocessConfig(mean_prompt=mean, append_mean_prompt=True)
    methods = {
        f'constant "{DEFAULT_MEAN_PROMPT}"': [DEFAULT_MEAN_PROMPT] * len(truth),
        "mean prompt": [mean] * len(truth),
        "base model, zero-shot": preds("base"),
        "SFT adapter": preds("sft"),
        "DPO adapter": dpo,
        "DPO adapter + mean prompt": [postprocess(p, with_mean) for p in dpo],
    }
    return truth, methods


def build_report(run_dir: Path, scorer_name: str, out_dir: Path) -> dict:
    """Score every method against the truth; write report.md, report.png, report.json; return them with the table."""
    from promptrec.scoring import Scorer

    truth, methods = comparison_predictions(run_dir)
    scorer = Scorer(scorer_name)
    rows = []
    for name, predictions in methods.items():
        scores = scorer.score(predictions, list(truth["rewrite_prompt"]))
        low, high = bootstrap_ci(scores, seed=0)
        rows.append({"method": name, "mean_scs": float(np.mean(scores)), "ci_low": low, "ci_high": high,
                     "example": predictions[0]})
    table = ["| method | mean SCS | 95% CI |", "|---|---:|---|"]
    table += [f"| {r['method']} | {r['mean_scs']:.4f} | {r['ci_low']:.3f} – {r['ci_high']:.3f} |" for r in rows]
    table = "\n".join(table)
    config = json.loads((run_dir / "pipeline_config.json").read_text())
    identity = scorer.identity
    md = [f"# Prompt recovery: held-out comparison ({run_dir.name})", "",
          f"{len(truth)} held-out rows whose prompts no stage trained on; scorer {identity['model']} "
          f"(SCS = cos^{identity['exponent']:g}); base model `{config['model']}`, size `{config['size']}`.", "",
          table, "", "![mean SCS per method](report.png)", "",
          "First held-out row's predictions:", ""]
    md += [f"- **{r['method']}**: {r['example'][:200]}" for r in rows]
    md += ["", f"True prompt: {truth['rewrite_prompt'].iloc[0]}"]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    _plot(rows, out_dir / "report.png", identity)
    write_json({"rows": rows, "n": len(truth), "scorer": identity, "config": config}, out_dir / "report.json")
    return {"rows": rows, "table": table}


def _plot(rows: list[dict], path: Path, identity: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    means = [r["mean_scs"] for r in rows]
    err = [[m - r["ci_low"] for m, r in zip(means, rows)], [r["ci_high"] - m for m, r in zip(means, rows)]]
    ax.barh([r["method"] for r in rows][::-1], means[::-1], xerr=[e[::-1] for e in err], color="#4c72b0",
            capsize=3)
    ax.set_xlabel(f"mean SCS on held-out prompts ({Path(str(identity['model'])).name}, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
