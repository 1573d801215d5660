"""DPO of the SFT adapter on SCS-ranked preference pairs (TRL ``DPOTrainer``), on one process or many.

The base model, loaded as the SFT run's run_config.json says (4-bit or not; the recipe repeats none of it), gets
the SFT adapter loaded trainable. No reference model is passed: TRL keeps a
frozen copy of the SFT adapter (adapter "ref", a few MB) on the same base, so the reference is the SFT policy and
the base weights live in memory once. ``precompute_ref_log_probs`` computes the reference log-probs in one pass
before training instead. At the end the DPO adapter and the SFT adapter are scored by SCS on the same eval
triplets (the eval triplets saved in the SFT run's folder unless ``--eval_triplets`` is given).

``--ref_adapter PATH`` makes another saved adapter the reference instead (:class:`RefAdapterDPOTrainer`): e.g. the
SFT run's in a later DPO round, so that each round is held to SFT and drift does not compound. The SCS eval still
compares with the adapter training started from (``--sft_adapter``), labelled ``sft``.

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
from trl.trainer.utils import disable_dropout_in_model, hash_module

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.models import ModelNotFoundError, check_adapter_weights, load_tokenizer
from promptrec.run_config import RUN_CONFIG, RunConfig, read_run_config
from promptrec.tables import require_path
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
    ref_adapter: str | None = field(default=None, metadata={
        "help": "Saved adapter to use as DPO's reference, e.g. the SFT run's in a later round (drift does not "
                "compound); default (empty or 'none' too): a frozen copy of --sft_adapter, where training starts."})

    def __post_init__(self):
        super().__post_init__()
        if self.eval_pairs is not None and self.eval_pairs.strip().lower() in ("", "none"):
            self.eval_pairs = None
        if self.ref_adapter is not None and self.ref_adapter.strip().lower() in ("", "none"):
            self.ref_adapter = None


def check_ref_adapter(path: str, sft_run: RunConfig, allow_override: bool = False) -> None:
    """``--ref_adapter`` must be a saved PEFT adapter folder (one-line errors naming the path); when it holds a
    run_config.json, its base model must be the SFT run's (else :class:`DataError` naming both)."""
    require_path(path, "directory", hint="--ref_adapter")
    if not (Path(path) / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"{path}: no adapter_config.json (--ref_adapter must be a saved PEFT adapter)")
    check_adapter_weights(path)
    ref = read_run_config(path, required=False)
    if ref is not None:
        sft_run.agree("model_name_or_path", ref.model_name_or_path, allow_override, str(Path(path) / RUN_CONFIG))


def load_ref_adapter(model, path: str, disable_dropout: bool = True) -> None:
    """Make adapter "ref" of the PEFT ``model`` the one saved at ``path`` (its rank and targets may differ from
    "default"), frozen, replacing TRL's copy; "default" stays the active, trainable adapter."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.load_adapter(path, adapter_name="ref", is_trainable=False)
    model.set_adapter("default")  # PEFT: the active adapter is trainable, the others frozen
    for name, param in model.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)
    if disable_dropout:  # as TRL did to the model before the new adapter's LoRA dropout existed
        disable_dropout_in_model(model)


class RefAdapterDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` whose reference is the adapter saved at ``ref_adapter`` (when given) instead of a frozen
    copy of the adapter training starts from. TRL 1.16 makes that copy (adapter "ref") in ``__init__`` and, with
    ``precompute_ref_log_probs``, also runs the reference over the data there, keyed by a hash of the model; so the
    adapter is swapped, and the hash renewed, at the first reference pass or at the end of ``__init__``."""

    def __init__(self, *args, ref_adapter: str | None = None, **kwargs):
        self.ref_adapter, self._ref_loaded = ref_adapter, ref_adapter is None
        super().__init__(*args, **kwargs)
        self._load_ref_adapter()

    def _load_ref_adapter(self) -> None:
        if self._ref_loaded:
            return
        self._ref_loaded = True
        load_ref_adapter(self.accelerator.unwrap_model(self.model), self.ref_adapter, self.args.disable_dropout)
        logger.info("DPO reference: adapter %s", self.ref_adapter)
        if self.args.precompute_ref_log_probs:  # the key of TRL's cached reference log-probs
            self._precompute_model_hash = hash_module(self.model)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        self._load_ref_adapter()
        return super()._precompute_ref_logps(dataset, name, batch_size)


def main(script_args: DPOScriptArguments, training_args: DPOConfig,
         model_args: InheritedModelConfig) -> DPOTrainer:
    # ---------------------------------------------------------------------------------------------- setup
    setup_logging(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    sft_run = inherit_from_sft(script_args, model_args)  # base, loading settings and text budget: the SFT run's
    check_pairs_format(script_args.train_pairs, script_args.max_text_tokens)
    if script_args.ref_adapter:
        check_ref_adapter(script_args.ref_adapter, sft_run, script_args.allow_config_override)
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
    trainer = RefAdapterDPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=train_ds,
                                   eval_dataset=eval_ds, processing_class=tokenizer,
                                   ref_adapter=script_args.ref_adapter)

    # ---------------------------------------------------------------------------------------------- train
    result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    metrics = {"train": result.metrics, "reference_adapter": script_args.ref_adapter or script_args.sft_adapter}
    if eval_ds is not None:
        metrics["eval"] = trainer.evaluate()

    # ----------------------------------------------------------------------------------------- SCS & save
    if scs_df is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        # "sft" is the adapter training started from: TRL's frozen copy "ref", unless the reference is another one
        start = "ref" if script_args.ref_adapter is None and "ref" in model.peft_config else "start"
        if start == "start":
            model.load_adapter(script_args.sft_adapter, adapter_name=start, is_trainable=False)
        metrics["scs"] = scs_eval(model, tokenizer, scs_df, script_args, {"dpo": "default", "sft": start},
                                  trainer.accelerator, output_dir / "eval_predictions.jsonl")
        if start == "start":
            model.delete_adapter(start)  # save only "default"
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
