"""Prediction throughput: dtype × batch size × KV cache, batched vs one at a time, greedy vs MBR and reward selection.

    python bench/bench_predict.py                         # CPU, embedded SmolLM2, 96 rows of ../shared/data
    python bench/bench_predict.py --rows 32 --max_new_tokens 24 --variants float32:8:dynamic auto:32:auto   # quick
    python bench/bench_predict.py --gpu                   # random-init Mistral-7B shape in 4-bit; skips without CUDA
    python bench/bench_predict.py --single_rows 32 --mbr_candidates 4   # also one row at a time, and greedy vs MBR
    python bench/bench_predict.py --variants auto:32:auto --mbr_candidates 4 --reward_model checkpoints/reward/<run>
    python bench/bench_predict.py --adapter checkpoints/pipeline/smollm2/sft --variants auto:32:auto:lora \
        auto:32:auto:merged                               # the LoRA layers' cost: an adapter as trained vs merged

Every variant times ``promptrec.predict.predict_frame`` (what inference/predict.py and the Kaggle notebook run) on
the same real rows. A variant is ``DTYPE:BATCH:CACHE``: DTYPE float32, bfloat16, auto (fp32 on a CPU) or auto_bf16
(:func:`promptrec.models.generation_dtype`: bf16 on a CPU with bf16 instructions, the opt-in fast path), CACHE
dynamic (transformers' default), static or auto (:class:`promptrec.generation.SamplingParams`: static on the CPU).
The first variant is the baseline (``float32:8:dynamic``, the defaults before the fast CPU path); the last is today's
default (``auto:32:auto``: fp32, batch 32, static cache on the CPU). Printed per variant: rows/s, × the baseline,
greedy answers identical to the baseline's, and the peak resident memory (each variant runs in its own process).
Then the time ~1,400 test rows would take against Kaggle's 9-hour limit at today's default. ``--single_rows N`` also
times batch size 1 on N rows; ``--mbr_candidates N`` also times ``--selection mbr`` (greedy + N samples per row), and
with ``--reward_model DIR`` (a reward/train_rm.py run; without one this part is skipped with a message)
``--selection reward`` among the same candidates: the same generations and MBR scores plus the reward model's forward
passes (timed apart), printed as × greedy's time. ``--gpu`` builds Mistral-7B-Instruct's shape with random weights
(saved once to ``--gpu_model_dir`` in bf16, then loaded in 4-bit NF4 as on Kaggle) and the embedded tokenizer: random
weights rarely emit EOS, so every row generates ``max_new_tokens`` (an upper bound on time); it times
``auto:BATCH:auto`` only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from train_bench import emit, peak_rss_mb, run_variant, to_argv  # bench/train_bench.py, beside this script

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.corpus import REFERENCE, reference_triplets_path
from promptrec.environment import describe_environment, environment_line
from promptrec.generation import SamplingParams
from promptrec.models import generation_dtype, load_model, load_tokenizer
from promptrec.postprocess import PostprocessConfig
from promptrec.predict import load_rewarder, predict_frame, usable_text_mask
from promptrec.scoring import Scorer
from promptrec.selection import SelectionRule
from promptrec.tables import TRIPLET_COLUMNS, DataError, read_table, require_path

REPO = Path(__file__).resolve().parents[1]
KAGGLE_ROWS = 1400
KAGGLE_LIMIT_S = 9 * 3600
# The defaults before the fast CPU path first (the ratios' baseline), today's default last.
VARIANTS = ("float32:8:dynamic", "float32:32:dynamic", "bfloat16:8:dynamic", "bfloat16:32:dynamic",
            "bfloat16:16:static", "bfloat16:64:static", "auto_bf16:32:auto", "auto:32:auto")


@dataclass
class BenchArguments:
    triplets: str = field(default=str(REPO.parent / "shared" / "data" / "triplets.csv"), metadata={
        "help": "Triplets whose original_text, rewritten_text are the test rows: a file or 'reference' (bundled)."})
    tokenizer: str = field(default="embedded", metadata={
        "help": "Tokenizer dir ('embedded': SmolLM2's; scripts/gpu_wheels.sh saves it for a bare GPU machine)."})
    rows: int = field(default=96, metadata={"help": "Rows to predict in each variant."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "DTYPE:BATCH:CACHE variants; the first is the baseline of the ratios, the last today's default."})
    single_rows: int = field(default=0, metadata={
        "help": "Also time batch size 1 on this many rows, at today's default dtype and cache (0 skips it)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per row (greedy)."})
    max_text_tokens: int = field(default=64, metadata={
        "help": "Token budget per text in the recovery prompt (64: the main job's and the real-Gemma config's)."})
    gpu: bool = field(default=False, metadata={
        "help": "Benchmark a random-init Mistral-7B-shaped model in 4-bit on CUDA instead (skips without CUDA)."})
    gpu_model_dir: str = field(default="/tmp/promptrec-mistral7b-random", metadata={
        "help": "Where the random Mistral-7B-shaped model is saved once (~15 GB in bf16)."})
    mbr_candidates: int = field(default=0, metadata={
        "help": "Also time --selection mbr with this many samples per row (0: skip)."})
    mbr_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the MBR candidates."})
    reward_model: str | None = field(default=None, metadata={
        "help": "A reward/train_rm.py run: with --mbr_candidates N also time --selection reward (none: skipped)."})
    scorer: str = field(default="auto", metadata={
        "help": "MBR scorer: 'auto' (sentence-t5-base when loadable, else the embedded MiniLM), 'embedded', a dir."})
    adapter: str | None = field(default=None, metadata={
        "help": "A LoRA run of the embedded model (e.g. checkpoints/pipeline/smollm2/sft) for the variants that end "
                "in ':lora' (its PEFT layers) or ':merged' (folded into the base, --merge_adapter)."})
    seed: int = field(default=0, metadata={"help": "Row sampling seed."})
    output: str | None = field(default=None, metadata={"help": "Also write the figures to this JSON file."})
    variant: str | None = field(default=None, metadata={"help": "(internal) run one variant in this process."})

    def __post_init__(self):
        if self.reward_model and self.mbr_candidates < 1:
            raise ValueError("--reward_model needs --mbr_candidates N (the samples it reranks)")
        modes = {adapter_mode(v) for v in ([self.variant] if self.variant else self.variants)} - {""}
        if modes and (self.gpu or not self.adapter):
            raise ValueError(f"the ':{min(modes)}' variants need --adapter DIR (a LoRA run of the embedded model) "
                             "and no --gpu")


def load_rows(args: BenchArguments):
    """``rows`` test-shaped rows (id, original_text, rewritten_text) sampled from the Gemma rows of the triplets."""
    path = reference_triplets_path() if args.triplets == REFERENCE else args.triplets
    df = read_table(path, required=TRIPLET_COLUMNS)
    df = df[usable_text_mask(df)]  # the real data has a few rows without a rewrite
    if "producer" in df.columns:
        gemma = df[df["producer"].str.contains("gemma", case=False, na=False)]
        df = gemma if len(gemma) >= args.rows else df
    if len(df) < args.rows:
        raise DataError(f"{args.triplets}: {len(df)} rows, the benchmark needs {args.rows}")
    df = df.sample(n=args.rows, random_state=args.seed).reset_index(drop=True)
    return df.assign(id=[f"r{i}" for i in range(len(df))])[["id", "original_text", "rewritten_text"]]


def mistral_7b_config(vocab_size: int, num_hidden_layers: int = 32):
    """Mistral-7B-Instruct-v0.2's shape (vocab resized to the tokenizer used)."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)


def random_model_dir(path: str, tokenizer, num_hidden_layers: int = 32, device: str = "cuda") -> str:
    """Save a random-init Mistral-7B-shaped model (bf16) and the tokenizer to ``path`` once; return the path."""
    from transformers import AutoModelForCausalLM

    target = Path(path)
    if (target / "config.json").exists():
        return str(target)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mistral_7b_config(len(tokenizer), num_hidden_layers),
                                                 dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(target)


def parse_variant(text: str) -> tuple[str, int, str]:
    """``"bfloat16:32:static"`` → ``("bfloat16", 32, "static")``; an ``ADAPTER`` part (:func:`adapter_mode`) may
    follow."""
    try:
        dtype, batch, cache, *mode = text.split(":")
        if cache not in ("auto", "static", "dynamic") or int(batch) < 1 or mode not in ([], ["lora"], ["merged"]):
            raise ValueError
    except ValueError:
        raise ValueError(f"variant {text!r}: expected DTYPE:BATCH:CACHE[:lora|merged], e.g. bfloat16:32:static or "
                         "auto:32:auto:merged") from None
    return dtype, int(batch), cache


def adapter_mode(text: str) -> str:
    """A variant's ``ADAPTER`` part: ``lora`` (``--adapter`` as PEFT layers), ``merged`` (folded into the base),
    or ``""`` (the base alone)."""
    parse_variant(text)
    parts = text.split(":")
    return parts[3] if len(parts) == 4 else ""


class TimedRewarder:
    """A reward model whose ``score`` calls are timed (``seconds``), to split reward selection's cost."""

    def __init__(self, rewarder):
        self.rewarder, self.seconds = rewarder, 0.0

    def score(self, originals, rewrittens, candidates, batch_size: int = 16):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        rewards = self.rewarder.score(originals, rewrittens, candidates, batch_size=batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return rewards


def time_predict(test, model, tokenizer, args: BenchArguments, batch_size: int, scorer: Scorer | None = None,
                 kv_cache: str = "auto", rewarder=None) -> tuple[dict, list[str]]:
    """Time ``predict_frame`` on ``test``: greedy, or MBR with ``args.mbr_candidates`` samples when ``scorer``, or
    reward selection among the same candidates when also ``rewarder``. Returns the figures and the raw greedy
    answers."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens, kv_cache=kv_cache)
    samples = None
    if scorer is not None:
        samples = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.mbr_temperature,
                                 num_return_sequences=args.mbr_candidates, seed=args.seed + 1, kv_cache=kv_cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    rule = SelectionRule("reward") if rewarder is not None else None
    result = predict_frame(test, model, tokenizer, PostprocessConfig(), params, batch_size, args.max_text_tokens,
                           progress=False, samples=samples, scorer=scorer, rule=rule, reward_model=rewarder)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    texts = list(result["raw_prediction"])
    answers = list(texts)
    if "raw_samples" in result:
        texts += [t for samples in result["raw_samples"] for t in json.loads(samples)]
    new_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"batch_size": batch_size, "rows": len(test), "seconds": round(seconds, 2),
            "rows_per_s": round(len(test) / seconds, 4), "new_tokens_per_s": round(new_tokens / seconds, 1)}, answers


def load_variant_model(args: BenchArguments, dtype: str, tokenizer, mode: str = ""):
    """The embedded SmolLM2 in ``dtype`` (``auto`` resolved by :func:`generation_dtype`), with ``--adapter`` on top
    as LoRA layers or merged into it by ``mode`` (:func:`adapter_mode`), or on ``--gpu`` the random Mistral-7B shape
    in 4-bit; ``(model, label, load seconds)``."""
    start = time.perf_counter()
    if args.gpu:
        model = load_model(random_model_dir(args.gpu_model_dir, tokenizer), load_in_4bit=True)
        label = f"random-init Mistral-7B shape, 4-bit NF4, {torch.cuda.get_device_name()}"
    else:
        resolved = generation_dtype(dtype)
        model = load_model("embedded", dtype=resolved, adapter=args.adapter if mode else None)
        model = (model.merge_and_unload() if mode == "merged" else model).eval()
        label = f"embedded SmolLM2-135M, CPU with {torch.get_num_threads()} threads"
    return model, label, time.perf_counter() - start


def run_one(args: BenchArguments) -> dict:
    """Child process: time ``args.variant`` after a warm-up; figures, answers and memory for the parent."""
    dtype, batch, cache = parse_variant(args.variant)
    test = load_rows(args)
    tokenizer = load_tokenizer(args.tokenizer)
    model, label, load_s = load_variant_model(args, dtype, tokenizer, adapter_mode(args.variant))
    time_predict(test.head(4), model, tokenizer, args, 4, kv_cache=cache)  # warm-up: kernels, caches
    loaded = peak_rss_mb()
    figures, answers = time_predict(test, model, tokenizer, args, batch, kv_cache=cache)
    peak = peak_rss_mb()
    resolved = "4-bit" if args.gpu else str(generation_dtype(dtype)).removeprefix("torch.")
    return {**figures, "variant": args.variant, "dtype": resolved, "kv_cache": cache, "model": label,
            "adapter": adapter_mode(args.variant) or None,
            "load_s": round(load_s, 1), "peak_rss_mb": peak, "generation_mem_mb": round(peak - loaded, 1),
            "answers": answers}


def run_all_variants(args: BenchArguments) -> list[dict]:
    """Each variant in its own process (peak memory is per process); ratios and agreement against the first."""
    results, baseline = [], None
    for text in args.variants:
        parse_variant(text)  # fail before any run on a malformed variant
        figures = run_variant(__file__, text, to_argv(args))
        answers = figures.pop("answers")
        baseline = baseline or (figures, answers)
        figures.update(speedup=round(figures["rows_per_s"] / baseline[0]["rows_per_s"], 2),
                       identical_to_baseline=sum(a == b for a, b in zip(answers, baseline[1])))
        results.append(figures)
        print(f"  {text:>20}: {figures['rows_per_s']:.3f} rows/s, x{figures['speedup']:.2f}, "
              f"{figures['identical_to_baseline']}/{len(answers)} answers as the baseline's, peak RSS "
              f"{figures['peak_rss_mb']:.0f} MB (+{figures['generation_mem_mb']:.0f} MB generating)", flush=True)
    return results


def time_reward(test, model, tokenizer, args: BenchArguments, variant: str, scorer: Scorer) -> dict:
    """``--selection reward`` on ``test`` with ``args.reward_model`` (loaded in the ``variant``'s dtype) after a
    warm-up; its figures, with ``reward_model_s`` the seconds in the reward model's forward passes."""
    dtype, batch, cache = parse_variant(variant)
    rewarder = TimedRewarder(load_rewarder(args.reward_model, dtype))
    time_predict(test.head(2), model, tokenizer, args, 2, scorer, cache, rewarder)  # warm-up
    rewarder.seconds = 0.0
    figures, _ = time_predict(test, model, tokenizer, args, batch, scorer, cache, rewarder)
    return dict(figures, candidates=args.mbr_candidates, reward_model=args.reward_model,
                reward_model_s=round(rewarder.seconds, 2))


def main(args: BenchArguments) -> None:
    setup_logging()
    if args.gpu and not torch.cuda.is_available():
        print("CUDA is not available: skipping the --gpu benchmark.")
        return
    if args.variant:
        emit(run_one(args))
        return
    if args.gpu:
        args.variants = [args.variants[-1]]
    if args.reward_model:
        require_path(args.reward_model, "directory", hint="--reward_model: a reward/train_rm.py run")  # fail early
    print(environment_line(describe_environment(generation_dtype=", ".join(args.variants))), flush=True)
    print(f"{args.rows} rows, {args.max_new_tokens} new tokens, texts cut to {args.max_text_tokens} tokens; "
          f"baseline {args.variants[0]}, today's default {args.variants[-1]}", flush=True)
    variants = run_all_variants(args)
    default = variants[-1]
    label, load_s = default["model"], default["load_s"]
    test = load_rows(args)
    tokenizer = load_tokenizer(args.tokenizer)
    figures = {"model": label, "max_new_tokens": args.max_new_tokens, "max_text_tokens": args.max_text_tokens,
               "variants": variants, "default_over_baseline": default["speedup"]}
    dtype, batch, cache = parse_variant(args.variants[-1])
    model = None
    if args.single_rows or args.mbr_candidates:
        model, _, _ = load_variant_model(args, dtype, tokenizer, adapter_mode(args.variants[-1]))
    if args.single_rows:
        single, _ = time_predict(test.head(args.single_rows), model, tokenizer, args, 1, kv_cache=cache)
        speedup = round(default["rows_per_s"] / single["rows_per_s"], 2)
        figures.update(one_at_a_time=single, batched_over_single=speedup)
    if args.mbr_candidates:
        scorer = Scorer(args.scorer)
        time_predict(test.head(2), model, tokenizer, args, 2, scorer, kv_cache=cache)  # warm-up: the scorer's load
        mbr, _ = time_predict(test, model, tokenizer, args, batch, scorer, kv_cache=cache)
        figures.update(mbr=dict(mbr, candidates=args.mbr_candidates, scorer=scorer.name),
                       mbr_over_greedy=round(mbr["seconds"] / default["seconds"], 2))
        if args.reward_model:
            reward = time_reward(test, model, tokenizer, args, args.variants[-1], scorer)
            figures.update(reward=reward, reward_over_greedy=round(reward["seconds"] / default["seconds"], 2),
                           reward_model_over_greedy=round(reward["reward_model_s"] / default["seconds"], 2))
    kaggle_s = load_s + KAGGLE_ROWS / default["rows_per_s"]
    figures["kaggle_1400_rows_s"] = round(kaggle_s, 1)
    figures["kaggle_fraction_of_9h"] = round(kaggle_s / KAGGLE_LIMIT_S, 4)

    print(f"\n{label}; {args.max_new_tokens} new tokens, texts cut to {args.max_text_tokens} tokens")
    print(f"  today's default {args.variants[-1]} / baseline {args.variants[0]}: x{default['speedup']:.2f} rows/s")
    if "one_at_a_time" in figures:
        print(f"  batched / one at a time ({args.single_rows} rows): x{figures['batched_over_single']:.2f}")
    if "mbr" in figures:
        print(f"  mbr (greedy + {args.mbr_candidates} samples, {figures['mbr']['scorer']}) / greedy: "
              f"{figures['mbr_over_greedy']:.2f}x the time")
        if "reward" in figures:
            print(f"  reward selection (the same + MBR scores + reward model) / greedy: "
                  f"{figures['reward_over_greedy']:.2f}x the time ({figures['reward']['rows_per_s']:.3f} rows/s), of "
                  f"which the reward model's forward passes {figures['reward_model_over_greedy']:.2f}x")
        else:
            print("  reward selection: skipped (no --reward_model DIR)")
    where = " (this GPU; a Kaggle T4 is several times slower)" if args.gpu else ""
    print(f"  ~{KAGGLE_ROWS} rows: {kaggle_s / 60:.1f} min incl. {load_s:.0f}s load = "
          f"{100 * figures['kaggle_fraction_of_9h']:.1f}% of Kaggle's 9 h{where}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": asdict(args), **figures}, indent=2) + "\n")


if __name__ == "__main__":
    (bench_args,) = parse_args(BenchArguments)
    run_main(lambda: main(bench_args))
