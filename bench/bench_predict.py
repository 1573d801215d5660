"""Benchmark prediction throughput: batched (length-sorted, left-padded) vs one row at a time, and greedy vs MBR.

    python bench/bench_predict.py                         # CPU, embedded SmolLM2, 200 rows of ../shared/data
    python bench/bench_predict.py --rows 32 --max_new_tokens 24   # quick, on a busy CPU
    python bench/bench_predict.py --gpu                   # random-init Mistral-7B shape in 4-bit; skips without CUDA
    python bench/bench_predict.py --rows 8 --single_rows 0 --max_new_tokens 16 --mbr_candidates 4   # greedy vs MBR

Both modes time ``promptrec.predict.predict_frame`` (what inference/predict.py and the Kaggle notebook run) on
the same real rows, first with ``--batch_size`` then with batch size 1, and print rows/s, the ratio and the time
~1,400 test rows would take against Kaggle's 9-hour limit. With ``--mbr_candidates N`` (default 4; 0 skips) the same
rows are also predicted with ``--selection mbr`` (the greedy answer + N samples per row, embedded and ranked by the
scorer) and the MBR / greedy time ratio is printed; ``--single_rows 0`` skips the one-at-a-time run.
``--gpu`` builds Mistral-7B-Instruct's shape with random weights (saved once to ``--gpu_model_dir`` in bf16, then
loaded in 4-bit NF4 as on Kaggle) and the embedded tokenizer: random weights rarely emit EOS, so every row generates
``max_new_tokens`` — an upper bound on time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.corpus import REFERENCE, reference_triplets_path
from promptrec.generation import SamplingParams
from promptrec.models import load_model, load_tokenizer
from promptrec.postprocess import PostprocessConfig
from promptrec.predict import predict_frame, usable_text_mask
from promptrec.scoring import Scorer
from promptrec.tables import TRIPLET_COLUMNS, DataError, read_table

REPO = Path(__file__).resolve().parents[1]
KAGGLE_ROWS = 1400
KAGGLE_LIMIT_S = 9 * 3600


@dataclass
class BenchArguments:
    triplets: str = field(default=str(REPO.parent / "shared" / "data" / "triplets.csv"), metadata={
        "help": "Triplets whose original_text, rewritten_text are the test rows: a file or 'reference' (bundled)."})
    tokenizer: str = field(default="embedded", metadata={
        "help": "Tokenizer dir ('embedded': SmolLM2's; scripts/gpu_wheels.sh saves it for a bare GPU machine)."})
    rows: int = field(default=200, metadata={"help": "Rows to predict in each mode."})
    single_rows: int | None = field(default=None, metadata={
        "help": "Rows for the one-at-a-time run (default: --rows; 0 skips it); fewer keeps a slow CPU run short."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the batched run."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per row (greedy)."})
    max_text_tokens: int = field(default=256, metadata={"help": "Token budget per text in the recovery prompt."})
    gpu: bool = field(default=False, metadata={
        "help": "Benchmark a random-init Mistral-7B-shaped model in 4-bit on CUDA instead (skips without CUDA)."})
    gpu_model_dir: str = field(default="/tmp/promptrec-mistral7b-random", metadata={
        "help": "Where the random Mistral-7B-shaped model is saved once (~15 GB in bf16)."})
    mbr_candidates: int = field(default=4, metadata={
        "help": "Also time --selection mbr with this many samples per row (0: skip)."})
    mbr_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the MBR candidates."})
    scorer: str = field(default="auto", metadata={
        "help": "MBR scorer: 'auto' (sentence-t5-base when loadable, else the embedded MiniLM), 'embedded', a dir."})
    seed: int = field(default=0, metadata={"help": "Row sampling seed."})
    output: str | None = field(default=None, metadata={"help": "Also write the figures to this JSON file."})


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


def time_predict(test, model, tokenizer, args: BenchArguments, batch_size: int, scorer: Scorer | None = None
                 ) -> dict:
    """Time ``predict_frame`` on ``test``: greedy, or MBR with ``args.mbr_candidates`` samples when ``scorer``."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    samples = None
    if scorer is not None:
        samples = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.mbr_temperature,
                                 num_return_sequences=args.mbr_candidates, seed=args.seed + 1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = predict_frame(test, model, tokenizer, PostprocessConfig(), params, batch_size, args.max_text_tokens,
                           progress=True, samples=samples, scorer=scorer)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    texts = list(result["raw_prediction"])
    if "raw_samples" in result:
        texts += [t for samples in result["raw_samples"] for t in json.loads(samples)]
    new_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"batch_size": batch_size, "rows": len(test), "seconds": round(seconds, 2),
            "rows_per_s": round(len(test) / seconds, 4), "new_tokens_per_s": round(new_tokens / seconds, 1)}


def main(args: BenchArguments) -> None:
    setup_logging()
    if args.gpu and not torch.cuda.is_available():
        print("CUDA is not available: skipping the --gpu benchmark.")
        return
    test = load_rows(args)
    tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    if args.gpu:
        model = load_model(random_model_dir(args.gpu_model_dir, tokenizer), load_in_4bit=True)
        label = f"random-init Mistral-7B shape, 4-bit NF4, {torch.cuda.get_device_name()}"
    else:
        model = load_model("embedded", dtype="float32")
        label = f"embedded SmolLM2-135M, fp32, CPU with {torch.get_num_threads()} threads"
    load_s = time.perf_counter() - start
    scorer = Scorer(args.scorer) if args.mbr_candidates > 0 else None
    time_predict(test.head(2), model, tokenizer, args, 2, scorer)  # warm-up (kernels, caches, the scorer's load)

    batched = time_predict(test, model, tokenizer, args, args.batch_size)
    figures = {"model": label, "load_s": round(load_s, 1), "max_new_tokens": args.max_new_tokens,
               "max_text_tokens": args.max_text_tokens, "batched": batched}
    single_rows = args.rows if args.single_rows is None else args.single_rows
    if single_rows:
        single = time_predict(test.head(single_rows), model, tokenizer, args, 1)
        figures.update(one_at_a_time=single, speedup=round(batched["rows_per_s"] / single["rows_per_s"], 2))
    if scorer is not None:
        mbr = time_predict(test, model, tokenizer, args, args.batch_size, scorer)
        figures.update(mbr=dict(mbr, candidates=args.mbr_candidates, scorer=scorer.name),
                       mbr_over_greedy=round(mbr["seconds"] / batched["seconds"], 2))
    kaggle_s = load_s + KAGGLE_ROWS / batched["rows_per_s"]
    figures["kaggle_1400_rows_s"] = round(kaggle_s, 1)
    figures["kaggle_fraction_of_9h"] = round(kaggle_s / KAGGLE_LIMIT_S, 4)
    if "mbr" in figures:
        figures["kaggle_1400_rows_mbr_s"] = round(load_s + KAGGLE_ROWS / figures["mbr"]["rows_per_s"], 1)

    print(f"\n{label}; {args.max_new_tokens} new tokens, texts cut to {args.max_text_tokens} tokens")
    runs = [("batched", "batched"), ("one at a time", "one_at_a_time"), (f"mbr (N={args.mbr_candidates})", "mbr")]
    for name, key in runs:
        if key in figures:
            fig = figures[key]
            print(f"  {name:>14} (batch {fig['batch_size']:>2}, {fig['rows']} rows): {fig['rows_per_s']:.3f} rows/s, "
                  f"{fig['new_tokens_per_s']:.1f} new tokens/s, {fig['seconds']:.1f}s")
    if "speedup" in figures:
        print(f"  batched / one at a time: {figures['speedup']:.2f}x")
    if "mbr" in figures:
        print(f"  mbr (greedy + {args.mbr_candidates} samples, {figures['mbr']['scorer']}) / greedy, both batched: "
              f"{figures['mbr_over_greedy']:.2f}x the time")
    where = " (this GPU; a Kaggle T4 is several times slower)" if args.gpu else ""
    print(f"  ~{KAGGLE_ROWS} rows: {kaggle_s / 60:.1f} min incl. {load_s:.0f}s load = "
          f"{100 * figures['kaggle_fraction_of_9h']:.1f}% of Kaggle's 9 h{where}")
    if "mbr" in figures:
        print(f"  ~{KAGGLE_ROWS} rows with mbr: {figures['kaggle_1400_rows_mbr_s'] / 60:.1f} min = "
              f"{100 * figures['kaggle_1400_rows_mbr_s'] / KAGGLE_LIMIT_S:.1f}% of Kaggle's 9 h{where}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": asdict(args), **figures}, indent=2) + "\n")


if __name__ == "__main__":
    (bench_args,) = parse_args(BenchArguments)
    run_main(lambda: main(bench_args))
