"""Benchmark the scorer: cached vs naive scoring of candidate lists, and the mean-prompt search time.

    python bench/bench_scoring.py --prompts ../shared/data/prompts.csv
    python bench/bench_scoring.py --prompts ../shared/data/prompts.csv --rows 200 --skip_mean_prompt  # quick

Rows are real prompts used as truths; each row gets ``candidates`` candidates shaped like
data_generation/candidates.py's: the truth itself, ``unique_per_row`` row-specific prompts (as a policy's samples
are) and the rest drawn from a shared bank of ``bank_size`` prompts (negatives, which repeat across rows). Naive
embeds each row's candidates and truth (no reuse across rows) in one batched call; cached is
``Scorer.score_candidates`` (each distinct string once; its time includes writing the on-disk cache). Prints the
two times, their ratio, the strings embedded and the largest score difference; then a fresh Scorer reading the
warm on-disk cache; then the mean-prompt search on ``mean_prompt_prompts`` prompts. The scorer is ``--scorer``
(default ``auto``: sentence-t5-base when loadable, else the embedded MiniLM).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.environment import describe_environment, environment_line
from promptrec.scoring import Scorer, ScorerArguments, scs
from promptrec.tables import DataError, read_table

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchArguments:
    prompts: str = field(default=str(REPO.parent / "shared" / "data" / "prompts.csv"), metadata={
        "help": "Prompt file (real prompts; ../shared/data/prompts.csv)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column."})
    rows: int = field(default=1000, metadata={"help": "Rows (truths) to score."})
    candidates: int = field(default=16, metadata={"help": "Candidates per row (truth + row-specific + bank)."})
    unique_per_row: int = field(default=3, metadata={"help": "Row-specific candidates per row (policy samples)."})
    bank_size: int = field(default=500, metadata={"help": "Shared negative bank the other candidates come from."})
    skip_scoring: bool = field(default=False, metadata={"help": "Only run the mean-prompt search timing."})
    skip_mean_prompt: bool = field(default=False, metadata={"help": "Only run the scoring benchmark."})
    mean_prompt_prompts: int = field(default=2000, metadata={"help": "Prompts for the mean-prompt search timing."})
    mean_prompt_steps: int = field(default=16, metadata={"help": "Search steps (reward/mean_prompt.py's default)."})
    mean_prompt_candidates: int = field(default=2000, metadata={"help": "Candidates scored per search step."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output: str | None = field(default=None, metadata={"help": "Also write the figures to this JSON file."})


def make_rows(prompts: list[str], args: BenchArguments, rng) -> tuple[list[str], list[list[str]]]:
    """Truths and their candidate lists: [truth, row-specific…, bank negatives…] per row."""
    n_bank = args.candidates - 1 - args.unique_per_row
    need = args.rows * (1 + args.unique_per_row) + args.bank_size
    if n_bank < 0 or len(prompts) < need:
        raise DataError(f"{args.prompts}: {len(prompts)} prompts, the benchmark needs {need} "
                        f"(and candidates >= 1 + unique_per_row)")
    order = rng.permutation(len(prompts))
    truths = [prompts[i] for i in order[: args.rows]]
    own = [prompts[i] for i in order[args.rows: args.rows * (1 + args.unique_per_row)]]
    bank = [prompts[i] for i in order[len(order) - args.bank_size:]]
    candidates = [[truths[r], *own[r * args.unique_per_row:(r + 1) * args.unique_per_row],
                   *(bank[i] for i in rng.choice(len(bank), n_bank, replace=False))] for r in range(args.rows)]
    return truths, candidates


def bench_scoring(args: BenchArguments, scorer_args: ScorerArguments, truths, candidates, model) -> dict:
    def fresh(cache_dir=None) -> Scorer:
        scorer = replace(scorer_args, scorer_cache_dir=cache_dir).build()
        scorer._model = model  # share the loaded weights: time the embedding, not the loading
        return scorer

    # Naive: row by row, each row's candidates and its truth embedded (no reuse across rows), batched together.
    flat = [text for row, truth in zip(candidates, truths) for text in (*row, truth)]
    start = time.perf_counter()
    vecs = model.encode(flat, batch_size=scorer_args.scorer_batch_size, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=True).reshape(len(truths), args.candidates + 1, -1)
    naive_scores = np.concatenate([scs(row[:-1], np.broadcast_to(row[-1], row[:-1].shape)) for row in vecs])
    naive_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        # Cached, with the on-disk cache on (its writes are included), then a fresh Scorer reading it back.
        scorer = fresh(cache_dir=tmp)
        start = time.perf_counter()
        cached_scores = np.concatenate(scorer.score_candidates(candidates, truths))
        cached_s = time.perf_counter() - start
        warm = fresh(cache_dir=tmp)
        start = time.perf_counter()
        warm.score_candidates(candidates, truths)
        disk_s = time.perf_counter() - start
    return {"rows": args.rows, "candidates_per_row": args.candidates, "naive_strings": len(flat),
            "cached_strings": scorer.n_embedded, "naive_s": round(naive_s, 2), "cached_s": round(cached_s, 2),
            "ratio": round(naive_s / cached_s, 2), "warm_disk_cache_s": round(disk_s, 3),
            "max_abs_score_diff": float(np.abs(naive_scores - cached_scores).max())}


def bench_mean_prompt(args: BenchArguments, scorer_args: ScorerArguments) -> dict:
    sys.path.insert(0, str(REPO / "reward"))
    from mean_prompt import MeanPromptArguments, main

    with tempfile.TemporaryDirectory() as tmp:
        mp_args = MeanPromptArguments(prompts=[args.prompts], prompt_column=args.prompt_column,
                                      max_prompts=args.mean_prompt_prompts, max_steps=args.mean_prompt_steps,
                                      max_candidates=args.mean_prompt_candidates, seed=args.seed,
                                      output=str(Path(tmp) / "mean_prompt.json"))
        start = time.perf_counter()
        out = main(mp_args, replace(scorer_args, scorer_cache_dir=None))
        elapsed = time.perf_counter() - start
    return {"prompts": out["n_train"] + out["n_val"], "steps": len(out["history"]), "seconds": round(elapsed, 1),
            "s_per_step": round(elapsed / max(1, len(out["history"])), 2), "n_evaluated": out["n_evaluated"],
            "mean_prompt": out["mean_prompt"], "train_scs": round(out["train_scs"], 4),
            "val_scs": round(out["val_scs"], 4), "baseline_val_scs": round(out["baseline"]["val_scs"], 4)}


def main(args: BenchArguments, scorer_args: ScorerArguments) -> dict:
    setup_logging()
    result = {"scorer": scorer_args.scorer, "environment": describe_environment()}
    print(environment_line(result["environment"]), flush=True)
    if not args.skip_scoring:
        table = read_table(args.prompts, required=[args.prompt_column], text_columns=[args.prompt_column])
        prompts = sorted({" ".join(p.split()) for p in table[args.prompt_column]})
        truths, candidates = make_rows(prompts, args, np.random.default_rng(args.seed))
        model = scorer_args.build().model
        model.encode(["warm-up"] * 8)
        result["device"] = str(model.device)
        result["scoring"] = s = bench_scoring(args, scorer_args, truths, candidates, model)
        print(f"scoring {s['rows']} rows x {s['candidates_per_row']} candidates ({scorer_args.scorer} on "
              f"{model.device}): naive {s['naive_s']}s ({s['naive_strings']} strings), cached {s['cached_s']}s "
              f"({s['cached_strings']} strings) -> {s['ratio']}x; warm disk cache {s['warm_disk_cache_s']}s; "
              f"max |diff| {s['max_abs_score_diff']:.1e}")
    if not args.skip_mean_prompt:
        result["mean_prompt"] = m = bench_mean_prompt(args, scorer_args)
        print(f"mean-prompt search on {m['prompts']} prompts: {m['seconds']}s for {m['steps']} steps "
              f"({m['s_per_step']}s/step, {m['n_evaluated']} candidates scored); train {m['train_scs']}, "
              f"val {m['val_scs']} vs constant {m['baseline_val_scs']}: {m['mean_prompt']!r}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(BenchArguments, ScorerArguments)))
