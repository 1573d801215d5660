"""Rewrite original texts with a generator LLM (Gemma in the competition) through its real chat template.

    python data_generation/rewrite.py --config data_generation/configs/smollm2.yaml
    accelerate launch --multi_gpu --num_processes 2 data_generation/rewrite.py --config ... --use_cpu  # 2 shards
    python data_generation/rewrite.py --generator google/gemma-7b-it --load_in_4bit --texts my.csv --prompts bank ...

Each (text, prompt) pair becomes the user turn ``"{prompt}\\n\\n{text}"``; under Gemma's template that is exactly
``<start_of_turn>user\\n{prompt}\\n\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``. Finished rows are appended
to ``<output>.parts/`` after every batch, so the same command resumes a killed run; under ``accelerate launch``
each process takes a disjoint share and rank 0 merges the parts into ``<output>`` plus ``<output>.manifest.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from promptrec import corpus
from promptrec.cleaning import RULES, clean_rewrite
from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.generation import SamplingParams
from promptrec.policy import Policy, load_sampler
from promptrec.resumable import dist_info, merge_parts, run_sharded, write_manifest
from promptrec.tables import write_table
from promptrec.templates import rewrite_messages

logger = logging.getLogger("rewrite")


@dataclass
class RewriteArguments:
    texts: list[str] = field(default_factory=lambda: ["seed"], metadata={
        "help": "Original texts: 'seed' (built-in set) and/or files (.csv/.jsonl/.parquet) or hf:<dataset>[:split]."})
    text_column: str = field(default="original_text", metadata={"help": "Text column in the text files."})
    drop_empty_texts: bool = field(default=False, metadata={
        "help": "Drop (and count) empty/NaN texts in text files instead of stopping with an error naming the row."})
    generate_texts: int = field(default=0, metadata={
        "help": "Also have the generator write this many texts ('Write a {genre} about {topic}.')."})
    prompts: list[str] = field(default_factory=lambda: ["bank"], metadata={
        "help": "Rewrite prompts: 'bank' (built-in, categorised) and/or files, e.g. ../shared/data/prompts.csv."})
    prompt_column: str = field(default="rewrite_prompt", metadata={"help": "Prompt column in prompt files."})
    category_column: str = field(default="prompt_category", metadata={"help": "Category column in prompt files."})
    prompts_per_text: int = field(default=2, metadata={"help": "Distinct prompts drawn for each text."})
    max_pairs: int | None = field(default=None, metadata={"help": "Cap on (text, prompt) pairs (after pairing)."})
    max_text_tokens: int = field(default=384, metadata={"help": "Longer texts are chunked to this many tokens."})
    min_words: int = field(default=5, metadata={"help": "Texts with fewer words are dropped as near-empty."})
    generator: str = field(default="embedded", metadata={"help": "Generator: hub id, local dir or 'embedded'."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the generator in 4-bit (bitsandbytes)."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU, fp32 on a CPU), auto_bf16 (also bf16 on a CPU with bf16 instructions), "
                "bfloat16, float32…"})
    backend: str = field(default="hf", metadata={"help": "hf (transformers generate) or vllm (GPU, if installed)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generate call (length-sorted, left-padded)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per rewrite."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when temperature > 0."})
    seed: int = field(default=42, metadata={"help": "Seed for pairing, text generation and sampling."})
    output: str = field(default="checkpoints/data/rewrites.parquet", metadata={
        "help": "Output .parquet or .jsonl; parts go to <output>.parts/, the manifest to <output>.manifest.json."})
    clean: list[str] = field(default_factory=lambda: list(RULES), metadata={
        "help": f"Cleaning rules to apply (any of {', '.join(RULES)}); pass 'none' for raw output."})
    use_cpu: bool = field(default=False, metadata={"help": "Stay on the CPU even when a GPU is present."})

    def __post_init__(self):
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be hf or vllm, not {self.backend!r}")
        self.clean = [] if self.clean in (["none"], ["None"]) else self.clean
        unknown = set(self.clean) - set(RULES)
        if unknown:
            raise ValueError(f"unknown cleaning rule(s) {sorted(unknown)}; choose from {RULES}")
        if self.prompts_per_text < 1 or self.batch_size < 1:
            raise ValueError("prompts_per_text and batch_size must be >= 1")


def load_texts(args: RewriteArguments, tokenizer) -> tuple[pd.DataFrame, dict]:
    """Seed set and/or files → filtered (empty, near-empty, duplicate) → chunked to the token budget."""
    frames = [corpus.seed_texts() if src == "seed" else corpus.read_texts(src, args.text_column, args.drop_empty_texts)
              for src in args.texts]
    texts, counts = corpus.filter_texts(pd.concat(frames, ignore_index=True), args.min_words)
    chunked = corpus.chunk_texts(texts, args.max_text_tokens, tokenizer)
    counts["chunks"] = len(chunked)
    return chunked, counts


def generate_rows(ids, conversations, parts_dir, make_row, generate_batches, desc) -> pd.DataFrame | None:
    """Generate every pending row (this process's share), resumably; the merged rows on rank 0."""
    def work(todo, writer):
        for batch, outputs in generate_batches([conversations[i] for i in todo], desc):
            writer.append(make_row(todo[j], out[0]) for j, out in zip(batch, outputs))

    return run_sharded(ids, parts_dir, work, desc)


def llm_texts(args, generate_batches, out_dir: Path) -> pd.DataFrame:
    """Have the generator write ``generate_texts`` texts from the seed set's genre × topic pairs."""
    seeds = corpus.seed_texts()
    combos = seeds[["genre", "topic"]].sample(frac=1.0, random_state=args.seed).to_dict(orient="records")
    combos = [combos[i % len(combos)] for i in range(args.generate_texts)]
    ids = [f"gen-{i:05d}" for i in range(len(combos))]
    convs = [[{"role": "user", "content": f"Write a short {c['genre'].replace('_', ' ')} about {c['topic']}. "
               "Reply with the text only."}] for c in combos]
    written = generate_rows(ids, convs, out_dir / "texts.parts", lambda i, text: {
        "id": ids[i], "text_id": ids[i], "genre": combos[i]["genre"], "topic": combos[i]["topic"],
        "original_text": text}, generate_batches, "write texts")
    # every process goes on to the rewrites with the written texts
    return written if written is not None else merge_parts(out_dir / "texts.parts", order=ids)


def main(args: RewriteArguments) -> pd.DataFrame | None:
    output = Path(args.output)
    start = time.time()
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, 1, args.seed)
    generator = Policy(args.generator, load_in_4bit=args.load_in_4bit)
    tokenizer, batches = load_sampler(generator, params, args.backend, args.dtype, args.batch_size, args.use_cpu)

    texts, text_counts = load_texts(args, tokenizer)
    if args.generate_texts:
        written, written_counts = corpus.filter_texts(llm_texts(args, batches, output.parent / f"{output.name}.llm"),
                                                      args.min_words)
        text_counts["llm_written"] = written_counts.get("kept", 0)
        texts = pd.concat([texts, written], ignore_index=True)
    prompts = corpus.load_prompt_sources(args.prompts, args.prompt_column, args.category_column)
    jobs = corpus.make_jobs(texts, prompts, args.prompts_per_text, args.seed, args.max_pairs)
    logger.info("%d texts × %d prompts → %d pairs; text counts %s", len(texts), len(prompts), len(jobs), text_counts)
    if dist_info()[0] == 0 and len(jobs):
        logger.info("First rendered input:\n%s", tokenizer.apply_chat_template(
            rewrite_messages(jobs.rewrite_prompt[0], jobs.original_text[0], tokenizer), tokenize=False,
            add_generation_prompt=True))

    gen_params = json.dumps({k: v for k, v in asdict(args).items()
                             if k in ("max_new_tokens", "temperature", "top_p", "seed", "backend")})
    records = jobs.to_dict(orient="records")
    convs = [rewrite_messages(r["rewrite_prompt"], r["original_text"], tokenizer) for r in records]
    raw = generate_rows(list(jobs.id), convs, Path(f"{output}.parts"), lambda i, text: {
        **records[i], "rewritten_text": text, "generator": args.generator, "generation_params": gen_params},
        batches, "rewrite")
    if raw is None:  # not rank 0
        return None
    cleaned = [(row, *clean_rewrite(row["rewritten_text"], row["original_text"], args.clean))
               for row in raw.to_dict(orient="records")]  # (row, text, rule that dropped it or None)
    dropped = Counter(rule for _, _, rule in cleaned if rule)
    result = pd.DataFrame([{**row, "rewritten_text": text} for row, text, rule in cleaned if not rule],
                          columns=list(raw.columns))
    write_table(result, output)
    manifest = write_manifest(f"{output}.manifest.json", start, output=str(output), rows=len(result),
                              pairs=len(jobs), texts=text_counts, prompts=len(prompts),
                              cleaning_dropped=dict(dropped), generator=args.generator, config=asdict(args))
    logger.info("Summary: %d pairs → %d rows kept (dropped %s) in %.0f s → %s", len(jobs), len(result),
                dict(dropped) or "none", manifest["seconds"], output)
    return result


if __name__ == "__main__":
    setup_logging()
    (script_args,) = parse_args(RewriteArguments)
    run_main(lambda: main(script_args))
