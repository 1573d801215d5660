"""Online preference optimisation of the SFT adapter with the competition metric as the reward (TRL ``GRPOTrainer``).

For each recovery prompt the policy samples ``num_generations`` answers; each answer is cleaned as inference cleans it
and scored by SCS against the true prompt (``promptrec.rewards.scs_reward``; unusable answers get -1); GRPO pushes
the policy towards the answers that beat their group's mean. An optional length penalty joins it with its own
weight (``--length_penalty_weight``). The prompts are the train triplets saved in the SFT run's folder
(``split.parquet``) unless ``--triplets`` is given; the base and how it is loaded come from its run_config.json. At
the end the GRPO adapter and the SFT adapter are scored by greedy SCS on the same eval triplets (the SFT run's saved
eval triplets unless ``--eval_triplets`` is given), as dpo/train.py does.

    python dpo/grpo.py --config dpo/configs/grpo_smollm2.yaml
    accelerate launch --config_file dpo/accelerate/multi_cpu.yaml dpo/grpo.py --config dpo/configs/grpo_smollm2.yaml
    accelerate launch --config_file dpo/accelerate/ddp.yaml dpo/grpo.py --config dpo/configs/grpo_mistral7b_qlora.yaml

``beta`` (the KL weight) defaults to 0, TRL's default: no reference forward pass per step. With ``beta > 0`` TRL 1.16
(with peft >= 0.20) copies the loaded SFT adapter into a frozen adapter "ref", so the KL anchor is the SFT policy.

Outputs in ``output_dir`` (``checkpoints/dpo/<run>/``): adapter, tokenizer, run_config.json, README.md (model card),
metrics.json (train rewards, SCS of GRPO and SFT), curves.png, eval_predictions.jsonl, split.parquet (carried on),
completions/ (sampled answers with their rewards, with ``log_completions``). ``inference/predict.py --adapter
<output_dir>`` loads it like an SFT or DPO run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from trl import GRPOConfig, GRPOTrainer

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.models import load_tokenizer
from promptrec.rewards import length_penalty, scs_reward
from promptrec.run_config import SPLIT_ROWS, split_rows
from promptrec.tables import DataError
from promptrec.templates import recovery_messages
from promptrec.training import (
    FromSFTArguments,
    InheritedModelConfig,
    continued_run_config,
    inherit_from_sft,
    load_base,
    read_split_triplets,
    resolve_resume,
    save_run,
    scs_eval,
    sft_eval_triplets,
)

logger = logging.getLogger("grpo")


@dataclass
class GRPOScriptArguments(FromSFTArguments):
    """Data, reward and eval settings of the GRPO stage (training settings are TRL's GRPOConfig)."""

    triplets: str | None = field(default=None, metadata={
        "help": "Triplet file whose rows become the prompts (id, original_text, rewrite_prompt, rewritten_text); "
                f"default: the train triplets saved in the SFT run's folder ({SPLIT_ROWS})."})
    max_train_triplets: int | None = field(default=None, metadata={"help": "Use a seeded sample of this many."})
    length_penalty_weight: float = field(default=0.0, metadata={
        "help": "Weight of the length penalty beside the SCS reward's 1.0 (GRPOConfig reward_weights); 0: off."})
    length_penalty_words: int = field(default=20, metadata={
        "help": "The length penalty is 0 up to this many words and -1 from twice as many."})

    def __post_init__(self):
        super().__post_init__()
        if self.length_penalty_weight < 0 or self.length_penalty_words < 1:
            raise ValueError("length_penalty_weight must be >= 0 and length_penalty_words >= 1")


def prompt_dataset(df: pd.DataFrame, tokenizer, max_text_tokens: int | None):
    """GRPO rows: ``prompt`` (the recovery chat, one user turn) and the columns the reward reads: ``rewrite_prompt``
    (the truth), ``original_text`` and ``rewritten_text`` (so a copy of the input is unusable, as at inference)."""
    from datasets import Dataset

    return Dataset.from_list([{"id": str(r.id), "prompt": recovery_messages(r.original_text, r.rewritten_text,
                                                                            tokenizer, max_text_tokens),
                               "rewrite_prompt": str(r.rewrite_prompt), "original_text": str(r.original_text),
                               "rewritten_text": str(r.rewritten_text)} for r in df.itertuples(index=False)])


def reward_functions(script_args: GRPOScriptArguments, training_args: GRPOConfig) -> list:
    """The SCS reward, plus the length penalty when it has a weight (set into ``training_args.reward_weights``)."""
    scorer = script_args.build(show_progress=False)
    funcs = [scs_reward(scorer)]
    if script_args.length_penalty_weight > 0:
        funcs.append(length_penalty(script_args.length_penalty_words))
        if training_args.reward_weights is None:
            training_args.reward_weights = [1.0, script_args.length_penalty_weight]
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(funcs):
        raise ValueError(f"reward_weights {training_args.reward_weights} for {len(funcs)} reward function(s) "
                         f"({', '.join(f.__name__ for f in funcs)})")
    return funcs


def main(script_args: GRPOScriptArguments, training_args: GRPOConfig,
         model_args: InheritedModelConfig) -> GRPOTrainer:
    # ---------------------------------------------------------------------------------------------- setup
    setup_logging(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    sft_run = inherit_from_sft(script_args, model_args)  # base, loading settings and text budget: the SFT run's
    logger.info("Script %s\nModel %s\nSFT run %s", script_args, model_args, script_args.sft_adapter)
    output_dir = Path(training_args.output_dir)

    # ------------------------------------------------------------------------------------ model & tokenizer
    tokenizer = load_tokenizer(script_args.sft_adapter)  # saved by the SFT run, chat template included
    model = load_base(model_args, adapter=script_args.sft_adapter, is_trainable=True)

    # -------------------------------------------------------------------------------------------- dataset
    df = (read_split_triplets(script_args.triplets) if script_args.triplets
          else split_rows(script_args.sft_adapter, "train"))
    if df is None:
        raise DataError(f"{script_args.sft_adapter}: no {SPLIT_ROWS} (an SFT run from before the triplets were saved "
                        "beside it); pass --triplets")
    if script_args.max_train_triplets and script_args.max_train_triplets < len(df):
        df = df.sample(n=script_args.max_train_triplets, random_state=training_args.seed)
    train_ds = prompt_dataset(df, tokenizer, script_args.max_text_tokens)
    logger.info("%d train prompts x %d generations; sample:\n%s\n→ %s", len(train_ds), training_args.num_generations,
                train_ds[0]["prompt"][-1]["content"], train_ds[0]["rewrite_prompt"])
    scs_df = sft_eval_triplets(script_args)

    # -------------------------------------------------------------------------------------------- trainer
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(script_args, training_args), args=training_args,
                          train_dataset=train_ds, processing_class=tokenizer)

    # ---------------------------------------------------------------------------------------------- train
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    metrics = {"train": result.metrics}

    # ----------------------------------------------------------------------------------------- SCS & save
    if scs_df is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" not in model.peft_config:  # with beta > 0 TRL keeps a frozen SFT copy as "ref"; else load it
            model.load_adapter(script_args.sft_adapter, adapter_name="ref", is_trainable=False)
        metrics["scs"] = scs_eval(model, tokenizer, scs_df, script_args, {"grpo": "default", "sft": "ref"},
                                  trainer.accelerator, output_dir / "eval_predictions.jsonl")
    config = continued_run_config("grpo", sft_run, script_args, training_args, model_args, script_args.triplets)
    save_run(trainer, config, metrics, panels=[("reward",), ("rewards/scs/mean",), ("completions/mean_length",),
                                               ("loss",)], from_run=script_args.sft_adapter)
    logger.info("Saved %s; metrics: %s", output_dir, {k: metrics[k] for k in ("train", "scs") if k in metrics})
    return trainer


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(GRPOScriptArguments, GRPOConfig, InheritedModelConfig)))
