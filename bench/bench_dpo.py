"""DPO throughput and memory on the CPU with the embedded SmolLM2 + a LoRA adapter (TRL DPOTrainer).

    python bench/bench_dpo.py                               # pairs built from real Gemma triplets
    python bench/bench_dpo.py --pairs checkpoints/data/smollm2/pairs/train.jsonl --sft_adapter checkpoints/sft/smollm2

Variants, each in its own process, one epoch over the same pairs:
  online_ref          reference log-probs computed every step, from TRL's frozen copy of the SFT adapter on the
                      same base (dpo/train.py's default: one base in memory)
  precomputed_ref     precompute_ref_log_probs=True: one reference pass before training, none during it
  separate_ref_model  a second full model (base + SFT adapter merged) passed as ref_model (what we avoid)
  precomputed_bf16_autocast  precomputed reference, fp32 weights, bf16 autocast: what the pipeline trained with before
                      the fast CPU path (on a CPU with bf16 instructions)
  precomputed_bf16_weights   the same over bf16 base weights (the LoRA adapter stays fp32, PEFT's default upcast)
Caution (2026-12-06): these two printed 48.7 vs 189.3 step tokens/s (3.9x), but the pipeline's own dpo/train.py,
timed the same two ways on the main job's pairs, ran 15.4 vs 14.65 s a step (1.05x): this bench's autocast variant
runs ~4x slower than the real stage, for a reason not yet found (bench/README.md). Trust the direct timing.
Prints tokens/s of the training steps, the epoch time including the reference pass, peak RSS, and the ratios:
online / precomputed epoch time and step time, separate-model / shared-base peak memory, bf16 weights / bf16 autocast.
Without ``--pairs``, pairs come from ``--triplets``: chosen = the true prompt, rejected = another row's prompt.
Without ``--sft_adapter``, a fresh LoRA adapter (r=16, all projections) stands in for the SFT one.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from train_bench import StepTimer, emit, peak_rss_mb, print_table, ratio, run_variants

from promptrec.cli import parse_args, run_main
from promptrec.environment import describe_environment, environment_line

REPO = Path(__file__).resolve().parents[1]
# name → (precompute_ref_log_probs, separate ref model, base dtype, bf16 autocast)
VARIANTS = {"online_ref": (False, False, "float32", False), "precomputed_ref": (True, False, "float32", False),
            "separate_ref_model": (False, True, "float32", False),
            "precomputed_bf16_autocast": (True, False, "float32", True),
            "precomputed_bf16_weights": (True, False, "bfloat16", True)}


@dataclass
class BenchArguments:
    triplets: str = field(default=str(REPO.parent / "shared" / "data" / "triplets.csv"), metadata={
        "help": "Triplets the pairs are built from when --pairs is not given."})
    producers: list[str] = field(default_factory=lambda: ["gemma-7b-it", "mostly gemma-7b-it"], metadata={
        "help": "Keep triplet rows whose producer starts with one of these."})
    pairs: str | None = field(default=None, metadata={"help": "Preference pairs file (TRL conversational format)."})
    sft_adapter: str | None = field(default=None, metadata={"help": "SFT run folder; default a fresh adapter."})
    rows: int = field(default=16, metadata={"help": "Pairs in the epoch."})
    batch_size: int = field(default=2, metadata={"help": "Pairs per step."})
    max_text_tokens: int = field(default=64, metadata={"help": "Token budget per text in the recovery prompt."})
    threads: int = field(default=2, metadata={"help": "torch threads per process."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run."})
    variant: str | None = field(default=None, metadata={"help": "(internal) run one variant in this process."})
    seed: int = field(default=0, metadata={"help": "Seed for the sample, the rejected prompts and training."})


def bench_pairs(args: BenchArguments):
    """``rows`` pairs: from ``--pairs``, or true prompt (chosen) vs another row's prompt (rejected)."""
    from datasets import Dataset

    from promptrec.templates import recovery_answer, recovery_messages
    from promptrec.training import read_pairs, read_split_triplets

    if args.pairs:
        return read_pairs(args.pairs, args.rows, args.seed)
    df = read_split_triplets(args.triplets, args.producers, args.rows, args.seed)
    rng = random.Random(args.seed)
    others = [rng.choice([p for p in df.rewrite_prompt if p != truth]) for truth in df.rewrite_prompt]
    rows = [{"prompt": recovery_messages(r.original_text, r.rewritten_text, None, args.max_text_tokens),
             "chosen": recovery_answer(r.rewrite_prompt), "rejected": recovery_answer(other)}
            for r, other in zip(df.itertuples(), others)]
    return Dataset.from_list(rows)


def adapter_dir(args: BenchArguments, tmp: str) -> str:
    """The SFT adapter to start from: ``--sft_adapter`` or a fresh LoRA saved under ``tmp``."""
    if args.sft_adapter:
        return args.sft_adapter
    from peft import LoraConfig, get_peft_model

    from promptrec.models import load_model
    from promptrec.training import default_lora_targets

    base = load_model("embedded", dtype="float32")
    config = LoraConfig(r=16, lora_alpha=32, target_modules=default_lora_targets("llama"), task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(tmp)
    return tmp


def run_one(args: BenchArguments) -> dict:
    """One epoch of one variant (child process)."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from promptrec.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("embedded")
    dataset = bench_pairs(args)
    precompute, separate, dtype, bf16 = VARIANTS[args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = adapter_dir(args, str(Path(tmp) / "adapter"))
        before_model = peak_rss_mb()
        policy = load_model("embedded", adapter=adapter, dtype=dtype, is_trainable=True)
        ref_model = None
        if separate:
            ref_model = load_model("embedded", adapter=adapter, dtype="float32").merge_and_unload()
        timer = StepTimer(warmup=1)
        training_args = DPOConfig(output_dir=str(Path(tmp) / "out"), use_cpu=True, bf16=bf16, report_to="none",
                                  num_train_epochs=1, logging_steps=1, save_strategy="no", learning_rate=5e-5,
                                  per_device_train_batch_size=args.batch_size, gradient_checkpointing=False,
                                  max_length=512, seed=args.seed,
                                  precompute_ref_log_probs=precompute)
        start = time.perf_counter()
        trainer = DPOTrainer(model=policy, ref_model=ref_model, args=training_args, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        epoch_seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {**timer.result(trainer.state), "epoch_s": round(epoch_seconds, 1), "peak_rss_mb": peak,
            "train_mem_mb": round(peak - before_model, 1)}


def main(args: BenchArguments) -> dict:
    if args.variant:
        emit(run_one(args))
        return {}
    dtypes = "float32, bfloat16 autocast over float32 weights (*_bf16_autocast), bfloat16 (*_bf16_weights)"
    environment = describe_environment(training_dtype=dtypes) | {"torch_threads": args.threads}
    print(environment_line(environment), flush=True)
    results = run_variants(__file__, args, VARIANTS)
    print_table(results, ["tokens_per_s", "seconds", "epoch_s", "peak_rss_mb", "train_mem_mb"])
    online, pre, separate, autocast, weights = (results.get(n, {}) for n in VARIANTS)
    ratios = {
        "online / precomputed epoch time (incl. reference pass)": ratio(online.get("epoch_s"), pre.get("epoch_s")),
        "precomputed / online step tokens/s": ratio(pre.get("tokens_per_s"), online.get("tokens_per_s")),
        "separate ref model / shared base peak RSS": ratio(separate.get("peak_rss_mb"), online.get("peak_rss_mb")),
        "separate ref model / shared base training memory": ratio(separate.get("train_mem_mb"),
                                                                   online.get("train_mem_mb")),
        "bf16 weights / bf16 autocast step tokens/s": ratio(weights.get("tokens_per_s"), autocast.get("tokens_per_s")),
        "bf16 weights / bf16 autocast epoch time": ratio(weights.get("epoch_s"), autocast.get("epoch_s")),
    }
    for key, value in ratios.items():
        print(f"{key}: {value}")
    return {"results": results, "ratios": ratios, "environment": environment}


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(BenchArguments)))
