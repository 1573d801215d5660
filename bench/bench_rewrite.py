"""Batched vs one-at-a-time rewriting with the embedded generator, greedy, on the same pairs.

    .venv/bin/python bench/bench_rewrite.py [--pairs 32] [--batch_size 8] [--max_new_tokens 64]

Prints rewrites/s for each mode, their ratio, and how many outputs match exactly (batching changes padding, so a
few greedy outputs can differ by float noise).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from promptrec import corpus
from promptrec.environment import describe_environment, environment_line, model_dtype
from promptrec.generation import SamplingParams, generate
from promptrec.models import load_model, load_tokenizer
from promptrec.templates import rewrite_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--output", default=None, help="Also write the figures as JSON here.")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, dtype="float32").eval()
    environment = describe_environment(generation_dtype=model_dtype(model))
    print(environment_line(environment), flush=True)
    jobs = corpus.make_jobs(corpus.seed_texts(), corpus.prompt_bank(), 1, seed=0, max_pairs=args.pairs)
    convs = [rewrite_messages(p, t, tokenizer) for p, t in zip(jobs.rewrite_prompt, jobs.original_text)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)

    generate(model, tokenizer, convs[:2], params, batch_size=2, progress=False)  # warm-up
    results = {}
    for name, bs in (("one_at_a_time", 1), ("batched", args.batch_size)):
        start = time.perf_counter()
        outs = generate(model, tokenizer, convs, params, batch_size=bs, progress=False)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": round(seconds, 2), "rewrites_per_s": round(len(convs) / seconds, 3),
                         "outputs": [o[0] for o in outs]}
    same = sum(a == b for a, b in zip(results["batched"]["outputs"], results["one_at_a_time"]["outputs"]))
    ratio = results["batched"]["rewrites_per_s"] / results["one_at_a_time"]["rewrites_per_s"]
    summary = {"pairs": len(convs), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "threads": torch.get_num_threads(),
               **{f"{k}_rewrites_per_s": v["rewrites_per_s"] for k, v in results.items()},
               "speedup": round(ratio, 2), "exact_matches": f"{same}/{len(convs)}", "environment": environment}
    for key, value in summary.items():
        print(f"{key:>32}: {value}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
