"""DPO of the SFT adapter on SCS-ranked preference pairs (TRL ``DPOTrainer``), on one process or many.

The base model, loaded as the SFT run's run_config.json says (4-bit or not; the recipe repeats none of it), gets
the SFT adapter loaded trainable. No reference model is passed: TRL keeps a
frozen copy of the SFT adapter (adapter "ref", a few MB) on the same base, so the reference is the SFT policy and
the base weights live in memory once. ``precompute_ref_log_probs`` computes the reference log-probs in one pass
before training instead. At the end the DPO adapter and the SFT adapter are scored by SCS on the same eval
triplets (the eval triplets saved in the SFT run's folder unless ``--eval_triplets`` is given).

    python dpo/train.py --config dpo/configs/smollm2.yaml
    accelerate launch --config_file dpo/accelerate/multi_cpu.yaml dpo/train.py --config dpo/configs/smollm2.yaml
    accelerate launch --config_file dpo/accelerate/zero2.yaml dpo/train.py --config dpo/configs/mistral7b_qlora.yaml

Outputs in ``output_dir`` (``checkpoints/dpo/<run>/``): adapter, tokenizer, run_config.json, README.md (model card),
metrics.json (reward margins/accuracy, SCS of DPO and SFT), curves.png, eval_predictions.jsonl, split.parquet (carried
on from the SFT run). Merge for deployment: dpo/merge.py.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOConfig, DPOTrainer

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.models import load_tokenizer
from promptrec.training import (
    FromSFTArguments,
    InheritedModelConfig,
    check_pairs_format,
    continued_run_config,
    inherit_from_sft,
    load_base,
    read_pairs,
    resolve_resume,
    rows_consumed,
    save_run,
    scs_eval,
    sft_eval_triplets,
    share_across_ranks,
)

logger = logging.getLogger("dpo")


@dataclass
class DPOScriptArguments(FromSFTArguments):
    """Data and eval settings of the DPO stage (training settings are TRL's DPOConfig, the model's ModelConfig)."""

    train_pairs: str = field(default="checkpoints/data/smollm2/pairs/train.jsonl", metadata={
        "help": "Preference pairs in TRL's conversational format (prompt, chosen, rejected; .jsonl/.parquet)."})
    eval_pairs: str | None = field(default=None, metadata={
        "help": "Eval pairs (reward accuracy and margins during training); empty or 'none' for none."})
    max_train_pairs: int | None = field(default=None, metadata={
        "help": "Use a seeded sample of this many pairs. With max_steps, at most the pairs those steps reach are "
                "sampled anyway (so precompute_ref_log_probs covers only what is trained on)."})
    max_eval_pairs: int | None = field(default=64, metadata={"help": "Cap on the eval pairs."})

    def __post_init__(self):
        super().__post_init__()
        if self.eval_pairs is not None and self.eval_pairs.strip().lower() in ("", "none"):
            self.eval_pairs = None


def main(script_args: DPOScriptArguments, training_args: DPOConfig,
         model_args: InheritedModelConfig) -> DPOTrainer:
    # ---------------------------------------------------------------------------------------------- setup
    setup_logging(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    sft_run = inherit_from_sft(script_args, model_args)  # base, loading settings and text budget: the SFT run's
    check_pairs_format(script_args.train_pairs, script_args.max_text_tokens)
    logger.info("Script %s\nModel %s\nSFT run %s", script_args, model_args, script_args.sft_adapter)
    output_dir = Path(training_args.output_dir)

    # ------------------------------------------------------------------------------------ model & tokenizer
    tokenizer = load_tokenizer(script_args.sft_adapter)  # saved by the SFT run, chat template included
    model = load_base(model_args, adapter=script_args.sft_adapter, is_trainable=True)

    # -------------------------------------------------------------------------------------------- dataset
    # With max_steps, only a seeded sample of the pairs those steps reach: precompute_ref_log_probs would otherwise
    # run the reference over every pair in the file, most of which training never sees.
    caps = [n for n in (script_args.max_train_pairs, rows_consumed(training_args)) if n]
    train_ds = read_pairs(script_args.train_pairs, min(caps) if caps else None, training_args.seed)
    eval_ds = read_pairs(script_args.eval_pairs, script_args.max_eval_pairs) if script_args.eval_pairs else None
    if eval_ds is None:
        training_args.eval_strategy = "no"
    shared = output_dir / "datasets"  # several processes: one on-disk copy (TRL's reference cache needs it)
    train_ds = share_across_ranks(train_ds, shared / "train", training_args)
    eval_ds = share_across_ranks(eval_ds, shared / "eval", training_args) if eval_ds is not None else None
    logger.info("%d train pairs, %d eval pairs; sample:\n%s", len(train_ds), len(eval_ds or []), train_ds[0])
    scs_df = sft_eval_triplets(script_args)

    # -------------------------------------------------------------------------------------------- trainer
    trainer = DPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=tokenizer)

    # ---------------------------------------------------------------------------------------------- train
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    metrics = {"train": result.metrics}
    if eval_ds is not None:
        metrics["eval"] = trainer.evaluate()

    # ----------------------------------------------------------------------------------------- SCS & save
    if scs_df is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" not in model.peft_config:  # TRL's frozen SFT copy; load the SFT adapter when it isn't there
            model.load_adapter(script_args.sft_adapter, adapter_name="ref", is_trainable=False)
        metrics["scs"] = scs_eval(model, tokenizer, scs_df, script_args, {"dpo": "default", "sft": "ref"},
                                  trainer.accelerator, output_dir / "eval_predictions.jsonl")
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_local_main_process:
        shutil.rmtree(shared, ignore_errors=True)
    config = continued_run_config("dpo", sft_run, script_args, training_args, model_args, script_args.train_pairs)
    save_run(trainer, config, metrics, panels=[("loss", "eval_loss"), ("rewards/margins", "eval_rewards/margins"),
                                               ("rewards/accuracies", "eval_rewards/accuracies")],
             from_run=script_args.sft_adapter)
    logger.info("Saved %s; metrics: %s", output_dir, {k: metrics[k] for k in ("eval", "scs") if k in metrics})
    return trainer


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(DPOScriptArguments, DPOConfig, InheritedModelConfig)))
