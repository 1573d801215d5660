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
from arguments import STAGES  # pipeline/arguments.py, cache.py and paths.py, beside this script
from cache import read_record
from paths import RunPaths

from promptrec.drift import drift_summary
from promptrec.environment import NOT_RECORDED, describe_environment, environment_line
from promptrec.evaluation import bootstrap_ci, ratio_ci
from promptrec.model_card import write_model_card
from promptrec.plots import figure
from promptrec.postprocess import DEFAULT_MEAN_PROMPT, PostprocessConfig, postprocess, resolve_mean_prompt
from promptrec.rerank import ROWS as REWARD_ROWS
from promptrec.scoring import Scorer
from promptrec.splits import CLUSTER_COLUMN
from promptrec.tables import write_json

# Report rows by stable id: display label and what the method is. Files, seeds.py and report.json use the ids.
ROWS = {
    "constant": (f'constant "{DEFAULT_MEAN_PROMPT}"', "the same prompt for every row, the competition's baseline"),
    "mean_prompt": ("mean prompt", "one prompt for every row, found by beam search on the train prompts "
                                   "(reward/mean_prompt.py)"),
    "base": ("base model, zero-shot", "the untrained base model, greedy, asked for the prompt in the recovery format"),
    "sft": ("SFT adapter", "QLoRA/LoRA supervised fine-tuning on the train triplets (sft/train.py), greedy"),
    "dpo": ("DPO adapter", "the SFT adapter trained further on SCS-ranked on-policy pairs (dpo/train.py); what ships "
                           "is the round's validation pick among SFT, its checkpoints and SFT↔DPO interpolations "
                           "(dpo/select_adapter.py), greedy"),
    "dpo_mean": ("DPO adapter + mean prompt", "the DPO adapter's prediction with the mean prompt appended, as top "
                                              "solutions did"),
    "iterate": ("iterative DPO adapter", "further DPO rounds, each on the previous round's pick's own samples of "
                                         "fresh train triplets, from that pick, each round's pick chosen on "
                                         "validation (pipeline --dpo_rounds), greedy"),
    "control": ("SFT, continued (compute-matched)", "the SFT adapter trained further with the SFT recipe on train "
                "rows no DPO round sampled, for the DPO stages' wall time; its checkpoint chosen on validation like "
                "DPO's (pipeline --control)"),
    "grpo": ("GRPO adapter", "the SFT adapter trained online with the SCS reward on its own samples (dpo/grpo.py), "
                             "greedy"),
    "mbr": ("MBR decoding", "the last DPO adapter's greedy answer, N samples and the mean prompt; the one with the "
                            "highest mean SCS to the others is submitted (inference/predict.py --selection mbr)"),
    "rm": ("RM rerank", "among the MBR row's candidates (same N samples), the one the learned reward model scores "
                        "highest (reward/train_rm.py on round 1's candidates, the true prompt never chosen)"),
    "rm_mbr": ("RM + MBR", "among the same candidates, the highest z(reward) + w·z(MBR score), w chosen on validation "
                           "rows (predict/rerank.json)"),
    "oracle": ("oracle: best of the same N by truth", "among the same candidates, the one with the highest SCS "
                                                      "against the true prompt: an upper bound, not a method"),
}
# The stages whose output each row depends on (the report names the invocation that produced each).
PRODUCED_BY = {"constant": (), "mean_prompt": ("split", "mean_prompt"), "base": ("split", "predict"),
               "sft": ("split", "sft", "predict"), "dpo": ("split", "sft", "candidates", "pairs", "dpo", "predict"),
               "dpo_mean": ("split", "mean_prompt", "sft", "candidates", "pairs", "dpo", "predict"),
               "iterate": ("split", "sft", "candidates", "pairs", "dpo", "iterate", "predict"),
               "control": ("split", "sft", "candidates", "pairs", "dpo", "iterate", "control", "predict"),
               "grpo": ("split", "sft", "grpo", "predict"),
               "mbr": ("split", "sft", "candidates", "pairs", "dpo", "iterate", "predict")}
PRODUCED_BY |= {row: (*PRODUCED_BY["mbr"], "reward") for row in REWARD_ROWS}


def row_label(row: str, info: dict | None = None) -> str:
    """The display label of report row ``row`` (``info``: its entry in predict/rows.json)."""
    info, label = info or {}, ROWS[row][0]
    if row == "iterate" and info.get("dpo_rounds"):
        return f"{label} ({info['dpo_rounds']} rounds)"
    if row in ("mbr", *REWARD_ROWS) and info:
        return f"{label} ({info['greedy']}, N={info['num_candidates']})"
    return label


def predicted_rows(run_dir: Path) -> dict[str, dict]:
    """predict/rows.json (row id → adapter, selection…); for a run without it, the greedy rows whose files exist."""
    paths = RunPaths(run_dir)
    if paths.predicted_rows.is_file():
        return json.loads(paths.predicted_rows.read_text())
    return {row: {} for row in ("base", "sft", "dpo", "iterate", "control", "grpo") if paths.prediction(row).is_file()}


def comparison_predictions(run_dir: Path) -> tuple[pd.DataFrame, dict[str, list[str]], dict[str, str]]:
    """Truth rows of the held-out split; per row id, its prediction for each held-out row (in truth order); per row
    id, its display label."""
    paths = RunPaths(run_dir)
    truth = pd.read_parquet(paths.heldout)
    mean = resolve_mean_prompt(str(paths.mean_prompt)) if paths.mean_prompt.exists() else DEFAULT_MEAN_PROMPT

    def preds(row: str) -> list[str]:
        sub = pd.read_csv(paths.prediction(row)).set_index("id")
        return [str(sub.loc[i, "rewrite_prompt"]) for i in truth["id"]]

    predicted = predicted_rows(run_dir)
    methods = {"constant": [DEFAULT_MEAN_PROMPT] * len(truth), "mean_prompt": [mean] * len(truth)}
    methods |= {row: preds(row) for row in predicted}
    if "dpo" in methods:
        with_mean = PostprocessConfig(mean_prompt=mean, append_mean_prompt=True)
        methods["dpo_mean"] = [postprocess(p, with_mean) for p in methods["dpo"]]
    order = [row for row in ROWS if row in methods]
    return truth, {row: methods[row] for row in order}, {row: row_label(row, predicted.get(row)) for row in order}


def paired(scores: np.ndarray, reference: np.ndarray, groups=None) -> tuple[float, float, float]:
    """Mean paired difference ``scores - reference`` (same rows) and its 95% bootstrap interval (resampling
    ``groups`` when given, see :func:`promptrec.evaluation.bootstrap_ci`)."""
    diff = np.asarray(scores) - np.asarray(reference)
    low, high = bootstrap_ci(diff, seed=0, groups=groups)
    return float(diff.mean()), low, high


def row_groups(truth: pd.DataFrame):
    """What the bootstrap resamples: the prompt cluster of each row when the split recorded it, else None (rows)."""
    return truth[CLUSTER_COLUMN].to_numpy() if CLUSTER_COLUMN in truth.columns else None


def score_methods(truth: pd.DataFrame, methods: dict[str, list[str]], scorer, labels: dict[str, str]) -> list[dict]:
    """Per row id: mean SCS with its 95% CI, the paired difference to the SFT adapter with its CI, per-row scores."""
    scores = {row: scorer.score(p, list(truth["rewrite_prompt"])) for row, p in methods.items()}
    sft, groups = scores.get("sft"), row_groups(truth)
    rows = []
    for row, predictions in methods.items():
        low, high = bootstrap_ci(scores[row], seed=0, groups=groups)
        diff = paired(scores[row], sft, groups) if sft is not None and row != "sft" else (None, None, None)
        rows.append({"id": row, "method": labels[row], "mean_scs": float(np.mean(scores[row])), "ci_low": low,
                     "ci_high": high, "vs_sft": diff[0], "vs_sft_low": diff[1], "vs_sft_high": diff[2],
                     "scores": scores[row].tolist(), "predictions": list(predictions)})
    return rows


def fallbacks(run_dir: Path, row: str) -> int | None:
    """Rows whose model answer was unusable and got the mean prompt instead, as the predict step recorded them in
    ``predict/<row>.config.json``; None for rows no model predicted (or a run that did not record it)."""
    path = RunPaths(run_dir).prediction("dpo" if row == "dpo_mean" else row).with_suffix(".config.json")
    return json.loads(path.read_text()).get("fallbacks") if path.is_file() else None


def cards(run_dir: Path, rows: list[dict], n: int) -> None:
    """Each greedy adapter row's held-out SCS, with its CI, into that adapter's model card (README.md)."""
    predicted = predicted_rows(run_dir)
    for r in rows:
        info = predicted.get(r["id"], {})
        adapter = info.get("adapter")
        if adapter and info.get("selection") == "greedy" and (Path(adapter) / "run_config.json").is_file():
            measured = {k: r[k] for k in ("mean_scs", "ci_low", "ci_high")}
            write_model_card(adapter, measured={**measured, "n": n,
                                                        "where": f"held-out SCS, main-job report of {run_dir.name}"})


def produced_by(run_dir: Path) -> dict[str, dict]:
    """Per stage: the invocation (start time) and pipeline arguments that produced it, from its ``stage.json``."""
    records = {stage: read_record(Path(run_dir) / stage) for stage in STAGES if stage != "report"}
    return {stage: {"invocation": r["invocation"], "config": r["config"]} for stage, r in records.items() if r}


def provenance_lines(stages: dict[str, dict], rows: list[dict]) -> list[str]:
    """Markdown: which invocation produced each row's stages, and how the invocations' arguments differ."""
    if not stages:
        return []
    invocations = sorted({s["invocation"] for s in stages.values()})
    if len(invocations) == 1:
        return [f"Every stage was produced by one invocation ({invocations[0]}); its arguments are in each stage's "
                "`stage.json` and in report.json.", ""]
    latest = next(s["config"] for s in stages.values() if s["invocation"] == invocations[-1])
    lines = [f"Stages come from {len(invocations)} invocations (a stage re-runs only when its settings or inputs "
             "changed):", ""]
    for inv in invocations:
        config = next(s["config"] for s in stages.values() if s["invocation"] == inv)
        differ = ("the latest: the lines above list where an earlier one's arguments differ from it"
                  if inv == invocations[-1] else ", ".join(f"{k}={v}" for k, v in config.items()
                                                          if latest.get(k) != v) or "same arguments as the latest")
        lines.append(f"- {inv}: {', '.join(n for n, s in stages.items() if s['invocation'] == inv)} ({differ})")
    lines += ["", "| row | invocations of its stages |", "|---|---|"]
    for r in rows:
        made = sorted({stages[s]["invocation"] for s in PRODUCED_BY[r["id"]] if s in stages})
        lines.append(f"| {r['method']} | {', '.join(made) or '—'} |")
    return lines + [""]


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


def selection_lines(run_dir: Path) -> list[str]:
    """The report's section on the choices made on validation: every DPO round's candidates and its pick."""
    rounds = sorted(Path(run_dir).glob("iterate/round*/dpo/selected/selection.json"),
                    key=lambda f: int(f.parents[2].name.removeprefix("round")))
    found = [f for f in (Path(run_dir) / "dpo" / "selected" / "selection.json", *rounds,
                         Path(run_dir) / "control" / "selected" / "selection.json") if f.is_file()]
    if not found:
        return []
    md = ["Choices made on validation rows (never on the held-out rows above), per DPO round and for the control "
          "(dpo/select_adapter.py; rule fixed in docs/po_selection.md):", "",
          "| round | candidate | validation SCS | − SFT, paired (95% CI) | top opening word (share; SFT's) | |",
          "|---|---|---:|---|---|---|"]
    for path in found:
        sel = json.loads(path.read_text())
        where = ("control" if path.parents[1].name == "control" else
                 path.parents[2].name if path.parents[3].name == "iterate" else "round1")
        for row in sel["validation"]:
            d = row.get("drift", {})
            md.append(f"| {where} | {row['name']} | {row['mean']:.4f} | {row['diff_vs_sft']:+.4f} "
                      f"({row['ci_low']:+.3f} … {row['ci_high']:+.3f}) | {d.get('top_word', '?')} "
                      f"({d.get('top_share', 0):.0%}; {d.get('reference', {}).get('top_share', 0):.0%}) | "
                      f"{'**picked**' if row['name'] == sel['picked'] else ''} |")
        md.append(f"| {where} | {sel['n_validation']} validation rows, {sel['seconds_per_candidate']:.0f} s a "
                  f"candidate | | | | {sel['reason']} |")
    return md + [""]


def drift_lines(rows: list[dict]) -> list[str]:
    """Opening-word drift of each greedy row's held-out predictions against SFT's (docs/po_selection.md's flag)."""
    by_id = {r["id"]: r for r in rows}
    if "sft" not in by_id:
        return []
    out = []
    for r in rows:
        if r["id"] in ("dpo", "iterate", "control", "grpo", "mbr"):
            d = r["drift"] = drift_summary(r["predictions"], by_id["sft"]["predictions"])
            out.append(f"- {r['method']}: top opening '{d['top_word']}' in {d['top_share']:.0%} of answers (SFT's "
                       f"top: '{d['reference']['top_word']}' {d['reference']['top_share']:.0%}); entropy "
                       f"{d['entropy_nats']:.2f} nats (SFT {d['reference']['entropy_nats']:.2f})"
                       f"{' — DRIFT: more than twice SFT' if d['doubled'] else ''}")
    return ["Opening words of the held-out answers:", "", *out, ""] if out else []


def headroom_lines(run_dir: Path, by_id: dict[str, dict], groups) -> list[str]:
    """Markdown: the share of the oracle's headroom over greedy that each reranking row recovers, (row − greedy) /
    (oracle − greedy) of the means, with a 95% bootstrap interval, and what the validation rows chose
    (docs/reward_model.md)."""
    greedy = predicted_rows(run_dir)["rm"]["greedy"]
    paths = RunPaths(run_dir)
    chosen = json.loads(paths.rerank.read_text())["validation"] if paths.rerank.is_file() else None
    base, oracle = np.array(by_id[greedy]["scores"]), np.array(by_id["oracle"]["scores"])
    lines = []
    for row in ("mbr", "rm", "rm_mbr"):
        if row in by_id:
            gain, headroom = np.array(by_id[row]["scores"]) - base, oracle - base
            if headroom.mean() <= 0:  # no headroom to recover: no share
                by_id[row]["headroom_share"] = None
                lines.append(f"- {by_id[row]['method']}: — (the oracle is no better than {by_id[greedy]['method']})")
                continue
            low, high = ratio_ci(gain, headroom, groups=groups)
            share = float(gain.mean() / headroom.mean())
            by_id[row]["headroom_share"] = {"mean": share, "low": None if np.isnan(low) else low,
                                            "high": None if np.isnan(high) else high}
            interval = "undefined" if np.isnan(low) else f"{low:.0%} … {high:.0%}"
            lines.append(f"- {by_id[row]['method']}: {share:.0%} of the oracle's headroom over "
                         f"{by_id[greedy]['method']} (95% CI {interval})")
    if chosen:
        means = ", ".join(f"{rule} {m:.4f}" for rule, m in chosen["means"].items())
        rho = chosen["spearman_within_row"]
        lines.append(f"- Chosen on {chosen['rows']} validation rows: MBR weight w = {chosen['mbr_weight']:g} of "
                     f"{', '.join(chosen['hybrid_means'])} (validation means: {means}); Spearman of reward with true "
                     f"SCS within a row's candidates: {'—' if rho is None else f'{rho:+.3f}'}")
    return ["Share of the oracle headroom recovered (same candidates):", "", *lines, ""]


def _fmt_diff(r: dict) -> str:
    return "—" if r["vs_sft"] is None else f"{r['vs_sft']:+.4f} ({r['vs_sft_low']:+.3f} … {r['vs_sft_high']:+.3f})"


def _cell(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[:width - 1] + "…"


def latest_invocation(run_dir: Path) -> dict:
    """The arguments of the run folder's last recorded invocation (``invocations.jsonl``; an old folder's
    ``pipeline_config.json``), for stages whose record holds none; {} when neither exists."""
    history, old = RunPaths(run_dir).history, Path(run_dir) / "pipeline_config.json"
    if history.is_file() and history.read_text(encoding="utf-8").strip():
        return json.loads(history.read_text(encoding="utf-8").strip().splitlines()[-1])["config"]
    return json.loads(old.read_text(encoding="utf-8")) if old.is_file() else {}


def build_report(run_dir: Path, scorer_name: str, out_dir: Path) -> dict:
    """Score every method against the truth; write report.md, report.png, report.json; return them with the table."""
    truth, methods, labels = comparison_predictions(run_dir)
    scorer = Scorer(scorer_name)
    rows = score_methods(truth, methods, scorer, labels)
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        r["fallbacks"] = fallbacks(run_dir, r["id"])
    table = ["| method | mean SCS | 95% CI | − SFT, paired (95% CI) | mean-prompt fallbacks |",
             "|---|---:|---|---|---:|"]
    table += [f"| {r['method']} | {r['mean_scs']:.4f} | {r['ci_low']:.3f} – {r['ci_high']:.3f} | {_fmt_diff(r)} | "
              f"{'—' if r['fallbacks'] is None else r['fallbacks']} |" for r in rows]
    table = "\n".join(table)
    stages = produced_by(run_dir)
    # the data came from the rewrite stage's invocation, the base model from SFT's (this one's for an old run folder)
    latest = latest_invocation(run_dir)
    data, model = (stages.get(s, {}).get("config", latest) for s in ("rewrite", "sft"))
    identity = scorer.identity
    source = ("bundled reference rewrites (promptrec/assets/reference_rewrites.jsonl)"
              if data.get("triplets") == "reference" and not data.get("generate") else
              f"`{data['triplets']}`" if data.get("triplets") and not data.get("generate") else
              f"rewrites generated by `{data.get('generator', data.get('model'))}` ({data.get('rewrite_recipe')})")
    groups = row_groups(truth)
    last_po = "iterate" if "iterate" in by_id else "dpo"  # the last DPO round
    pairs = [("sft", "base")] + ([("mbr", predicted_rows(run_dir)["mbr"]["greedy"])] if "mbr" in by_id else [])
    pairs += [(last_po, "control")] if "control" in by_id and last_po in by_id else []  # more PO or more SFT?
    if "rm" in by_id:  # issue 24's comparisons (docs/reward_model.md), all on the MBR row's samples
        greedy = predicted_rows(run_dir)["rm"]["greedy"]
        pairs += [("rm", greedy), ("rm_mbr", greedy), ("rm", "mbr"), ("oracle", greedy)]
    comparisons = {f"{a} − {b}": paired(np.array(by_id[a]["scores"]), np.array(by_id[b]["scores"]), groups)
                   for a, b in pairs}  # "a − b" (row ids) → paired mean difference and its 95% CI
    headroom = headroom_lines(run_dir, by_id, groups) if "rm" in by_id else []
    environment = ran_on(run_dir)
    md = [f"# Prompt recovery: held-out comparison ({run_dir.name})", "",
          f"Data: {source}. {len(truth)} held-out rows ({truth['rewrite_prompt'].nunique()} prompts) held out by "
          f"prompt {stages.get('split', {}).get('config', latest).get('split_by', 'prompt')}: no stage trained on "
          f"them or on their near-duplicates. Scorer {identity['model']} (SCS = cos^{identity['exponent']:g}); base "
          f"model `{model['model']}`, size `{model['size']}`. Intervals: 95% bootstrap over "
          f"{'prompt clusters' if groups is not None else 'rows'}; paired differences are over the same rows.", "",
          f"Ran on: {environment_line(environment)}.", "",
          table, "", *[f"{labels[a]} − {labels[b]}, paired: {m:+.4f} (95% CI {lo:+.3f} … {hi:+.3f}).  "
                       for (a, b), (m, lo, hi) in zip(pairs, comparisons.values())], "", *headroom,
          "What each row is:", ""]
    md += [f"- **{r['method']}**: {ROWS[r['id']][1]}" for r in rows]
    md += ["", *selection_lines(run_dir), *drift_lines(rows), *provenance_lines(stages, rows),
           "![mean SCS per method](report.png)", ""]
    if "prompt_category" in truth.columns:
        md += [f"One held-out row per prompt category (true prompt → SFT / {labels[last_po]} predictions):", "",
               f"| category | true prompt | SFT | {labels[last_po]} |", "|---|---|---|---|"]
        for category, group in truth.reset_index(drop=True).groupby("prompt_category", sort=True):
            i = group.index[0]
            md.append(f"| {category} | {_cell(truth['rewrite_prompt'].iloc[i], 60)} | "
                      f"{_cell(by_id['sft']['predictions'][i], 60)} | {_cell(by_id[last_po]['predictions'][i], 60)} |")
    else:
        md += ["First held-out row's predictions:", ""]
        md += [f"- **{r['method']}**: {_cell(r['predictions'][0], 200)}" for r in rows]
        md += ["", f"True prompt: {truth['rewrite_prompt'].iloc[0]}"]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    cards(run_dir, rows, len(truth))
    _plot(rows, out_dir / "report.png", identity)
    summary = [{k: v for k, v in r.items() if k not in ("scores", "predictions")} | {"example": r["predictions"][0]}
               for r in rows]
    write_json({"rows": summary, "n": len(truth), "sft_minus_base": dict(zip(("mean", "low", "high"),
                                                                            comparisons["sft − base"])),
                "paired": {name: dict(zip(("mean", "low", "high"), v)) for name, v in comparisons.items()},
                "scorer": identity, "config": latest, "produced_by": stages, "environment": environment},
               out_dir / "report.json")
    return {"rows": summary, "table": table}


def _plot(rows: list[dict], path: Path, identity: dict) -> None:
    means = [r["mean_scs"] for r in rows]
    err = [[m - r["ci_low"] for m, r in zip(means, rows)], [r["ci_high"] - m for m, r in zip(means, rows)]]
    with figure(path, size=(8, 3.6), dpi=120) as (ax,):
        ax.barh([r["method"] for r in rows][::-1], means[::-1], xerr=[e[::-1] for e in err], color="#4c72b0",
                capsize=3)
        ax.set_xlabel(f"mean SCS on held-out prompts ({Path(str(identity['model'])).name}, 95% CI)")
