"""SFT throughput and memory on the CPU with the embedded SmolLM2 (LoRA r=16 on all projections, TRL SFTTrainer).

    python bench/bench_sft.py                                    # all variants, real Gemma triplets
    python bench/bench_sft.py --variants fp32_padded nf4_padded --steps 2 --rows 24   # quick, on a busy machine

Variants, each in its own process (peak memory is per process), on the same rows and batch size:
  fp32_padded        fp32 weights, batches padded to their longest row, random order
  fp32_grouped       same, length-grouped batches (train_sampling_strategy=group_by_length)
  fp32_padding_free  rows flattened into one sequence per batch, no padding (padding_free=True)
  fp32_packed        best-fit-decreasing packing into sequences of batch_size x mean row length (packing=True)
  bf16_autocast      fp32 weights, bf16 autocast (bf16=True): the CPU here has avx512_bf16
  bf16_autocast_grouped  bf16 autocast + length-grouped batches: what the pipeline trained with before the fast path
  bf16_weights_grouped   bf16 base weights (fp32 LoRA adapter, PEFT's default upcast) + bf16 autocast + grouped
  bf16_weights_padding_free  the same, padding-free
  bf16_autocast_no_dropout   bf16_autocast_grouped with lora_dropout 0 (the recipes' 0.05 draws a mask per LoRA module)
  nf4_padded         4-bit NF4 base (QLoRA), fp32 compute
Prints trained tokens/s (non-padding tokens, steps after the first), peak RSS, the model's memory footprint, and
the ratios of each variant's tokens/s to fp32_padded's and to bf16_autocast_grouped's, and 4-bit vs 32-bit memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from train_bench import StepTimer, emit, peak_rss_mb, print_table, ratio, run_variants

from promptrec.cli import parse_args, run_main
from promptrec.environment import describe_environment, environment_line

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32_padded": {},
    "fp32_grouped": {"train_sampling_strategy": "group_by_length"},
    "fp32_padding_free": {"padding_free": True},
    "fp32_packed": {"packing": True},
    "bf16_autocast": {"bf16": True},
    "bf16_autocast_grouped": {"bf16": True, "train_sampling_strategy": "group_by_length"},
    "bf16_weights_grouped": {"dtype": "bfloat16", "bf16": True, "train_sampling_strategy": "group_by_length"},
    "bf16_weights_padding_free": {"dtype": "bfloat16", "bf16": True, "padding_free": True},
    "bf16_autocast_no_dropout": {"bf16": True, "train_sampling_strategy": "group_by_length", "lora_dropout": 0.0},
    "nf4_padded": {"load_in_4bit": True},
}


@dataclass
class BenchArguments:
    triplets: str = field(default=str(REPO.parent / "shared" / "data" / "triplets.csv"), metadata={
        "help": "Triplets to train on (../shared/data/triplets.csv; any file with the triplet columns works)."})
    producers: list[str] = field(default_factory=lambda: ["gemma-7b-it", "mostly gemma-7b-it"], metadata={
        "help": "Keep rows whose producer starts with one of these (empty keeps all)."})
    rows: int = field(default=48, metadata={"help": "Rows sampled (seeded) for the run."})
    batch_size: int = field(default=4, metadata={"help": "Rows per step (packed: tokens of this many rows)."})
    steps: int = field(default=3, metadata={"help": "Timed steps, after one warm-up step."})
    max_text_tokens: int = field(default=64, metadata={"help": "Token budget per text in the recovery prompt."})
    threads: int = field(default=2, metadata={"help": "torch threads per process."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run."})
    variant: str | None = field(default=None, metadata={"help": "(internal) run one variant in this process."})
    seed: int = field(default=0, metadata={"help": "Seed for the row sample and training."})


def run_one(args: BenchArguments) -> dict:
    """Train ``steps + 1`` steps of one variant and report throughput and memory (child process)."""
    import torch
    from trl import ModelConfig, SFTConfig, SFTTrainer

    from promptrec.models import load_tokenizer
    from promptrec.training import load_base, lora_config, read_split_triplets, sft_dataset

    torch.set_num_threads(args.threads)
    options = dict(VARIANTS[args.variant])
    model_args = ModelConfig(model_name_or_path="embedded", dtype=options.pop("dtype", "float32"), lora_r=16,
                             lora_alpha=32, lora_dropout=options.pop("lora_dropout", 0.05),
                             load_in_4bit=options.pop("load_in_4bit", False), use_bnb_nested_quant=True)
    tokenizer = load_tokenizer("embedded")
    dataset = sft_dataset(read_split_triplets(args.triplets, args.producers, args.rows, args.seed), tokenizer,
                          args.max_text_tokens)
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False))
               for r in dataset]
    batch_size, max_length = args.batch_size, max(lengths)
    if options.get("packing"):  # one packed sequence per step holding about batch_size rows
        batch_size, max_length = 1, args.batch_size * sum(lengths) // len(lengths)
    if options.get("padding_free"):
        max_length = None  # TRL: padding-free without packing needs pre-cut rows (ours are cut by max_text_tokens)
    before_model = peak_rss_mb()
    model = load_base(model_args)
    footprint = model.get_memory_footprint() / 2**20
    timer = StepTimer(warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = SFTConfig(output_dir=tmp, use_cpu=True, bf16=options.pop("bf16", False), report_to="none",
                                  max_steps=args.steps + 1, logging_steps=1, save_strategy="no",
                                  per_device_train_batch_size=batch_size, gradient_checkpointing=False,
                                  learning_rate=1e-4, max_length=max_length, seed=args.seed, **options)
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora_config(model_args, model), callbacks=[timer])
        trainer.train()
    peak = peak_rss_mb()
    return {**timer.result(trainer.state), "peak_rss_mb": peak, "train_mem_mb": round(peak - before_model, 1),
            "model_mb": round(footprint, 1), "mean_row_tokens": round(sum(lengths) / len(lengths), 1)}


def main(args: BenchArguments) -> dict:
    if args.variant:
        emit(run_one(args))
        return {}
    dtypes = "float32, bfloat16 autocast over float32 weights (bf16_autocast*), bfloat16 (bf16_weights*)"
    environment = describe_environment(training_dtype=dtypes) | {"torch_threads": args.threads}  # the children's
    print(environment_line(environment), flush=True)
    results = run_variants(__file__, args, VARIANTS)
    print_table(results, ["tokens_per_s", "seconds", "tokens", "peak_rss_mb", "train_mem_mb", "model_mb"])
    base = results.get("fp32_padded", {})
    speed = {f"{n} / fp32_padded tokens/s": ratio(results[n]["tokens_per_s"], base.get("tokens_per_s"))
             for n in results if n != "fp32_padded"}
    if "nf4_padded" in results:
        nf4 = results["nf4_padded"]
        speed["nf4 / fp32 model memory"] = ratio(nf4["model_mb"], base.get("model_mb"))
        speed["nf4 / fp32 training memory (peak - before load)"] = ratio(nf4["train_mem_mb"], base.get("train_mem_mb"))
    today = results.get("bf16_autocast_grouped", {})
    speed.update({f"{n} / bf16_autocast_grouped tokens/s": ratio(results[n]["tokens_per_s"], today.get("tokens_per_s"))
                  for n in results if n.startswith(("bf16_weights", "bf16_autocast_")) and n != "bf16_autocast_grouped"
                  and today})
    for key, value in speed.items():
        print(f"{key}: {value}")
    return {"results": results, "ratios": speed, "environment": environment}


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(BenchArguments)))
