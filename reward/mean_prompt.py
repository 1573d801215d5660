"""Find a "mean prompt": one string with the highest mean SCS against a set of rewrite prompts.

    python reward/mean_prompt.py --config reward/configs/mean_prompt.yaml
    python reward/mean_prompt.py --prompts ../shared/data/prompts.csv --prompt_column prompt --max_prompts 2000 \\
        --scorer auto --output checkpoints/reward/mean_prompt.json

Beam search over word appends and insertions from a vocabulary (default: the most common words of the training
prompts), within a token budget in the scorer's tokenizer; a held-out validation split shows how the string
generalises. The output JSON holds ``mean_prompt, train_scs, val_scs, scorer``, the constant baseline's scores on
the same splits, the per-step history and the resolved config. A mean prompt is what a model's prediction can be
blended with, and the floor every model must beat.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from promptrec import corpus
from promptrec.cli import asdict_all, parse_args, run_main, setup_logging
from promptrec.mean_prompt import beam_search, build_vocabulary, mean_scs
from promptrec.scoring import ScorerArguments
from promptrec.tables import DataError, require_path, write_json

logger = logging.getLogger("mean_prompt")


@dataclass
class MeanPromptArguments:
    prompts: list[str] = field(default_factory=lambda: ["bank"], metadata={
        "help": "Prompt sets: 'bank' (built-in) and/or files (.csv/.jsonl/.parquet, hf:), "
                "e.g. ../shared/data/prompts.csv."})
    prompt_column: str = field(default="rewrite_prompt", metadata={"help": "Prompt column in the files ('prompt' "
                                                                           "for ../shared/data/prompts.csv)."})
    max_prompts: int | None = field(default=2000, metadata={"help": "Random sample of this many distinct prompts."})
    val_fraction: float = field(default=0.2, metadata={"help": "Share of prompts held out for validation."})
    vocab_size: int = field(default=150, metadata={"help": "Words in the vocabulary (most common in train prompts)."})
    vocab_min_count: int = field(default=2, metadata={"help": "A vocabulary word is in at least this many prompts."})
    vocabulary_file: str | None = field(default=None, metadata={
        "help": "Use these words instead (one per line); the vocabulary then comes only from this file."})
    init_prompt: str = field(default="", metadata={"help": "Start from this string (default: the best single word)."})
    beam_width: int = field(default=4, metadata={"help": "Prompts kept after each step."})
    max_steps: int = field(default=16, metadata={"help": "Most words added."})
    max_tokens: int = field(default=32, metadata={"help": "Token budget, counted by the scorer's tokenizer."})
    insertions: bool = field(default=True, metadata={"help": "Also insert words inside the prompt, not only append."})
    max_candidates: int = field(default=2000, metadata={"help": "Candidates scored per step (seeded random subset)."})
    baseline_prompt: str = field(default="Improve the text to this.", metadata={
        "help": "Constant prompt scored on the same splits for comparison (the competition's 0.60 baseline)."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling, the split and candidate subsets."})
    output: str = field(default="checkpoints/reward/mean_prompt.json", metadata={"help": "Output JSON."})

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), not {self.val_fraction}")
        if min(self.beam_width, self.max_tokens, self.max_candidates, self.vocab_size) < 1:
            raise ValueError("beam_width, max_tokens, max_candidates and vocab_size must be >= 1")


def load_split(args: MeanPromptArguments) -> tuple[list[str], list[str]]:
    """Distinct prompts (:func:`promptrec.corpus.load_prompt_sources`) → seeded sample of ``max_prompts`` → shuffled
    → (train, validation)."""
    prompts = corpus.load_prompt_sources(args.prompts, args.prompt_column, limit=args.max_prompts,
                                         seed=args.seed)["rewrite_prompt"].tolist()
    prompts = [prompts[i] for i in np.random.default_rng(args.seed).permutation(len(prompts))]
    n_val = round(len(prompts) * args.val_fraction)
    if n_val < 1 or len(prompts) - n_val < 1:
        raise DataError(f"{', '.join(args.prompts)}: {len(prompts)} distinct prompt(s) can't make both a train and a "
                        f"validation split (val_fraction {args.val_fraction})")
    return prompts[n_val:], prompts[:n_val]


def read_vocabulary(path: str) -> list[str]:
    words = list(dict.fromkeys(require_path(path, hint="--vocabulary_file").read_text(encoding="utf-8").split()))
    if not words:
        raise DataError(f"{path}: no words")
    return words


def main(script_args: MeanPromptArguments, scorer_args: ScorerArguments) -> dict:
    # ── setup ──
    setup_logging()
    logger.info("Config: %s", asdict_all(script_args, scorer_args))
    start = time.perf_counter()

    # ── data ──
    train, val = load_split(script_args)
    vocabulary = (read_vocabulary(script_args.vocabulary_file) if script_args.vocabulary_file
                  else build_vocabulary(train, script_args.vocab_size, script_args.vocab_min_count))
    logger.info("%d train / %d validation prompts; %d vocabulary words, e.g. %s", len(train), len(val),
                len(vocabulary), ", ".join(vocabulary[:12]))

    # ── embed ──
    scorer = scorer_args.build()
    train_vecs, val_vecs = scorer.encode(train), scorer.encode(val)

    # ── search ── candidates are throw-away strings: don't let them fill the caches
    result = beam_search(train_vecs, lambda texts: scorer.encode(texts, cache=False), vocabulary,
                         init=script_args.init_prompt, beam_width=script_args.beam_width,
                         max_steps=script_args.max_steps, max_tokens=script_args.max_tokens,
                         count_tokens=scorer.count_tokens, insertions=script_args.insertions,
                         max_candidates=script_args.max_candidates, exponent=scorer.exponent,
                         seed=script_args.seed, progress=True)

    # ── score & save ──
    def split_scores(prompt: str) -> dict:
        vec = scorer.encode([prompt])
        return {"prompt": prompt, "train_scs": float(mean_scs(vec, train_vecs, scorer.exponent)[0]),
                "val_scs": float(mean_scs(vec, val_vecs, scorer.exponent)[0])}

    found, baseline = split_scores(result.prompt), split_scores(script_args.baseline_prompt)
    out = {
        "mean_prompt": result.prompt,
        "train_scs": found["train_scs"],
        "val_scs": found["val_scs"],
        "scorer": scorer.identity,
        "baseline": baseline,
        "n_train": len(train),
        "n_val": len(val),
        "n_tokens": scorer.count_tokens(result.prompt),
        "vocabulary_size": len(vocabulary),
        "n_evaluated": result.n_evaluated,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "history": result.history,
        "config": asdict_all(script_args, scorer_args),
    }
    write_json(out, script_args.output)
    logger.info("mean prompt %r: train %.4f, val %.4f (baseline %r: train %.4f, val %.4f) → %s", result.prompt,
                found["train_scs"], found["val_scs"], baseline["prompt"], baseline["train_scs"],
                baseline["val_scs"], script_args.output)
    return out


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(MeanPromptArguments, ScorerArguments)))
