"""The main job's report: mean SCS on the held-out split for every baseline and adapter, as Markdown + PNG + JSON.

Rows: the constant "Improve the text to this.", the mean prompt, the base model zero-shot, the SFT adapter, the
DPO adapter, the DPO adapter with the mean prompt appended (as top competition solutions did), and when their stages
ran: iterative DPO, GRPO, and MBR decoding of the last DPO adapter. Intervals resample prompt clusters when the split
recorded them (rows that share a prompt are not independent), else rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from promptrec.environment import NOT_RECORDED, describe_environment, environment_line
from promptrec.evaluation import bootstrap_ci
from promptrec.plots import figure
from promptrec.postprocess import DEFAULT_MEAN_PROMPT, PostprocessConfig, postprocess, resolve_mean_prompt
from promptrec.tables import write_json

# Data sizes and steps per preset. "small" is the main job on 2 CPU cores; "tiny" is CI's smoke;
# "full" is for a GPU (all triplets, real training lengths).
SIZES = {
    "tiny": {"max_triplets": 16, "rewrite_new_tokens": 48, "max_heldout": 6, "mean_prompt_steps": 2,
             "sft_steps": 2, "dpo_steps": 2, "grpo_steps": 1, "policy_samples": 2, "eval_samples": 4,
             "candidate_triplets": 12},
    "small": {"max_triplets": 120, "rewrite_new_tokens": 96, "max_heldout": 120, "mean_prompt_steps": 8,
              "sft_steps": 40, "dpo_steps": 16, "grpo_steps": 8, "policy_samples": 4, "eval_samples": 16,
              "candidate_triplets": 64},
    "full": {"max_triplets": None, "rewrite_new_tokens": 320, "max_heldout": 1000, "mean_prompt_steps": 16,
             "sft_steps": 1500, "dpo_steps": 600, "grpo_steps": 300, "policy_samples": 6, "eval_samples": 500,
             "candidate_triplets": None},
}


# One line per report row: what the method is.
DESCRIPTIONS = {
    "constant": "the same prompt for every row, the competition's baseline",
    "mean prompt": "one prompt for every row, found by beam search on the train prompts (reward/mean_prompt.py)",
    "base model, zero-shot": "the untrained base model, greedy, asked for the prompt in the recovery format",
    "SFT adapter": "QLoRA/LoRA supervised fine-tuning on the train triplets (sft/train.py), greedy",
    "DPO adapter": "the SFT adapter trained further on SCS-ranked on-policy pairs (dpo/train.py), greedy",
    "DPO adapter + mean prompt": "the DPO adapter's prediction with the mean prompt appended, as top solutions did",
    "GRPO adapter": "the SFT adapter trained online with the SCS reward on its own samples (dpo/grpo.py), greedy",
    "iterative DPO adapter": "further DPO rounds, each on the previous round's own samples of fresh train triplets, "
                             "from that adapter (pipeline --dpo_rounds), greedy",
    "MBR decoding": "the last DPO adapter's greedy answer, N samples and the mean prompt; the one with the highest "
                    "mean SCS to the others is submitted (inference/predict.py --selection mbr)",
}


def describe(method: str) -> str:
    return DESCRIPTIONS.get(method.split(' "')[0].split(" (")[0], "")


def comparison_predictions(run_dir: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Truth rows of the held-out split and, per method, its prediction for each row (in truth order)."""
    truth = pd.read_parquet(run_dir / "split" / "heldout.parquet")
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
    if (run_dir / "predict" / "iterate.csv").exists():
        rounds = json.loads((run_dir / "pipeline_config.json").read_text()).get("dpo_rounds")
        methods[f"iterative DPO adapter ({rounds} rounds)"] = preds("iterate")
    if (run_dir / "predict" / "grpo.csv").exists():
        methods["GRPO adapter"] = preds("grpo")
    if (run_dir / "predict" / "mbr.csv").exists():
        mbr = json.loads((run_dir / "predict" / "mbr.json").read_text())
        methods[f"MBR decoding ({mbr['greedy']}, N={mbr['num_candidates']})"] = preds("mbr")
    return truth, methods


def paired(scores: np.ndarray, reference: np.ndarray, groups=None) -> tuple[float, float, float]:
    """Mean paired difference ``scores - reference`` (same rows) and its 95% bootstrap interval (resampling
    ``groups`` when given, see :func:`promptrec.evaluation.bootstrap_ci`)."""
    diff = np.asarray(scores) - np.asarray(reference)
    low, high = bootstrap_ci(diff, seed=0, groups=groups)
    return float(diff.mean()), low, high


def row_groups(truth: pd.DataFrame):
    """What the bootstrap resamples: the prompt cluster of each row when the split recorded it, else None (rows)."""
    from promptrec.splits import CLUSTER_COLUMN

    return truth[CLUSTER_COLUMN].to_numpy() if CLUSTER_COLUMN in truth.columns else None


def greedy_of(mbr_method: str, methods) -> str:
    """The greedy row of the policy an "MBR decoding (<stage>, N=…)" row decoded (its paired comparison)."""
    stage = mbr_method.split("(", 1)[1].split(",")[0]
    return next(m for m in methods if m.startswith("iterative DPO" if stage == "iterate" else "DPO adapter"))


def score_methods(truth: pd.DataFrame, methods: dict[str, list[str]], scorer) -> list[dict]:
    """Per method: mean SCS with its 95% CI, the paired difference to the SFT adapter with its CI, per-row scores."""
    scores = {name: scorer.score(p, list(truth["rewrite_prompt"])) for name, p in methods.items()}
    sft, groups = scores.get("SFT adapter"), row_groups(truth)
    rows = []
    for name, predictions in methods.items():
        low, high = bootstrap_ci(scores[name], seed=0, groups=groups)
        diff = (paired(scores[name], sft, groups) if sft is not None and name != "SFT adapter"
                else (None, None, None))
        rows.append({"method": name, "mean_scs": float(np.mean(scores[name])), "ci_low": low, "ci_high": high,
                     "vs_sft": diff[0], "vs_sft_low": diff[1], "vs_sft_high": diff[2],
                     "scores": scores[name].tolist(), "predictions": list(predictions)})
    return rows


def recorded_dtypes(run_dir: Path) -> tuple[str, str]:
    """The training dtype the SFT run recorded (``sft/run_config.json``) and the generation dtype(s) the predict
    step recorded (``predict/*.config.json``), each under ``environment``; "not recorded" where a run lacks them."""

    def recorded(path: Path, key: str) -> str | None:
        return json.loads(path.read_text()).get("environment", {}).get(key) if path.is_file() else None

    training = recorded(run_dir / "sft" / "run_config.json", "training_dtype")
    generation = {recorded(path, "generation_dtype") for path in (run_dir / "predict").glob("*.config.json")}
    return training or NOT_RECORDED, ", ".join(sorted(filter(None, generation))) or NOT_RECORDED


def ran_on(run_dir: Path) -> dict:
    """The report's "Ran on" entry: :func:`promptrec.environment.describe_environment` at report time, with the
    dtypes the run's training and predict steps recorded (:func:`recorded_dtypes`)."""
    training, generation = recorded_dtypes(run_dir)
    return describe_environment(training_dtype=training, generation_dtype=generation)


def _fmt_diff(r: dict) -> str:
    return "—" if r["vs_sft"] is None else f"{r['vs_sft']:+.4f} ({r['vs_sft_low']:+.3f} … {r['vs_sft_high']:+.3f})"


def _cell(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[:width - 1] + "…"


def build_report(run_dir: Path, scorer_name: str, out_dir: Path) -> dict:
    """Score every method against the truth; write report.md, report.png, report.json; return them with the table."""
    from promptrec.scoring import Scorer

    truth, methods = comparison_predictions(run_dir)
    scorer = Scorer(scorer_name)
    rows = score_methods(truth, methods, scorer)
    by_name = {r["method"]: r for r in rows}
    table = ["| method | mean SCS | 95% CI | − SFT, paired (95% CI) |", "|---|---:|---|---|"]
    table += [f"| {r['method']} | {r['mean_scs']:.4f} | {r['ci_low']:.3f} – {r['ci_high']:.3f} | {_fmt_diff(r)} |"
              for r in rows]
    table = "\n".join(table)
    config = json.loads((run_dir / "pipeline_config.json").read_text())
    identity = scorer.identity
    source = ("bundled reference rewrites (promptrec/assets/reference_rewrites.jsonl)"
              if config.get("triplets") == "reference" and not config.get("generate") else
              f"`{config['triplets']}`" if config.get("triplets") and not config.get("generate") else
              f"rewrites generated by `{config.get('generator', config['model'])}` ({config.get('rewrite_recipe')})")
    groups = row_groups(truth)
    comparisons = {}  # "A − B" → paired mean difference and its 95% CI
    for a, b in [("SFT adapter", "base model, zero-shot")] + [
            (name, greedy_of(name, by_name)) for name in by_name if name.startswith("MBR decoding")]:
        comparisons[f"{a} − {b}"] = paired(np.array(by_name[a]["scores"]), np.array(by_name[b]["scores"]), groups)
    sft_base = comparisons["SFT adapter − base model, zero-shot"]
    environment = ran_on(run_dir)
    md = [f"# Prompt recovery: held-out comparison ({run_dir.name})", "",
          f"Data: {source}. {len(truth)} held-out rows ({truth['rewrite_prompt'].nunique()} prompts) held out by "
          f"prompt {config.get('split_by', 'prompt')}: no stage trained on them or on their near-duplicates. "
          f"Scorer {identity['model']} (SCS = cos^{identity['exponent']:g}); base model `{config['model']}`, size "
          f"`{config['size']}`. Intervals: 95% bootstrap over "
          f"{'prompt clusters' if groups is not None else 'rows'}; paired differences are over the same rows.", "",
          f"Ran on: {environment_line(environment)}.", "",
          table, "", *[f"{name}, paired: {m:+.4f} (95% CI {lo:+.3f} … {hi:+.3f}).  "
                       for name, (m, lo, hi) in comparisons.items()], "", "What each row is:", ""]
    md += [f"- **{r['method']}**: {describe(r['method'])}" for r in rows]
    md += ["", "![mean SCS per method](report.png)", ""]
    if "prompt_category" in truth.columns:
        last = next((m for m in by_name if m.startswith("iterative DPO")), "DPO adapter")  # the last DPO round
        md += [f"One held-out row per prompt category (true prompt → SFT / {last} predictions):", "",
               f"| category | true prompt | SFT | {last} |", "|---|---|---|---|"]
        for category, group in truth.reset_index(drop=True).groupby("prompt_category", sort=True):
            i = group.index[0]
            md.append(f"| {category} | {_cell(truth['rewrite_prompt'].iloc[i], 60)} | "
                      f"{_cell(by_name['SFT adapter']['predictions'][i], 60)} | "
                      f"{_cell(by_name[last]['predictions'][i], 60)} |")
    else:
        md += ["First held-out row's predictions:", ""]
        md += [f"- **{r['method']}**: {_cell(r['predictions'][0], 200)}" for r in rows]
        md += ["", f"True prompt: {truth['rewrite_prompt'].iloc[0]}"]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    _plot(rows, out_dir / "report.png", identity)
    summary = [{k: v for k, v in r.items() if k not in ("scores", "predictions")} | {"example": r["predictions"][0]}
               for r in rows]
    write_json({"rows": summary, "n": len(truth), "sft_minus_base": dict(zip(("mean", "low", "high"), sft_base)),
                "paired": {name: dict(zip(("mean", "low", "high"), v)) for name, v in comparisons.items()},
                "scorer": identity, "config": config, "environment": environment}, out_dir / "report.json")
    return {"rows": summary, "table": table}


def _plot(rows: list[dict], path: Path, identity: dict) -> None:
    means = [r["mean_scs"] for r in rows]
    err = [[m - r["ci_low"] for m, r in zip(means, rows)], [r["ci_high"] - m for m, r in zip(means, rows)]]
    with figure(path, size=(8, 3.6), dpi=120) as (ax,):
        ax.barh([r["method"] for r in rows][::-1], means[::-1], xerr=[e[::-1] for e in err], color="#4c72b0",
                capsize=3)
        ax.set_xlabel(f"mean SCS on held-out prompts ({Path(str(identity['model'])).name}, 95% CI)")
