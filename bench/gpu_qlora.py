"""QLoRA SFT and DPO on one GPU at 1024 tokens with random-initialised Phi-2 and Mistral-7B shaped models.

    python bench/gpu_qlora.py                                   # both shapes, SFT and DPO, batch 1 x 1024
    python bench/gpu_qlora.py --models phi2 --stages sft --steps 3 --output bench_gpu.json

No weights are needed: each shape is built from its config with random weights (bf16), saved once under
``--model_dir``, then loaded in 4-bit NF4 (double quantisation, bf16 compute and storage) exactly as the
phi2_qlora / mistral7b_qlora recipes load the real models, with LoRA r=16 on the recipe's targets, gradient
checkpointing and the paged 8-bit AdamW. The embedded SmolLM2 tokenizer stands in (Mistral's vocabulary is
widened to it: +1% parameters). Reports trained tokens/s, peak GPU memory (torch.cuda.max_memory_allocated) and
MFU = model FLOPs/s over the GPU's dense bf16 peak, with model FLOPs per token = 4N for QLoRA SFT (forward +
input-gradient backward; the frozen base gets no weight gradients) and 6N for DPO (plus the reference forward).
Without CUDA it prints a note and exits 0.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from train_bench import StepTimer

from promptrec.cli import parse_args, run_main

PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40": 181, "A10": 125, "L4": 121, "V100": 125, "T4": 65}
T4_BYTES = 16 * 2**30
MODELS = ("phi2", "mistral7b")
STAGES = ("sft", "dpo")


@dataclass
class BenchArguments:
    models: list[str] = field(default_factory=lambda: list(MODELS), metadata={"help": "Shapes: phi2, mistral7b."})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"help": "sft and/or dpo."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per sequence (DPO: prompt + completion)."})
    batch_size: int = field(default=1, metadata={"help": "Sequences (SFT) or pairs (DPO) per step."})
    steps: int = field(default=5, metadata={"help": "Timed steps, after two warm-up steps."})
    model_dir: str = field(default=str(Path(tempfile.gettempdir()) / "promptrec-random-models"), metadata={
        "help": "Where the random-weight models are saved once (Mistral-7B: ~15 GB)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "The GPU's dense bf16 peak TFLOPS for MFU; default from the device name."})
    output: str | None = field(default=None, metadata={"help": "Also write the results as JSON here."})
    tokenizer: str = field(default="embedded", metadata={
        "help": "Tokenizer dir ('embedded': SmolLM2's; scripts/gpu_wheels.sh saves it for a bare GPU machine)."})


def phi2_config(vocab_size: int):
    """microsoft/phi-2's shape: 2.7B, 32 layers, hidden 2560, partial rotary 0.4."""
    from transformers import PhiConfig

    return PhiConfig(vocab_size=max(vocab_size, 51200), hidden_size=2560, intermediate_size=10240,
                     num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                     max_position_embeddings=2048, tie_word_embeddings=False)


def model_config(name: str, vocab_size: int):
    if name == "phi2":
        return phi2_config(vocab_size)
    from bench_predict import mistral_7b_config

    return mistral_7b_config(vocab_size)


def count_params(config) -> int:
    """Parameters of the unquantised model (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def saved_random_model(path: Path, config, tokenizer) -> str:
    """Build the shape with random bf16 weights on the GPU and save it (and the tokenizer) once."""
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return str(path)


def random_text(tokenizer, n_tokens: int, rng: random.Random) -> str:
    ids = [rng.randrange(1000, len(tokenizer) - 1) for _ in range(n_tokens)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def datasets_for(tokenizer, args: BenchArguments, n_rows: int):
    """SFT rows of plain text (cut to seq_len) and DPO pairs (prompt of seq_len - 64 tokens, 32-token answers)."""
    from datasets import Dataset

    rng = random.Random(0)
    sft = Dataset.from_list([{"text": random_text(tokenizer, args.seq_len + 64, rng)} for _ in range(n_rows)])
    dpo = Dataset.from_list([{"prompt": random_text(tokenizer, args.seq_len - 64, rng),
                              "chosen": random_text(tokenizer, 32, rng), "rejected": random_text(tokenizer, 32, rng)}
                             for _ in range(n_rows)])
    return sft, dpo


def run_stage(stage: str, model_dir: str, tokenizer, data, args: BenchArguments, n_params: int, peak: float) -> dict:
    from trl import DPOConfig, DPOTrainer, ModelConfig, SFTConfig, SFTTrainer

    from promptrec.training import load_base, lora_config

    model_args = ModelConfig(model_name_or_path=model_dir, dtype="bfloat16", load_in_4bit=True,
                             use_bnb_nested_quant=True, bnb_4bit_quant_storage="bfloat16", lora_r=16, lora_alpha=32)
    torch.cuda.reset_peak_memory_stats()
    model = load_base(model_args)
    common = dict(output_dir=tempfile.mkdtemp(), bf16=True, gradient_checkpointing=True, optim="paged_adamw_8bit",
                  per_device_train_batch_size=args.batch_size, max_length=args.seq_len, max_steps=args.steps + 2,
                  logging_steps=1, save_strategy="no", report_to="none", learning_rate=1e-4)
    timer = StepTimer(warmup=2)
    if stage == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=lora_config(model_args, model), callbacks=[timer])
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=lora_config(model_args, model), callbacks=[timer])
    trainer.train()
    result = timer.result(trainer.state)
    flops_per_token = (4 if stage == "sft" else 6) * n_params
    peak_bytes = torch.cuda.max_memory_allocated()
    result.update(peak_gpu_gb=round(peak_bytes / 2**30, 2), fits_16gb_t4=peak_bytes < T4_BYTES * 0.92,
                  mfu=round(flops_per_token * (result["tokens_per_s"] or 0) / peak, 4) if peak else None)
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(args: BenchArguments) -> dict:
    if not torch.cuda.is_available():
        print("bench/gpu_qlora.py needs a CUDA GPU; none here, nothing measured.")
        return {}
    from promptrec.models import load_tokenizer

    name = torch.cuda.get_device_name()
    tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    tokenizer = load_tokenizer(args.tokenizer)
    sft_data, dpo_data = datasets_for(tokenizer, args, n_rows=args.batch_size * (args.steps + 2))
    results = {"device": name, "peak_tflops": tflops, "seq_len": args.seq_len, "batch_size": args.batch_size}
    for model_name in args.models:
        config = model_config(model_name, len(tokenizer))
        n_params = count_params(config)
        model_dir = saved_random_model(Path(args.model_dir) / model_name, config, tokenizer)
        for stage in args.stages:
            row = run_stage(stage, model_dir, tokenizer, sft_data if stage == "sft" else dpo_data, args, n_params,
                            (tflops or 0) * 1e12)
            results[f"{model_name}_{stage}"] = {"params_b": round(n_params / 1e9, 2), **row}
            print(f"{model_name} {stage}: {row}", flush=True)
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # bench_predict's Mistral shape
    run_main(lambda: main(*parse_args(BenchArguments)))
