"""Supervised fine-tuning of a LoRA/QLoRA adapter on the prompt-recovery task (TRL ``SFTTrainer``).

Triplets (``original_text, rewrite_prompt, rewritten_text``) are rendered through the shared recovery format into
TRL conversational prompt/completion rows, so the loss falls on the completion (the prompt) only. The split (by id
or by prompt) is saved; at the end the adapter is scored by generation-based SCS on the eval split.

    python sft/train.py --config sft/configs/smollm2.yaml
    python sft/train.py --config sft/configs/smollm2.yaml --triplets ../shared/data/triplets.csv \\
        --producers gemma-7b-it "mostly gemma-7b-it" "mixed: gemma-7b-it" --max_samples 400 --max_steps 30
    accelerate launch --config_file dpo/accelerate/single_gpu.yaml sft/train.py --config sft/configs/phi2_qlora.yaml

"SFT, continued", the compute-matched control of docs/po_selection.md: the SFT adapter trained further with the same
recipe, on fresh train rows, for as long as the PO stage took:

    python sft/train.py --config sft/configs/smollm2.yaml --init_adapter checkpoints/sft/smollm2 \
        --exclude_ids used_ids.csv --max_train_seconds 1800 --max_steps 1000 --output_dir checkpoints/sft/continued

* ``--init_adapter RUN``: train that sft/train.py run's adapter further (loaded trainable; no new LoRA, so the
  recipe's lora_* settings are unused). The base model, how it is loaded and max_text_tokens come from RUN's
  run_config.json as DPO takes them: a setting left at its default takes the run's, one that contradicts it stops
  in one line unless ``--allow_config_override true``. The tokenizer is the one saved in RUN. run_config.json says
  stage ``sft_continued``, ``init_adapter: RUN`` and holds RUN's config as ``sft_run``.
* ``--max_train_seconds S``: stop training after S seconds of wall time (counted from the start of training,
  checked at each step's end); the run then evaluates and saves as usual. metrics.json's ``time_limit`` records the
  steps done and the seconds taken. ``max_steps`` still caps the steps and sets the learning-rate schedule. A run
  resumed with ``--resume_from_checkpoint`` gets what is left of S after the checkpoint's seconds.
* ``--exclude_ids FILE``: a table with an ``id`` column (.csv/.jsonl/.parquet); those triplets are dropped before
  the ``max_samples`` sample and the split (the pipeline's control excludes the rows the DPO rounds sampled; rows
  SFT itself trained on can recur, since which of them its shuffled batches reached is not recorded).

Outputs in ``output_dir`` (``checkpoints/sft/<run>/``): adapter, tokenizer, run_config.json (the RunConfig every
later stage reads), README.md (model card), metrics.json, curves.png, split.parquet (the train and eval triplets),
eval_predictions.jsonl. ``--resume_from_checkpoint last`` continues a killed run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig, SFTTrainer

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.models import load_tokenizer
from promptrec.run_config import RUN_CONFIG, TrainingData, data_licence, override_field, save_split
from promptrec.splits import split_frame
from promptrec.training import (
    EvalArguments,
    TimeLimit,
    continued_run_config,
    declared_defaults,
    inherit_from_run,
    load_base,
    lora_config,
    read_split_triplets,
    resolve_resume,
    save_run,
    scs_eval,
    sft_dataset,
    sft_run_config,
)

logger = logging.getLogger("sft")


@dataclass
class SFTScriptArguments(EvalArguments):
    """Data and eval settings of the SFT stage (training settings are TRL's SFTConfig, the model's ModelConfig)."""

    triplets: str = field(default="checkpoints/data/smollm2/rewrites.parquet", metadata={
        "help": "Triplet file (.csv/.jsonl/.parquet or hf:<dataset>) with original_text, rewrite_prompt, "
                "rewritten_text (id optional): the rewrite step's output or e.g. ../shared/data/triplets.csv."})
    producers: list[str] = field(default_factory=list, metadata={
        "help": "Keep rows whose 'producer' starts with one of these (e.g. gemma-7b-it); empty keeps all."})
    max_samples: int | None = field(default=None, metadata={
        "help": "Use a seeded random sample of this many triplets (after filtering), before the split."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of ids (or prompts) held out for eval."})
    split_by: str = field(default="id", metadata={
        "help": "Split by example 'id', or by 'prompt' so no eval prompt is seen in training.",
        "choices": ("id", "prompt")})
    max_eval_samples: int | None = field(default=64, metadata={
        "help": "Cap on the eval rows used for the eval loss during training (the SCS eval has its own cap)."})
    eval_scs_baseline: bool = field(default=False, metadata={
        "help": "Also score the base model zero-shot (adapter disabled) on the same eval rows."})
    data_licence: str | None = field(default=None, metadata={
        "help": "The triplets' licence, for the model card; default: the project's own for bundled data and the "
                "rewrite step's output, else 'see its source'."})
    init_adapter: str | None = field(default=None, metadata={
        "help": f"Run folder of sft/train.py whose adapter is trained further (no new LoRA): 'SFT, continued'. Its "
                f"{RUN_CONFIG} gives the base model, how it is loaded and max_text_tokens (a setting left at its "
                "default takes the run's; one that contradicts it stops); the run is saved as stage sft_continued."})
    allow_config_override: bool = override_field()
    max_train_seconds: float | None = field(default=None, metadata={
        "help": "Stop training after this many seconds of wall time (from the start of training, checked at each "
                "step's end), then evaluate and save as usual; metrics.json records the steps and seconds."})
    exclude_ids: str | None = field(default=None, metadata={
        "help": "Table (.csv/.jsonl/.parquet) with an 'id' column: those triplets are dropped before the sampling and "
                "the split (e.g. the rows SFT and the PO round's candidates used)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ValueError("max_train_seconds must be > 0")


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer:
    # ---------------------------------------------------------------------------------------------- setup
    setup_logging(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    init = script_args.init_adapter
    # Continuing a run: its base, loading settings and text budget (the recipe's defaults stand for "the run's").
    init_run = (inherit_from_run(init, script_args, model_args, declared_defaults(type(model_args), type(script_args)))
                if init else None)
    logger.info("Script %s\nModel %s%s", script_args, model_args, f"\nContinuing {init}" if init else "")
    output_dir = Path(training_args.output_dir)

    # ------------------------------------------------------------------------------- tokenizer & dataset
    tokenizer = (load_tokenizer(init) if init  # the one the run saved, chat template included
                 else load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision))
    triplets = read_split_triplets(script_args.triplets, script_args.producers, script_args.max_samples,
                                   training_args.seed, script_args.exclude_ids)
    train_df, eval_df = split_frame(triplets, script_args.eval_fraction, script_args.split_by, training_args.seed)
    logger.info("Split by %s: %d train, %d eval triplets", script_args.split_by, len(train_df), len(eval_df))
    if training_args.process_index == 0:  # the rows DPO and GRPO read back (the source file may move)
        save_split(output_dir, train_df, eval_df)
    data = TrainingData(script_args.triplets, script_args.producers, script_args.split_by, script_args.eval_fraction,
                        training_args.seed, len(train_df), len(eval_df),
                        licence=script_args.data_licence or data_licence(script_args.triplets))
    train_ds = sft_dataset(train_df, tokenizer, script_args.max_text_tokens)
    loss_eval_df = eval_df.head(script_args.max_eval_samples or len(eval_df))
    eval_ds = sft_dataset(loss_eval_df, tokenizer, script_args.max_text_tokens) if len(loss_eval_df) else None
    if eval_ds is None:
        training_args.eval_strategy = "no"
    sample = tokenizer.apply_chat_template(train_ds[0]["prompt"] + train_ds[0]["completion"], tokenize=False)
    logger.info("Sample rendered row:\n%s", sample)

    # ------------------------------------------------------------------------------------------ model & LoRA
    model = load_base(model_args, adapter=init, is_trainable=True)  # with init: its adapter, trainable
    peft_config = None if init else lora_config(model_args, model)

    # -------------------------------------------------------------------------------------------- trainer
    time_limit = TimeLimit(script_args.max_train_seconds) if script_args.max_train_seconds else None
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[time_limit] if time_limit else None)
    if trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()

    # ---------------------------------------------------------------------------------------------- train
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    if time_limit:  # --restore_callback_states_from_checkpoint replaces it by one rebuilt from the checkpoint
        time_limit = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TimeLimit))
    metrics = {"train": result.metrics, **({"time_limit": time_limit.summary()} if time_limit else {})}
    if eval_ds is not None:
        metrics["eval"] = trainer.evaluate()

    # ----------------------------------------------------------------------------------------- SCS & save
    stage = "sft_continued" if init else "sft"
    scs_df = eval_df.head(script_args.eval_scs_samples)
    adapters = {stage: "default", **({"base": None} if script_args.eval_scs_baseline else {})}
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics["scs"] = scs_eval(model, tokenizer, scs_df, script_args, adapters, trainer.accelerator,
                              output_dir / "eval_predictions.jsonl")
    if init:  # the init run's LoRA shape and base, this run's data; init_adapter names the run it continued
        config = continued_run_config(stage, init_run, script_args, training_args, model_args, None, data=data,
                                      init_adapter=init)
    else:
        config = sft_run_config(script_args, training_args, model_args, model, tokenizer, peft_config.target_modules,
                                data)
    save_run(trainer, config, metrics, panels=[("loss", "eval_loss"), ("mean_token_accuracy",
                                                                      "eval_mean_token_accuracy")])
    logger.info("Saved %s; metrics: %s", output_dir, {k: metrics[k] for k in ("eval", "scs") if k in metrics})
    return trainer


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(SFTScriptArguments, SFTConfig, ModelConfig)))
