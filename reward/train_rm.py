"""A reward model for reranking recovered prompts (TRL ``RewardTrainer``), on the SCS-ranked pairs of build_pairs.

The policy's base is loaded as a sequence classifier with one output (its new ``score`` head drawn from the seed) and
gets a LoRA adapter (task SEQ_CLS; the head is trained and saved whole through ``modules_to_save``). Each side of a
pair is read as the recovery prompt the policy sees plus the candidate as the assistant's reply, through the chat
template (:func:`promptrec.reward_model.reward_input_ids`, also what inference scores). The loss is TRL's
Bradley–Terry ``-log σ(r_chosen − r_rejected)``; ``--margin true`` gives each pair TRL's ``margin`` column, its SCS
gap ``score_chosen − score_rejected``, and the loss becomes ``-log σ(r_chosen − r_rejected − margin)``: a pair
whose SCS differ a lot must be separated by more reward before its loss fades.

    python reward/train_rm.py --config reward/configs/rm_smollm2.yaml
    python reward/train_rm.py --config reward/configs/rm_smollm2.yaml --margin true \\
        --output_dir checkpoints/reward/smollm2_margin
    accelerate launch --config_file dpo/accelerate/multi_cpu.yaml reward/train_rm.py \\
        --config reward/configs/rm_smollm2.yaml
    accelerate launch --config_file dpo/accelerate/single_gpu.yaml reward/train_rm.py \\
        --config reward/configs/rm_mistral7b_qlora.yaml

Outputs in ``output_dir`` (``checkpoints/reward/<run>/``): adapter with the score head, tokenizer, run_config.json
(stage ``reward_model``: the base, how it is loaded, the text budget of the pairs' prompts), README.md (model card),
metrics.json (TRL's eval loss/accuracy/margin and ``ranking``: pairwise accuracy on the eval pairs, Spearman of the
reward with their true SCS), curves.png. Load it with :func:`promptrec.reward_model.load_reward_model`.
``--resume_from_checkpoint last`` continues a killed run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from trl import ModelConfig, RewardConfig, RewardTrainer

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.models import load_tokenizer
from promptrec.reward_model import HEAD, STAGE, RewardModel, eval_candidates, preference_ids, ranking_metrics
from promptrec.run_config import DEFAULT_MAX_TEXT_TOKENS
from promptrec.tables import DataError
from promptrec.training import (
    check_pairs_format,
    load_base,
    lora_config,
    new_adapter_run_config,
    pairs_summary,
    read_pairs,
    resolve_resume,
    rows_consumed,
    save_run,
)

logger = logging.getLogger("train_rm")
SCORES = ("score_chosen", "score_rejected")


@dataclass
class RMScriptArguments:
    """Data settings of the reward model (training settings are TRL's RewardConfig, the model's ModelConfig)."""

    train_pairs: str = field(default="checkpoints/data/smollm2/pairs/train.jsonl", metadata={
        "help": "Pairs of data_generation/build_pairs.py (TRL conversational prompt, chosen, rejected; score_chosen "
                "and score_rejected with --margin): the train side only."})
    eval_pairs: str | None = field(default=None, metadata={
        "help": "Held-out pairs (eval loss and accuracy, and the final ranking eval: pairwise accuracy, Spearman with "
                "the true SCS); empty or 'none' for none."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use a seeded sample of this many pairs."})
    max_eval_pairs: int | None = field(default=256, metadata={"help": "Cap on the eval pairs."})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "Token budget per text the pairs' prompts were cut to (inference renders with it); default: the one "
                f"summary.json beside the pairs records, else {DEFAULT_MAX_TEXT_TOKENS}. A value given must agree."})
    margin: bool = field(default=False, metadata={
        "help": "Give TRL's RewardTrainer a margin column, score_chosen - score_rejected: the loss becomes "
                "-log sigmoid(r_chosen - r_rejected - margin)."})

    def __post_init__(self):
        if self.eval_pairs is not None and self.eval_pairs.strip().lower() in ("", "none"):
            self.eval_pairs = None
        if any(n is not None and n < 1 for n in (self.max_train_pairs, self.max_eval_pairs)):
            raise ValueError("max_train_pairs and max_eval_pairs must be >= 1")


def text_budget(script_args: RMScriptArguments) -> int | None:
    """The texts' token budget of the pairs' prompts: the one given (checked against the pairs' summary.json), else
    the recorded one, else the default. Both pair files must agree with it (:class:`DataError` naming the file)."""
    recorded = pairs_summary(script_args.train_pairs)
    budget = script_args.max_text_tokens
    if budget is None:
        budget = recorded.get("max_text_tokens", DEFAULT_MAX_TEXT_TOKENS)
        if "max_text_tokens" not in recorded:
            logger.warning("No summary.json beside %s: its prompts are taken as cut to %s tokens per text",
                           script_args.train_pairs, budget)
    for path in filter(None, (script_args.train_pairs, script_args.eval_pairs)):
        check_pairs_format(path, budget)
    return budget


def tokenized(pairs, tokenizer, margin: bool, max_length: int | None, path: str):
    """TRL's tokenised preference rows (:func:`promptrec.reward_model.preference_ids`) of ``pairs``, without those
    longer than ``max_length`` (RewardTrainer would drop them silently; here they are counted)."""
    ds = pairs.map(preference_ids, fn_kwargs={"tokenizer": tokenizer, "margin": margin},
                   remove_columns=pairs.column_names, desc=f"Tokenizing {Path(path).name}")
    if max_length is not None:
        ds = ds.filter(lambda r: max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= max_length)
        if len(ds) < len(pairs):
            logger.warning("%s: %d of %d pairs are longer than max_length %d tokens and are left out", path,
                           len(pairs) - len(ds), len(pairs), max_length)
    if len(ds) == 0:
        raise DataError(f"{path}: every pair is longer than max_length {max_length} tokens (raise --max_length)")
    return ds


def ranking_eval(trainer, pairs, budget: int | None) -> dict:
    """:func:`promptrec.reward_model.ranking_metrics` of the trained model on the eval ``pairs`` (main process)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        logger.warning("Ranking eval skipped under ZeRO-3 (each rank holds a shard of the weights)")
        return {}
    df = pairs.to_pandas()
    candidates = eval_candidates(df)
    rm = RewardModel(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, budget)
    rewards = rm.score_messages(candidates["prompt"].tolist(), candidates["candidate"].tolist(),
                                trainer.args.per_device_eval_batch_size)
    return ranking_metrics(df, candidates, rewards)


def main(script_args: RMScriptArguments, training_args: RewardConfig, model_args: ModelConfig) -> RewardTrainer:
    # ---------------------------------------------------------------------------------------------- setup
    setup_logging(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    logger.info("Script %s\nModel %s", script_args, model_args)
    if script_args.eval_pairs and Path(script_args.eval_pairs).is_file() and not Path(script_args.eval_pairs).stat(
            ).st_size:  # build_pairs writes an empty file when no eval example gave a pair (tiny runs, strict recipes)
        logger.warning("%s holds no pairs: training without eval", script_args.eval_pairs)
        script_args.eval_pairs = None
    script_args.max_text_tokens = text_budget(script_args)

    # -------------------------------------------------------------------------------------------- dataset
    caps = [n for n in (script_args.max_train_pairs, rows_consumed(training_args)) if n]
    train_pairs = read_pairs(script_args.train_pairs, min(caps) if caps else None, training_args.seed,
                             keep=SCORES if script_args.margin else ())
    eval_pairs = (read_pairs(script_args.eval_pairs, script_args.max_eval_pairs, training_args.seed, keep=SCORES)
                  if script_args.eval_pairs else None)
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
    train_ds = tokenized(train_pairs, tokenizer, script_args.margin, training_args.max_length, script_args.train_pairs)
    eval_ds = (tokenized(eval_pairs, tokenizer, script_args.margin, training_args.max_length, script_args.eval_pairs)
               if eval_pairs is not None else None)
    if eval_ds is None:
        training_args.eval_strategy = "no"
    logger.info("%d train pairs, %d eval pairs; a chosen side as the reward model reads it:\n%s", len(train_ds),
                len(eval_ds or []), tokenizer.decode(train_ds[0]["chosen_ids"]))

    # ------------------------------------------------------------------------------------ model & LoRA
    set_seed(training_args.seed)  # the new score head is drawn at load time
    model = load_base(model_args, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last token that is not padding
    # SEQ_CLS: PEFT wraps it as a sequence classifier; the score head is trained whole and saved with the adapter.
    model_args.lora_task_type = "SEQ_CLS"
    model_args.lora_modules_to_save = sorted({*(model_args.lora_modules_to_save or []), HEAD})
    peft_config = lora_config(model_args, model)

    # -------------------------------------------------------------------------------------------- trainer
    trainer = RewardTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=peft_config)
    if trainer.accelerator.is_main_process:
        trainer.model.print_trainable_parameters()

    # ---------------------------------------------------------------------------------------------- train
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    metrics = {"train": result.metrics}
    if eval_ds is not None:
        metrics["eval"] = trainer.evaluate()
        if trainer.accelerator.is_main_process:
            metrics["ranking"] = ranking_eval(trainer, eval_pairs, script_args.max_text_tokens)
            logger.info("Ranking eval: %s", metrics["ranking"])

    # ----------------------------------------------------------------------------------------------- save
    summary = pairs_summary(script_args.train_pairs)
    pairs = {"train": script_args.train_pairs, "eval": script_args.eval_pairs, "train_pairs": len(train_ds),
             "eval_pairs": len(eval_ds or []), "margin": script_args.margin,
             **{k: summary[k] for k in ("scorer", "split", "strategy") if k in summary}}
    config = new_adapter_run_config(STAGE, script_args, training_args, model_args, model, tokenizer,
                                    peft_config.target_modules, trained_on=script_args.train_pairs, pairs=pairs)
    save_run(trainer, config, metrics, panels=[("loss", "eval_loss"), ("accuracy", "eval_accuracy"),
                                               ("margin", "eval_margin")])
    logger.info("Saved %s; metrics: %s", training_args.output_dir,
                {k: metrics[k] for k in ("eval", "ranking") if k in metrics})
    return trainer


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(RMScriptArguments, RewardConfig, ModelConfig)))
