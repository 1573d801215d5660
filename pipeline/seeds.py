"""Is a method's gain over SFT larger than training noise? Compare main-job runs that differ only in their seeds.

    python pipeline/seeds.py --runs checkpoints/pipeline/real_gemma_seed2 checkpoints/pipeline/real_gemma_s1 \\
        checkpoints/pipeline/real_gemma_s2 --known "42: dpo=-0.0129, iterate=+0.0296"

One report of ``pipeline/run.py`` has one training run per method, so its intervals cover which held-out prompts were
drawn, not how another seed of the same recipe would have trained. Given several runs on the same held-out split
(same config, other ``candidates:--seed``/``dpo:--seed``), this reports per method:

- each run's paired difference to that run's SFT adapter, with the bootstrap CI over prompt clusters of its report;
- **across runs**: the mean of those differences with a 95 % t-interval over runs (the training noise), including
  runs given only as numbers (``--known``, e.g. a run whose folder is gone);
- the per-row scores averaged over the runs with folders, paired against SFT with the cluster bootstrap;
- the seed-to-seed SD of the differences, and each run's opening-word drift of the method (its report's top opening
  word and share against SFT's, flagged when the share is more than twice SFT's: docs/po_selection.md).

Writes ``<output_dir>/seeds.md`` and ``seeds.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from comparison import comparison_predictions, paired, row_groups  # pipeline/comparison.py, beside this script

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.scoring import Scorer
from promptrec.tables import DataError, write_json


@dataclass
class SeedArguments:
    runs: list[str] = field(default_factory=list, metadata={
        "help": "Run folders of pipeline/run.py that share the held-out split (predict/ and split/ in each)."})
    methods: list[str] = field(default_factory=lambda: ["dpo", "iterate", "grpo"], metadata={
        "help": "Report row ids to compare with the SFT adapter: dpo, dpo_mean, iterate, grpo, mbr, base…"})
    baseline: str = field(default="sft", metadata={
        "help": "The row each method is paired against: sft, or e.g. control (SFT continued for the same time: "
                "docs/po_selection.md's secondary statistic)."})
    known: list[str] = field(default_factory=list, metadata={
        "help": "Runs given as numbers, 'LABEL: ROW=DIFF, ROW=DIFF': a report row's paired difference to the "
                "--baseline row (e.g. '42: dpo=-0.0129' against sft), for a run whose folder is gone."})
    scorer: str = field(default="embedded", metadata={"help": "SCS scorer (the runs' own: see their report.json)."})
    output_dir: str = field(default="checkpoints/pipeline/seeds", metadata={"help": "Where seeds.md/json go."})

    def __post_init__(self):
        if len(self.runs) + len(self.known) < 2:
            raise ValueError("give at least two runs (--runs and --known together)")


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its Student-t interval (NaN bounds with fewer than two values)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - float(half), mean + float(half)


def parse_known(entry: str) -> tuple[str, dict[str, float]]:
    """``"42: dpo=-0.0129, iterate=+0.0296"`` → ``("42", {"dpo": -0.0129, "iterate": 0.0296})``."""
    label, sep, rest = entry.partition(":")
    try:
        values = {name.strip(): float(value) for name, value in (p.split("=") for p in rest.split(",") if p.strip())}
    except ValueError:
        values = {}
    if not sep or not label.strip() or not values:
        raise DataError(f"--known {entry!r}: expected 'LABEL: ROW=DIFF, ROW=DIFF'")
    return label.strip(), values


def run_scores(runs: list[str], scorer, methods=(), baseline: str = "sft"
               ) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Per run: row id → per-row SCS on the held-out rows (the ``baseline`` row and the rows named by ``methods``);
    and the rows' prompt clusters. The runs must hold the same held-out rows in the same order (same split), else
    :class:`DataError` names the first run that differs."""
    per_run, ids, groups = [], None, None
    for run in runs:
        truth, predictions, _ = comparison_predictions(Path(run))
        if ids is None:
            ids, groups = list(truth["id"]), row_groups(truth)
        elif list(truth["id"]) != ids:
            raise DataError(f"{run}: its held-out rows differ from {runs[0]}'s; compare runs of one split only")
        wanted = {row: preds for row, preds in predictions.items() if row in (baseline, *methods)}
        per_run.append({name: scorer.score(preds, list(truth["rewrite_prompt"])) for name, preds in wanted.items()})
    return per_run, groups


def sd(values) -> float:
    """Sample standard deviation (NaN with fewer than two values): the seed-to-seed spread of a difference."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def read_report(run: str) -> dict:
    """The run's report.json ({} when it has none)."""
    report = Path(run) / "report.json"
    return json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}


def run_drift(report: dict, method: str) -> dict | None:
    """The method row's opening-word drift from the run's report (None when the report has none)."""
    drift = next((r.get("drift") for r in report.get("rows", []) if r.get("id") == method), None)
    if not drift:
        return None
    return {"top_word": drift["top_word"], "top_share": drift["top_share"],
            "sft_top_share": drift["reference"]["top_share"], "doubled": drift["doubled"]}


def run_machine(report: dict) -> str | None:
    """Where the run's report says it ran, in short: bf16 instructions yes/no and the SFT run's training dtype (runs
    of one experiment can come from machines that differ there, and their SFT adapters differ with it)."""
    env = report.get("environment")
    if not env:
        return None
    return f"bf16 CPU: {'yes' if env.get('cpu_bf16') else 'no'}, training {env.get('training_dtype') or '?'}"


def compare(args: SeedArguments, per_run: list[dict[str, np.ndarray]], groups) -> list[dict]:
    """Per method: each run's paired difference to the baseline (SFT), the across-run t-interval, the seed-averaged
    rows."""
    known, base = [parse_known(k) for k in args.known], args.baseline
    reports = [read_report(run) for run in args.runs]
    results = []
    for method in args.methods:
        runs = [{"run": Path(label).name, **dict(zip(("diff", "low", "high"),
                                                  paired(scores[method], scores[base], groups))),
                 "drift": run_drift(report, method), "ran_on": run_machine(report)}
                for label, scores, report in zip(args.runs, per_run, reports) if method in scores and base in scores]
        runs += [{"run": label, "diff": values[method], "low": None, "high": None}
                 for label, values in known if method in values]
        if len(runs) < 2:
            continue
        rows = [s[method] - s[base] for s in per_run if method in s and base in s]
        pooled = paired(np.mean(rows, axis=0), np.zeros(len(rows[0])), groups) if rows else (None, None, None)
        results.append({"method": method, "baseline": base, "runs": runs,
                        "across_runs": dict(zip(("mean", "low", "high"), t_interval([r["diff"] for r in runs])),
                                            sd=sd([r["diff"] for r in runs])),
                        "row_average": dict(zip(("mean", "low", "high"), pooled), n_runs=len(rows))})
    return results


def markdown(results: list[dict]) -> str:
    def ci(low, high):
        return "" if low is None or (isinstance(low, float) and math.isnan(low)) else f" ({low:+.3f} … {high:+.3f})"

    def drift(d):
        if not d:
            return ""
        flag = " **doubled**" if d["doubled"] else ""
        return f"{d['top_word']!r} {d['top_share']:.0%} (SFT's top word {d['sft_top_share']:.0%}){flag}"

    base = results[0].get("baseline", "sft") if results else "sft"
    lines = [f"| method | run | − {base}, paired (95% CI) | top opening word | ran on |", "|---|---|---|---|---|"]
    for r in results:
        lines += [f"| {r['method']} | {x['run']} | {x['diff']:+.4f}{ci(x['low'], x['high'])} | "
                  f"{drift(x.get('drift'))} | {x.get('ran_on') or ''} |" for x in r["runs"]]
        a, p = r["across_runs"], r["row_average"]
        spread = "" if math.isnan(a["sd"]) else f", SD {a['sd']:.4f}"
        lines.append(f"| **{r['method']}** | **mean of {len(r['runs'])} runs, t-interval over runs{spread}** | "
                     f"**{a['mean']:+.4f}{ci(a['low'], a['high'])}** | | |")
        if p["n_runs"]:
            lines.append(f"| {r['method']} | rows averaged over {p['n_runs']} runs, cluster bootstrap | "
                         f"{p['mean']:+.4f}{ci(p['low'], p['high'])} | | |")
    return "\n".join(lines) + "\n"


def main(args: SeedArguments) -> list[dict]:
    per_run, groups = run_scores(args.runs, Scorer(args.scorer), args.methods, args.baseline)
    results = compare(args, per_run, groups)
    if not results:
        raise DataError(f"none of {args.methods} is in two or more runs")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "seeds.md").write_text(f"# Across seeds: − {args.baseline} per run and over runs\n\n" + table,
                                  encoding="utf-8")
    write_json({"results": results, "config": asdict(args)}, out / "seeds.json")
    print(table, flush=True)
    return results


if __name__ == "__main__":
    setup_logging()
    (seed_args,) = parse_args(SeedArguments)
    run_main(lambda: main(seed_args))
