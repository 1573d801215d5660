"""Score a submission with the competition metric: mean SCS, a bootstrap interval, per-category means, a plot.

    python reward/evaluate.py --predictions submission.csv --truth truth.csv --output_dir checkpoints/eval/my_run
    python reward/evaluate.py --predictions sub.csv --truth truth.csv --scorer embedded --allow_blank

``--predictions``: ``id,rewrite_prompt``; ``--truth``: ``id,rewrite_prompt[,category|prompt_category]`` (ids may come
in any order). Writes ``report.md``, ``report.json``, ``scs_hist.png``, ``scores.csv`` (per row) and
``run_config.json`` into ``--output_dir``. Blank or missing predictions are an error, as in the competition, unless
``--allow_blank`` (they score 0 and are counted). The scorer defaults to ``auto``: sentence-t5-base when it can
be loaded, else the embedded all-MiniLM-L6-v2 (the report names the one used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptrec.cli import asdict_all, parse_args, run_main, setup_logging
from promptrec.evaluation import align_predictions, plot_histogram, report_markdown, summarise
from promptrec.scoring import ScorerArguments
from promptrec.tables import SUBMISSION_COLUMNS, read_table, write_json, write_table

logger = logging.getLogger("evaluate")


@dataclass
class EvaluateArguments:
    predictions: str = field(metadata={"help": "Submission (.csv/.jsonl/.parquet) with columns id,rewrite_prompt."})
    truth: str = field(metadata={"help": "Truth file with id,rewrite_prompt and optionally category/prompt_category."})
    output_dir: str = field(default="checkpoints/eval/latest", metadata={
        "help": "Where report.md, report.json, scs_hist.png, scores.csv and run_config.json go."})
    allow_blank: bool = field(default=False, metadata={
        "help": "Score blank or missing predictions 0 (and count them) instead of failing (as the competition "
                "rejects them)."})
    category_column: str | None = field(default=None, metadata={
        "help": "Truth column to group by; default: 'category' or 'prompt_category' when present."})
    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the interval."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the bootstrap interval."})
    seed: int = field(default=42, metadata={"help": "Bootstrap seed."})

    def __post_init__(self):
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), not {self.confidence}")
        if self.n_resamples < 1:
            raise ValueError("n_resamples must be >= 1")


def main(script_args: EvaluateArguments, scorer_args: ScorerArguments) -> dict:
    # ── setup ──
    setup_logging()
    out = Path(script_args.output_dir)
    logger.info("Config: %s", asdict_all(script_args, scorer_args))

    # ── data ──
    predictions = read_table(script_args.predictions, required=SUBMISSION_COLUMNS)
    truth = read_table(script_args.truth, required=SUBMISSION_COLUMNS, text_columns=("rewrite_prompt",))
    rows = align_predictions(predictions, truth, script_args.allow_blank, script_args.category_column,
                             pred_name=script_args.predictions, truth_name=script_args.truth)
    logger.info("%d rows, %d blank", len(rows), int(rows["blank"].sum()))

    # ── score ── (blank rows score 0 and are never embedded)
    scorer = scorer_args.build()
    scores = np.zeros(len(rows))
    filled = ~rows["blank"].to_numpy()
    scores[filled] = scorer.score(rows.loc[filled, "prediction"].tolist(), rows.loc[filled, "truth"].tolist())

    # ── report ──
    report = summarise(rows, scores, scorer.identity, script_args.n_resamples, script_args.confidence,
                       script_args.seed)
    report.update(predictions=script_args.predictions, truth=script_args.truth)
    plot_histogram(scores, out / "scs_hist.png", title=f"SCS per row ({scorer.identity['model']})")
    write_table(rows.assign(scs=scores), out / "scores.csv")
    write_json(report, out / "report.json")
    (out / "report.md").write_text(report_markdown(report, rows, scores, plot_name="scs_hist.png"), encoding="utf-8")
    write_json({**asdict_all(script_args, scorer_args), "scorer": scorer.identity}, out / "run_config.json")
    ci = report["ci"]
    logger.info("mean SCS %.4f (%.0f%% CI %.4f–%.4f) over %d rows → %s", report["mean_scs"],
                100 * ci["confidence"], ci["low"], ci["high"], report["n"], out / "report.md")
    return report


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(EvaluateArguments, ScorerArguments)))
