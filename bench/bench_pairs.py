"""Benchmark the two DPO-data steps: policy sampling (batched vs one at a time) and SCS ranking into pairs.

    python bench/bench_pairs.py                                  # 8 rows sampled, 1,000 triplets ranked (CPU)
    python bench/bench_pairs.py --policy_rows 4 --num_samples 2  # quicker on a busy CPU

Sampling: ``num_samples`` candidates per row from the embedded SmolLM2 with ``promptrec.generation.iter_generate``
on the shared recovery prompt, first ``batch_size`` rows per call, then one row per call; prints candidates/s and
the ratio. Ranking: for ``rank_triplets`` real Gemma triplets, the candidates the step makes without a policy
(true, mean, hard and random bank negatives from ``--bank``), scored by the Scorer (embedding included) and turned
into pairs by each strategy; prints candidates scored/s and pairs/s (the pairing alone and scoring + pairing).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.environment import describe_environment, environment_line
from promptrec.pairs import STRATEGIES, build_pairs
from promptrec.triplets import read_triplets

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@dataclass
class BenchArguments:
    triplets: str = field(default=str(SHARED / "triplets.csv"), metadata={"help": "Real triplets."})
    producers: list[str] = field(default_factory=lambda: ["mostly gemma-7b-it", "mixed: gemma-7b-it"], metadata={
        "help": "Producer prefixes to keep (the Gemma rows)."})
    bank: list[str] = field(default_factory=lambda: ["bank"], metadata={
        "help": "Prompt bank for negatives: 'bank' and/or files such as ../shared/data/prompts.csv."})
    bank_column: str = field(default="prompt", metadata={"help": "Prompt column of bank files."})
    policy_rows: int = field(default=8, metadata={"help": "Rows sampled in each sampling mode."})
    num_samples: int = field(default=2, metadata={"help": "Samples per row."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens per sample."})
    batch_size: int = field(default=8, metadata={"help": "Rows per call in the batched mode."})
    rank_triplets: int = field(default=1000, metadata={"help": "Triplets ranked into pairs."})
    scorer: str = field(default="embedded", metadata={"help": "Scorer model."})
    seed: int = field(default=0, metadata={"help": "Sampling and row-selection seed."})
    output: str | None = field(default=None, metadata={"help": "Also write the figures to this JSON file."})


def load_candidates_script():
    spec = importlib.util.spec_from_file_location("dg_candidates", REPO / "data_generation" / "candidates.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench_sampling(args: BenchArguments, triplets) -> dict:
    from promptrec.generation import SamplingParams, iter_generate
    from promptrec.models import load_model, load_tokenizer
    from promptrec.templates import recovery_messages

    tokenizer, model = load_tokenizer("embedded"), load_model("embedded", dtype="float32").eval()
    rows = triplets.head(args.policy_rows)
    convs = [recovery_messages(o, r, tokenizer, 100) for o, r in zip(rows.original_text, rows.rewritten_text)]
    params = SamplingParams(args.max_new_tokens, 1.0, 0.95, args.num_samples, args.seed)
    out = {}
    for name, batch in (("batched", args.batch_size), ("one_at_a_time", 1)):
        start = time.perf_counter()
        n = sum(len(texts) for _, outputs in iter_generate(model, tokenizer, convs, params, batch, progress=False)
                for texts in outputs)
        out[f"{name}_candidates_per_s"] = round(n / (time.perf_counter() - start), 2)
    out["batched_speedup"] = round(out["batched_candidates_per_s"] / out["one_at_a_time_candidates_per_s"], 2)
    return out


def bench_ranking(args: BenchArguments, triplets) -> dict:
    from promptrec.scoring import Scorer

    cand = load_candidates_script()
    rows = triplets.head(args.rank_triplets)
    cargs = cand.CandidateArguments(sources=["bank_hard", "bank_random", "mean", "true"], bank=args.bank,
                                    bank_column=args.bank_column, scorer=args.scorer, seed=args.seed)
    negatives = cand.bank_negatives(cargs, rows.rewrite_prompt.tolist(), rows.id.tolist())
    lists = [cand.example_record(r, True, "Improve the text to this.", [], neg)["candidates"]
             for r, neg in zip(rows.to_dict(orient="records"), negatives)]
    scorer = Scorer(args.scorer)
    scorer.encode(["warm-up"])  # model load is not throughput
    start = time.perf_counter()
    scores = scorer.score_candidates(lists, rows.rewrite_prompt.tolist())
    score_s = time.perf_counter() - start
    n_cands = sum(map(len, lists))
    out = {"triplets": len(rows), "candidates": n_cands, "scored_candidates_per_s": round(n_cands / score_s, 1)}
    for strategy in STRATEGIES:
        start = time.perf_counter()
        n_pairs = sum(len(build_pairs(c, s, strategy, 0.1, k=2, max_pairs=4)) for c, s in zip(lists, scores))
        pair_s = time.perf_counter() - start
        out[strategy] = {"pairs": n_pairs, "pairs_per_s": round(n_pairs / pair_s, 1),
                         "pairs_per_s_with_scoring": round(n_pairs / (pair_s + score_s), 1)}
    return out


def main(args: BenchArguments) -> dict:
    environment = describe_environment(generation_dtype="float32")
    print(environment_line(environment), flush=True)
    triplets, _ = read_triplets(args.triplets, args.producers, seed=args.seed)
    triplets = triplets.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    figures = {"sampling": bench_sampling(args, triplets), "ranking": bench_ranking(args, triplets),
               "config": asdict(args), "environment": environment}
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


if __name__ == "__main__":
    setup_logging()
    (bench_args,) = parse_args(BenchArguments)
    run_main(lambda: main(bench_args))
