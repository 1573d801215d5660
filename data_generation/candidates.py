"""Candidate recovered prompts for each triplet: policy samples, prompt-bank negatives, the mean prompt, the truth.

    python data_generation/candidates.py --config data_generation/configs/candidates_smollm2.yaml
    python data_generation/candidates.py --config data_generation/configs/candidates_gemma_triplets.yaml
    accelerate launch --multi_gpu --num_processes 2 data_generation/candidates.py --config ... --use_cpu  # 2 shards

Sources (``--sources``, any mix): ``policy`` — ``num_samples`` sampled answers of a policy model (plus
``--policy_adapter checkpoints/sft/<run>``) to the shared recovery prompt; ``bank_hard`` — the prompt-bank entries
nearest to the true prompt by embedding, below ``hard_ceiling`` cosine (so rephrasings of the truth are left out);
``bank_random`` — random bank entries below that ceiling; ``mean`` — the mean prompt; ``true`` — the true prompt.
Output ``<output_dir>/candidates.parquet`` (``id, candidate, source``), ``triplets.parquet`` (the examples used, with
ids) and ``candidates.manifest.json``; finished examples go to ``candidates.parts/`` first (a killed run resumes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from promptrec import corpus
from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.generation import SamplingParams
from promptrec.pairs import TRUE_SOURCE, select_negatives, stable_seed
from promptrec.policy import MERGE_HELP, check_merge_choice, load_sampler, policy_of, should_merge
from promptrec.postprocess import DEFAULT_MEAN_PROMPT, clean_prediction, resolve_mean_prompt
from promptrec.resumable import gather_parts, run_share, write_manifest
from promptrec.run_config import override_field
from promptrec.scoring import ScorerArguments
from promptrec.tables import write_table
from promptrec.templates import recovery_messages
from promptrec.triplets import read_triplets

logger = logging.getLogger("candidates")
SOURCES = ("policy", "bank_hard", "bank_random", "mean", TRUE_SOURCE)


@dataclass
class CandidateArguments(ScorerArguments):
    """What to sample and draw candidates from; the scorer's options (``--scorer`` …) embed the bank negatives."""

    triplets: str = field(default="checkpoints/data/smollm2/rewrites.parquet", metadata={
        "help": "Triplets: the rewrite step's output or an external .csv/.jsonl/.parquet/hf: file."})
    producers: list[str] = field(default_factory=list, metadata={
        "help": "Keep rows whose 'producer' starts with one of these (e.g. 'mostly gemma-7b-it')."})
    rename: list[str] = field(default_factory=list, metadata={
        "help": "Column renames FILE=OURS, e.g. text=original_text prompt=rewrite_prompt."})
    limit: int | None = field(default=None, metadata={"help": "Use a seeded random sample of this many triplets."})
    output_dir: str = field(default="checkpoints/data/smollm2", metadata={"help": "Where the outputs go."})
    sources: list[str] = field(default_factory=lambda: list(SOURCES), metadata={
        "help": f"Candidate sources, any of {', '.join(SOURCES)}."})
    policy: str | None = field(default=None, metadata={
        "help": "Policy model: hub id, local dir or 'embedded' (default: the adapter's base model, else embedded)."})
    policy_adapter: str | None = field(default=None, metadata={
        "help": "PEFT adapter on the policy, e.g. checkpoints/sft/<run> (its run_config.json names the base and the "
                "text budget); 'none' for the base policy alone."})
    load_in_4bit: bool | None = field(default=None, metadata={
        "help": "Load the policy in 4-bit (bitsandbytes). Default: as the adapter's run trained, or 4-bit on CUDA."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU, fp32 on a CPU), auto_bf16 (also bf16 on a CPU with bf16 instructions), "
                "bfloat16, float32…"})
    merge_adapter: str = field(default="false", metadata={"help": MERGE_HELP})
    backend: str = field(default="hf", metadata={"help": "hf (transformers generate) or vllm (GPU, no adapter)."})
    num_samples: int = field(default=4, metadata={"help": "Policy samples per triplet."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy, one sample)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens per sampled prompt."})
    batch_size: int = field(default=8, metadata={"help": "Triplets per generate call."})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "Each text is cut to this many tokens in the prompt (default: the adapter's setting, else 256)."})
    allow_config_override: bool = override_field()
    bank: list[str] = field(default_factory=lambda: ["bank"], metadata={
        "help": "Prompt bank: 'bank' (built-in) and/or files, e.g. ../shared/data/prompts.csv."})
    bank_column: str = field(default="rewrite_prompt", metadata={"help": "Prompt column of bank files."})
    bank_limit: int | None = field(default=None, metadata={
        "help": "Use a seeded random sample of this many bank prompts (49k take many minutes to embed on a CPU)."})
    n_hard: int = field(default=4, metadata={"help": "Hard bank negatives per triplet."})
    n_random: int = field(default=4, metadata={"help": "Random bank negatives per triplet."})
    hard_ceiling: float = field(default=0.9, metadata={
        "help": "Bank prompts at or above this cosine to the true prompt are near-duplicates, never negatives."})
    mean_prompt: str = field(default=DEFAULT_MEAN_PROMPT, metadata={
        "help": "The mean prompt, or a JSON file from reward/mean_prompt.py (key 'mean_prompt')."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling, random negatives and --limit."})
    use_cpu: bool = field(default=False, metadata={"help": "Stay on the CPU even when a GPU is present."})

    @property
    def model(self) -> str | None:  # what promptrec.policy.policy_of reads
        return self.policy

    @property
    def adapter(self) -> str | None:
        return self.policy_adapter

    def __post_init__(self):
        if self.policy_adapter is not None and self.policy_adapter.strip().lower() in ("", "none"):
            self.policy_adapter = None  # the recipe's adapter turned off: the base policy alone
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"sources must be some of {SOURCES}, not {self.sources}")
        check_merge_choice(self.merge_adapter)
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be hf or vllm, not {self.backend!r}")
        if self.backend == "vllm" and self.policy_adapter:
            raise ValueError("backend=vllm does not load --policy_adapter; merge the adapter first or use backend=hf")
        if min(self.num_samples, self.batch_size) < 1 or min(self.n_hard, self.n_random) < 0:
            raise ValueError("num_samples and batch_size must be >= 1, n_hard and n_random >= 0")
        if any("=" not in r for r in self.rename):
            raise ValueError(f"rename entries look like FILE_COLUMN=OUR_COLUMN, got {self.rename}")


def bank_negatives(args: CandidateArguments, truths: list[str], ids: list[str]) -> list[dict[str, list[str]]]:
    """For each true prompt, ``{"bank_hard": [...], "bank_random": [...]}`` from the bank (empty when unused)."""
    n_hard = args.n_hard if "bank_hard" in args.sources else 0
    n_random = args.n_random if "bank_random" in args.sources else 0
    if not (n_hard or n_random) or not truths:
        return [{"bank_hard": [], "bank_random": []} for _ in truths]
    bank = corpus.load_prompt_sources(args.bank, args.bank_column, limit=args.bank_limit,
                                      seed=args.seed)["rewrite_prompt"].tolist()
    scorer = args.build()
    logger.info("Negatives: %d bank prompts, embedded with %s", len(bank), scorer.identity["model"])
    picks = select_negatives(scorer.encode(truths), scorer.encode(bank), n_hard, n_random, args.hard_ceiling,
                             seeds=[stable_seed(args.seed, i) for i in ids])
    return [{"bank_hard": [bank[j] for j in hard], "bank_random": [bank[j] for j in rand]} for hard, rand in picks]


def example_record(row: dict, use_true: bool, mean_prompt: str | None, samples: list[str],
                   negatives: dict[str, list[str]]) -> dict:
    """One part row: the example's candidates and their sources, the true prompt first (it wins de-duplication).
    Policy samples are cleaned as inference cleans them, with the row's texts, so an unusable one (a copy of the
    input included: :func:`promptrec.postprocess.unusable_reason`) is dropped and counted."""
    cleaned = [clean_prediction(s, sources=(row["original_text"], row["rewritten_text"])) for s in samples]
    found = [(row["rewrite_prompt"], TRUE_SOURCE)] if use_true else []
    found += [(mean_prompt, "mean")] if mean_prompt else []
    found += [(c, "policy") for c in cleaned]
    found += [(c, src) for src in ("bank_hard", "bank_random") for c in negatives[src]]
    found = [(c, s) for c, s in found if c]
    return {"id": row["id"], "candidates": [c for c, _ in found], "sources": [s for _, s in found],
            "unusable_samples": cleaned.count("")}


def generate_candidates(args: CandidateArguments, triplets: pd.DataFrame, parts_dir: Path) -> None:
    """Make this process's pending share and append each finished batch to its part (resumable)."""
    def work(todo, writer):
        rows = triplets.iloc[todo].to_dict(orient="records")
        use_true = TRUE_SOURCE in args.sources
        mean = resolve_mean_prompt(args.mean_prompt) if "mean" in args.sources else None
        negatives = bank_negatives(args, [r["rewrite_prompt"] for r in rows], [r["id"] for r in rows])
        if "policy" not in args.sources:
            writer.append(example_record(r, use_true, mean, [], neg) for r, neg in zip(rows, negatives))
            return
        policy = policy_of(args)
        n = args.num_samples if args.temperature > 0 else 1
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, n, args.seed)
        tokenizer, batches = load_sampler(policy, params, args.backend, args.dtype, args.batch_size, args.use_cpu,
                                          merge=should_merge(policy, args.merge_adapter))
        convs = [recovery_messages(r["original_text"], r["rewritten_text"], tokenizer, policy.max_text_tokens)
                 for r in rows]
        logger.info("First policy input:\n%s", tokenizer.apply_chat_template(convs[0], tokenize=False,
                                                                             add_generation_prompt=True))
        for batch, outputs in batches(convs, "sample candidates"):
            writer.append(example_record(rows[j], use_true, mean, outs, negatives[j])
                          for j, outs in zip(batch, outputs))

    run_share(triplets["id"].tolist(), parts_dir, work, "candidates")


POLICY_COPY = "policy"  # the sampled run's run_config.json and tokenizer, so the pairs survive a moved run folder


def keep_prompt_format(policy, folder: Path) -> None:
    """Copy what renders the policy's prompts (its run's ``run_config.json``, its saved tokenizer and the base's model
    config, not the weights) into ``folder``: build_pairs reads them from there, not from the adapter's path, which a
    move breaks."""
    import shutil

    from transformers import AutoConfig

    from promptrec.models import load_tokenizer, resolve_model_path
    from promptrec.run_config import RUN_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(policy.adapter) / RUN_CONFIG, folder / RUN_CONFIG)
    load_tokenizer(policy.tokenizer_source).save_pretrained(folder)
    AutoConfig.from_pretrained(resolve_model_path(policy.model), revision=policy.revision).save_pretrained(folder)


def main(args: CandidateArguments) -> pd.DataFrame | None:
    out = Path(args.output_dir)
    start = time.time()
    rename = dict(r.split("=", 1) for r in args.rename)
    need_prompt = bool(set(args.sources) - {"policy", "mean"})  # the true prompt, and the bank's nearness to it
    triplets, counts = read_triplets(args.triplets, args.producers, rename, args.limit, args.seed, need_prompt)
    logger.info("Triplets from %s: %s", args.triplets, counts)
    generate_candidates(args, triplets, out / "candidates.parts")
    merged = gather_parts(triplets["id"].tolist(), out / "candidates.parts")
    if merged is None:  # not rank 0
        return None

    long = merged[["id", "candidates", "sources"]].explode(["candidates", "sources"]).dropna()
    long = long.rename(columns={"candidates": "candidate", "sources": "source"}).reset_index(drop=True)
    write_table(long, out / "candidates.parquet")
    write_table(triplets, out / "triplets.parquet")
    # the policy whose prompt format the pairs must be rendered in (build_pairs reads it back)
    policy = policy_of(args) if args.policy_adapter or "policy" in args.sources else None
    if policy is not None and policy.adapter:
        keep_prompt_format(policy, out / POLICY_COPY)
    manifest = write_manifest(
        out / "candidates.manifest.json", start, triplets=counts, examples=len(merged), candidates=len(long),
        per_source=long["source"].value_counts().to_dict(),
        unusable_policy_samples=int(merged["unusable_samples"].sum()),
        candidates_per_example=float(np.round(len(long) / max(len(merged), 1), 2)),
        policy={**policy.summary(), "tokenizer": policy.tokenizer_source} if policy else None, config=asdict(args))
    logger.info("Wrote %d candidates for %d triplets (%s) in %.0f s → %s", len(long), len(merged),
                manifest["per_source"], manifest["seconds"], out / "candidates.parquet")
    return long


if __name__ == "__main__":
    setup_logging()
    (script_args,) = parse_args(CandidateArguments)
    run_main(lambda: main(script_args))
