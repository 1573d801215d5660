"""What the SFT, DPO and GRPO stages share: the model with its LoRA setup, dataset rendering, the SCS eval, run saving.

* **Model**: :func:`load_base` loads the base of TRL's ``ModelConfig`` through :func:`promptrec.models.load_model`
  (the one quantisation builder); :func:`lora_config` is ``trl.get_peft_config`` with the LoRA targets resolved per
  architecture (:data:`LORA_TARGETS`) and checked against the model's modules.
* **Data**: :func:`sft_dataset` renders triplets as TRL prompt/completion rows; :func:`read_pairs` checks TRL
  conversational preference rows.
* **Eval**: :func:`scs_eval` generates a prompt per eval triplet (greedy, sharded over processes) and scores it by SCS.
* **Saving**: :func:`save_run` writes ``checkpoints/<stage>/<run>/``: adapter, tokenizer, ``run_config.json``
  (resolved config + ``model_name_or_path`` and ``max_text_tokens`` for inference), ``metrics.json``, ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from promptrec.cli import asdict_all
from promptrec.environment import describe_environment
from promptrec.generation import default_batch_size
from promptrec.models import load_model, parse_dtype
from promptrec.plots import figure
from promptrec.policy import RUN_CONFIG, read_run_config
from promptrec.scoring import ScorerArguments
from promptrec.tables import DataError, read_table, write_json, write_table
from promptrec.templates import recovery_example, recovery_messages
from promptrec.triplets import read_triplets

logger = logging.getLogger(__name__)

# LoRA targets per architecture (``config.model_type``): attention and MLP projections. Phi-2 names its output
# projection ``dense`` and its MLP ``fc1``/``fc2``; Llama-style models (Mistral, SmolLM2, Gemma, Qwen2) share names.
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {"phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
                **dict.fromkeys(("mistral", "llama", "gemma", "qwen2"), _LLAMA_STYLE)}


@dataclass
class EvalArguments(ScorerArguments):
    """Task-format and generation-eval settings shared by the SFT and DPO scripts (plus the scorer's options)."""

    max_text_tokens: int | None = field(default=256, metadata={
        "help": "Token budget for each of the original and rewritten texts in the recovery prompt (cut with a "
                "marker). Saved in run_config.json so inference renders prompts the same way."})
    eval_scs_samples: int = field(default=64, metadata={
        "help": "Eval triplets to generate a prompt for and score by SCS at the end (0 turns the SCS eval off)."})
    gen_batch_size: int = field(default_factory=default_batch_size, metadata={
        "help": "Batch size of the eval generation (default: 32 on a CPU, 8 on a GPU)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest generated prompt in the SCS eval."})

    def __post_init__(self):
        if self.eval_scs_samples < 0 or self.gen_batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval_scs_samples must be >= 0, gen_batch_size and max_new_tokens >= 1")


@dataclass
class FromSFTArguments(EvalArguments):
    """What dpo/train.py and dpo/grpo.py share: the SFT run they continue, its text budget, the SCS eval triplets."""

    sft_adapter: str = field(default="checkpoints/sft/smollm2", metadata={
        "help": "Run folder of sft/train.py: its adapter is trained further; its run_config.json gives the base model "
                "and max_text_tokens when not set here; its split.json gives the train and SCS eval triplets."})
    eval_triplets: str | None = field(default=None, metadata={
        "help": "Triplet file for the SCS eval; default: the eval split saved by the SFT run (split.json)."})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "Token budget per text in the recovery prompt; default: the SFT run's (pairs must match it)."})


def split_triplets(run_dir: str | Path, side: str) -> pd.DataFrame | None:
    """The ``side`` (``train`` or ``eval``) triplets of a run's ``split.json`` (written by the SFT run, carried on by
    DPO runs), re-read from its source file in the saved order; None when the run has none."""
    path = Path(run_dir) / "split.json"
    if not path.is_file():
        return None
    split = json.loads(path.read_text(encoding="utf-8"))
    by_id = read_split_triplets(split["source"], split.get("producers", ())).set_index("id")
    missing = [i for i in split[f"{side}_ids"] if i not in by_id.index]
    if missing:
        raise DataError(f"{split['source']}: {len(missing)} {side} id(s) of {path} are gone (e.g. {missing[0]})")
    return by_id.loc[split[f"{side}_ids"]].reset_index()


def sft_eval_triplets(script_args: FromSFTArguments) -> pd.DataFrame | None:
    """The SCS eval triplets: ``--eval_triplets``, else the SFT run's eval split, capped at ``eval_scs_samples``;
    None when the eval is off or there is no split."""
    if script_args.eval_scs_samples == 0:
        return None
    df = (read_split_triplets(script_args.eval_triplets) if script_args.eval_triplets
          else split_triplets(script_args.sft_adapter, "eval"))
    if df is None:
        logger.warning("No split.json in %s and no --eval_triplets: SCS eval skipped", script_args.sft_adapter)
    return None if df is None else df.head(script_args.eval_scs_samples)


# ------------------------------------------------------------------------------------------------ model & LoRA
def default_lora_targets(model_type: str) -> list[str]:
    """The attention + MLP projections of an architecture (``config.model_type``)."""
    if model_type not in LORA_TARGETS:
        raise ValueError(f"No default LoRA targets for model_type '{model_type}': set lora_target_modules "
                         f"(e.g. all-linear); known: {', '.join(LORA_TARGETS)}")
    return list(LORA_TARGETS[model_type])


def check_lora_targets(model, targets) -> None:
    """Every named target must be a module of ``model`` (PEFT only complains when *none* matches)."""
    if isinstance(targets, str):  # "all-linear" or a regex: PEFT checks it
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"LoRA target(s) {missing} are not modules of this {model.config.model_type} model "
                         f"(its linear layers: {', '.join(linear)})")


def lora_config(model_args, model):
    """``trl.get_peft_config(model_args)`` with ``lora_target_modules`` None/``auto`` resolved for ``model``."""
    from trl import get_peft_config

    targets = model_args.lora_target_modules
    if targets in (None, "auto", ["auto"]):
        targets = default_lora_targets(model.config.model_type)
    check_lora_targets(model, targets)
    return get_peft_config(dataclasses.replace(model_args, use_peft=True, lora_target_modules=targets))


def dtype_name(model_args) -> str:
    """``model_args.dtype`` with ``auto`` resolved (bf16/fp16 on GPU, fp32 on CPU) as a torch dtype name."""
    return str(parse_dtype(model_args.dtype)).removeprefix("torch.")


def training_dtype(training_args, model_args) -> str:
    """What training computes in: ``"bfloat16 autocast over float32 weights"`` (``bf16``/``fp16`` mixed precision
    over weights of another dtype), else the weights' dtype name (:func:`dtype_name`)."""
    weights = dtype_name(model_args)
    autocast = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else None
    if autocast and autocast != weights:
        return f"{autocast} autocast over {weights} weights"
    return f"{weights} weights under {autocast} autocast" if autocast else weights


def load_base(model_args, adapter: str | None = None, is_trainable: bool = False):
    """The base model of ``model_args`` (quantised per its ``load_in_4bit``/``load_in_8bit`` and ``bnb_4bit_*``
    settings, compute dtype = ``dtype``, by the builder inference uses too), with ``adapter`` on top when given."""
    return load_model(model_args.model_name_or_path, adapter=adapter, dtype=dtype_name(model_args),
                      load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
                      quant_type=model_args.bnb_4bit_quant_type, double_quant=model_args.use_bnb_nested_quant,
                      quant_storage=model_args.bnb_4bit_quant_storage, is_trainable=is_trainable)


def inherit_from_sft(script_args, model_args) -> dict:
    """Fill the base model and ``max_text_tokens`` from the SFT run's config; returns that config. ``script_args``
    has ``sft_adapter`` (the SFT run folder) and ``max_text_tokens``; ``model_args`` is TRL's ``ModelConfig``."""
    sft_config = read_run_config(script_args.sft_adapter)
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = sft_config["model_name_or_path"]
    elif model_args.model_name_or_path != sft_config["model_name_or_path"]:
        logger.warning("Base %s differs from the SFT run's %s: fine for a local copy of the same model, wrong "
                       "otherwise", model_args.model_name_or_path, sft_config["model_name_or_path"])
    if script_args.max_text_tokens is None:
        script_args.max_text_tokens = sft_config.get("max_text_tokens")
    return sft_config


# ------------------------------------------------------------------------------------------------------- data
def read_split_triplets(path: str, producers=(), max_samples: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Triplets (``id, original_text, rewrite_prompt, rewritten_text``) via :func:`promptrec.triplets.read_triplets`,
    with the drop counts logged."""
    df, counts = read_triplets(path, producers=producers, limit=max_samples, seed=seed)
    logger.info("Triplets from %s: %s", path, counts)
    return df


def sft_dataset(df: pd.DataFrame, tokenizer, max_text_tokens: int | None):
    """TRL conversational prompt/completion rows (``id, prompt, completion``) of triplets, as a ``Dataset``."""
    from datasets import Dataset

    rows = [{"id": str(r.id), **recovery_example(r.original_text, r.rewritten_text, r.rewrite_prompt, tokenizer,
                                                 max_text_tokens)} for r in df.itertuples(index=False)]
    return Dataset.from_list(rows)


def _messages(value, role: str, where: str) -> list[dict]:
    """A list of ``{"role", "content"}`` dicts (parquet gives numpy arrays), checked."""
    value = list(value) if hasattr(value, "__len__") and not isinstance(value, (str, dict)) else value
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{where} is not a list of chat messages (TRL conversational format)")
    messages = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in value]
    if messages[-1]["role"] != role or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty '{role}' turn")
    return messages


def check_pairs_format(pairs_path: str, max_text_tokens: int | None) -> None:
    """Pairs must be rendered with the text budget the policy trained with; ``summary.json`` beside them (written
    by data_generation/build_pairs.py) records theirs. Raises :class:`DataError` when the two differ."""
    summary = Path(pairs_path).with_name("summary.json")
    recorded = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    if "max_text_tokens" in recorded and recorded["max_text_tokens"] != max_text_tokens:
        raise DataError(f"{pairs_path}: its prompts cut texts to {recorded['max_text_tokens']} tokens, the policy "
                        f"trained with max_text_tokens {max_text_tokens}; rebuild the pairs from candidates made "
                        "with --policy_adapter <the SFT run> (build_pairs reads the budget from there)")


def read_pairs(path: str, max_pairs: int | None = None, seed: int = 0):
    """Preference pairs (TRL conversational: ``prompt`` user turns, ``chosen``/``rejected`` one assistant turn
    each) as a ``Dataset`` of ``prompt, chosen, rejected``; extra columns (``id, score_*, source_*``) are dropped."""
    from datasets import Dataset

    df = read_table(path, required=("prompt", "chosen", "rejected"))
    if max_pairs and max_pairs < len(df):
        df = df.sample(n=max_pairs, random_state=seed).sort_index()
    roles = (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant"))
    return Dataset.from_list([{col: _messages(getattr(r, col), role, f"{path}: column '{col}' row {i}")
                               for col, role in roles} for i, r in enumerate(df.itertuples(index=False), start=1)])


def share_across_ranks(dataset, directory: Path, training_args):
    """``dataset`` saved by each machine's first process and loaded from disk by every process (one process: as is).

    TRL's ``precompute_ref_log_probs`` writes the reference log-probs to the main process's dataset cache path and
    reads them on the others from theirs; an in-memory dataset's cache path and fingerprint differ per process, so the
    other ranks fail ("Failed to open local file …/cache-….arrow"). Loaded from one directory, every rank agrees.
    """
    if training_args.world_size <= 1:
        return dataset
    from datasets import load_from_disk

    with training_args.main_process_first(desc=f"sharing {directory}"):
        if training_args.local_process_index == 0:
            shutil.rmtree(directory, ignore_errors=True)
            dataset.save_to_disk(str(directory))
        return load_from_disk(str(directory))


def rows_consumed(training_args) -> int | None:
    """Training rows that ``max_steps`` reaches (steps × per-device batch × accumulation × processes), or None
    when training runs by epochs. Rows past it are never trained on, so nothing need be computed for them."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        return None
    return (training_args.max_steps * training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps * training_args.world_size)


def write_split(path: Path, source: str, producers, split_by: str, eval_fraction: float, seed: int,
                train: pd.DataFrame, evaluation: pd.DataFrame) -> None:
    """``split.json``: where the triplets came from and which ids went where (DPO evaluates on the same ids)."""
    write_json({"source": source, "producers": list(producers), "split_by": split_by, "eval_fraction": eval_fraction,
                "seed": seed, "train_ids": train["id"].tolist(), "eval_ids": evaluation["id"].tolist()}, path)


# ------------------------------------------------------------------------------------------------------- eval
def predict_prompts(model, tokenizer, df: pd.DataFrame, eval_args: EvalArguments, accelerator=None) -> list[str]:
    """Greedy recovered prompt of each triplet; rows are sharded over processes and gathered on every rank."""
    from accelerate.utils import gather_object

    from promptrec.generation import SamplingParams, generate
    from promptrec.resumable import shard_items

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = shard_items(list(range(len(df))), rank, world)
    conversations = [recovery_messages(df["original_text"].iloc[i], df["rewritten_text"].iloc[i], tokenizer,
                                       eval_args.max_text_tokens) for i in mine]
    was_training = model.training
    model.eval()
    outputs = generate(model, tokenizer, conversations, SamplingParams(max_new_tokens=eval_args.max_new_tokens),
                       batch_size=eval_args.gen_batch_size, progress=rank == 0, desc="SCS eval")
    model.train(was_training)
    pairs = list(zip(mine, (texts[0] for texts in outputs)))
    by_index = dict(gather_object(pairs) if world > 1 else pairs)
    return [by_index[i] for i in range(len(df))]


def scs_eval(model, tokenizer, df: pd.DataFrame, eval_args: EvalArguments, adapters: dict[str, str | None],
             accelerator=None, predictions_path: Path | None = None) -> dict:
    """Mean SCS of each adapter's predictions on ``df`` (``adapters`` maps a label to an adapter name of the PEFT
    ``model``, None = adapters disabled = the base model). Per-row predictions go to ``predictions_path``."""
    from trl.trainer.utils import use_adapter

    if df.empty or not adapters:
        return {}
    plugin = getattr(accelerator.state, "deepspeed_plugin", None) if accelerator is not None else None
    if plugin is not None and plugin.zero_stage == 3:
        logger.warning("SCS eval skipped under DeepSpeed ZeRO-3 (each rank holds a shard of the weights): score the "
                       "saved adapter with inference/predict.py instead")
        return {}
    scorer = eval_args.build()
    table = df[["id", "rewrite_prompt"]].copy()
    result = {"n": len(df), "scorer": scorer.identity}
    for label, adapter in adapters.items():
        with use_adapter(model, adapter):
            table[label] = predict_prompts(model, tokenizer, df, eval_args, accelerator)
        table[f"scs_{label}"] = scorer.score(table[label].tolist(), table["rewrite_prompt"].tolist())
        result[label] = float(table[f"scs_{label}"].mean())
        logger.info("SCS eval (%s, %d rows, %s): %.4f", label, len(df), scorer.name, result[label])
    if predictions_path is not None and (accelerator is None or accelerator.is_main_process):
        write_table(table, predictions_path)
    return result


# ---------------------------------------------------------------------------------------------------- saving
def resolve_resume(training_args) -> str | None:
    """``resume_from_checkpoint``: a checkpoint dir, or ``last``/``true`` = the newest in ``output_dir`` (None when
    there is none yet, so the same command starts or continues a run)."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("last", "true", "yes", "auto"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        logger.info("Resuming from %s", last or "scratch (no checkpoint yet)")
        return last
    if not Path(value).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a directory")
    return value


def run_config(stage: str, script_args, training_args, model_args, **extra) -> dict:
    """The resolved config of a run; top-level keys are what inference needs to rebuild the model and prompts."""
    return {"stage": stage, "model_name_or_path": model_args.model_name_or_path,
            "max_text_tokens": script_args.max_text_tokens, "load_in_4bit": model_args.load_in_4bit,
            "dtype": dtype_name(model_args), "world_size": training_args.world_size, **extra,
            **asdict_all(script_args, training_args, model_args),
            "environment": describe_environment(training_dtype=training_dtype(training_args, model_args))}


def plot_curves(log_history: list[dict], path: Path, panels: list[tuple[str, ...]]) -> Path | None:
    """One panel per group of logged keys (e.g. ``("loss", "eval_loss")``) against the step; PNG at ``path``."""
    panels = [keys for keys in panels if any(k in row for row in log_history for k in keys)]
    if not panels:
        return None
    with figure(path, len(panels), size=(5 * len(panels), 3.6)) as axes:
        for ax, keys in zip(axes, panels):
            for key in keys:
                points = [(row["step"], row[key]) for row in log_history if key in row]
                if points:
                    ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key)
            ax.set(xlabel="step", title=keys[0])
            ax.legend()
            ax.grid(alpha=0.3)
    return path


def save_run(trainer, config: dict, metrics: dict, panels: list[tuple[str, ...]], from_run: str | None = None) -> Path:
    """Write the run folder (``training_args.output_dir``): adapter, tokenizer, ``run_config.json``, ``metrics.json``,
    ``curves.png`` and, with ``from_run`` (the run this one continued), its ``split.json``, so a run continuing this
    one (an iterative DPO round) evaluates on the same rows. Call on every rank (collective under DeepSpeed)."""
    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        # DPOTrainer keeps a frozen copy of the SFT adapter named "ref" as its reference; PEFT saves every
        # adapter, so drop that copy: the run's adapter is the trained "default" one at the folder's root.
        shutil.rmtree(out / "ref", ignore_errors=True)
        trainer.processing_class.save_pretrained(out)
        write_json(config, out / RUN_CONFIG)
        write_json(metrics, out / "metrics.json")
        plot_curves(trainer.state.log_history, out / "curves.png", panels)
        if from_run and (Path(from_run) / "split.json").is_file():
            shutil.copyfile(Path(from_run) / "split.json", out / "split.json")
    trainer.accelerator.wait_for_everyone()
    return out
