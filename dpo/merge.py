"""Merge a trained adapter (an SFT or DPO run folder) into its base and save one plain model for deployment.

    python dpo/merge.py --adapter checkpoints/dpo/smollm2 --output_dir checkpoints/merged/smollm2
    python dpo/merge.py --adapter checkpoints/dpo/phi2_qlora --output_dir merged/phi2 --dtype float16

The base is loaded unquantised in ``--dtype`` (merging into 4-bit weights would round the adapter away), the
adapter is folded in with PEFT's ``merge_and_unload``, and the model, the run's tokenizer and its run_config.json
(with ``merged: true``, so ``max_text_tokens`` travels) are written to ``output_dir``. Load it like any model:
``inference/predict.py --model <output_dir>`` with no ``--adapter``. Run it after training, outside DeepSpeed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.models import parse_dtype
from promptrec.policy import load_policy, resolve_policy
from promptrec.run_config import override_field, read_run_config

logger = logging.getLogger("merge")


@dataclass
class MergeArguments:
    adapter: str = field(default="checkpoints/dpo/smollm2", metadata={
        "help": "Run folder of sft/train.py or dpo/train.py (adapter + tokenizer + run_config.json)."})
    output_dir: str = field(default="checkpoints/merged/smollm2", metadata={"help": "Where the merged model goes."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model; default the run's (run_config.json), e.g. a local copy of the same hub model."})
    dtype: str = field(default="auto", metadata={
        "help": "dtype of the merged weights: auto (bf16/fp16 on GPU, fp32 on CPU), bfloat16, float16, float32."})
    allow_config_override: bool = override_field()

    def __post_init__(self):
        if Path(self.output_dir).resolve() == Path(self.adapter).resolve():
            raise ValueError("output_dir must differ from the adapter folder")


def main(args: MergeArguments) -> Path:
    setup_logging()
    config = read_run_config(args.adapter)
    policy = resolve_policy(args.model_name_or_path, args.adapter, load_in_4bit=False,
                            allow_override=args.allow_config_override)
    logger.info("Merging %s into %s (%s)", args.adapter, policy.model, args.dtype)
    model, tokenizer = load_policy(policy, args.dtype)
    out = Path(args.output_dir)
    model.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    sections = {**config.sections, "merged": True, "merged_from": args.adapter, "base_model": policy.model}
    replace(config, model_name_or_path=str(out), dtype=str(parse_dtype(args.dtype)).removeprefix("torch."),
            load_in_4bit=False, load_in_8bit=False, sections=sections).save(out)
    logger.info("Saved the merged model to %s", out)
    return out


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(MergeArguments)))
