"""What the SFT, DPO and GRPO stages share: the model with its LoRA setup, dataset rendering, the SCS eval, run saving.

* **Model**: :func:`load_base` loads the base of TRL's ``ModelConfig`` through :func:`promptrec.models.load_model`
  (the one quantisation builder); :func:`lora_config` is ``trl.get_peft_config`` with the LoRA targets resolved per
  architecture (:data:`LORA_TARGETS`) and checked against the model's modules.
* **Data**: :func:`sft_dataset` renders triplets as TRL prompt/completion rows; :func:`read_pairs` checks TRL
  conversational preference rows.
* **Eval**: :func:`scs_eval` generates a prompt per eval triplet (greedy, sharded over processes) and scores it by SCS.
* **The run contract**: the SFT run writes its :class:`~promptrec.run_config.RunConfig` (:func:`sft_run_config`) and
  its train/eval triplets; DPO and GRPO take the model settings from it (:class:`InheritedModelConfig`,
  :func:`inherit_from_sft`) and their rows from its folder (:func:`sft_eval_triplets`); so does an SFT run that
  continues another (``sft/train.py --init_adapter``, :func:`inherit_from_run`).
* **Time limit**: :class:`TimeLimit` ends training after a given wall time (the compute-matched control).
* **Saving**: :func:`save_run` writes ``checkpoints/<stage>/<run>/``: adapter, tokenizer, ``run_config.json``,
  ``metrics.json``, ``curves.png``, the model card ``README.md`` and the SFT run's triplets (carried on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig

from promptrec.cli import asdict_all
from promptrec.environment import describe_environment
from promptrec.generation import SamplingParams, default_batch_size, generate
from promptrec.model_card import write_model_card
from promptrec.models import hub_id, load_model, model_shape, parse_dtype
from promptrec.plots import figure
from promptrec.resumable import shard_items
from promptrec.run_config import (
    INHERITED,
    RUN_CONFIG,
    SPLIT_ROWS,
    RunConfig,
    TrainingData,
    override_field,
    read_run_config,
    split_rows,
)
from promptrec.scoring import ScorerArguments
from promptrec.tables import DataError, read_table, require_path, write_json, write_table
from promptrec.templates import GEMMA_CHAT_TEMPLATE, INSTRUCT_OUTPUT_TEMPLATE, recovery_example, recovery_messages
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
        "help": f"Run folder of sft/train.py: its adapter is trained further; its {RUN_CONFIG} gives the base model, "
                f"how it is loaded and max_text_tokens; its {SPLIT_ROWS} the train and SCS eval triplets."})
    eval_triplets: str | None = field(default=None, metadata={
        "help": f"Triplet file for the SCS eval; default: the eval triplets saved by the SFT run ({SPLIT_ROWS})."})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "Token budget per text in the recovery prompt; default: the SFT run's (pairs must match it)."})
    allow_config_override: bool = override_field()


@dataclass
class InheritedModelConfig(ModelConfig):
    """TRL's ``ModelConfig`` for DPO and GRPO: the base model and how it is loaded (:data:`INHERITED`) default to
    None, which means the SFT run's (:func:`inherit_from_sft`); a value given must agree with the SFT run's."""

    model_revision: str | None = field(default=None, metadata={"help": "Base model revision; default: the SFT run's."})
    dtype: str | None = field(default=None, metadata={"help": "Weights dtype; default: the SFT run's.",
                                                      "choices": ["auto", "bfloat16", "float16", "float32"]})
    load_in_8bit: bool | None = field(default=None, metadata={"help": "8-bit base; default: as the SFT run."})
    load_in_4bit: bool | None = field(default=None, metadata={"help": "4-bit base; default: as the SFT run."})
    bnb_4bit_quant_type: str | None = field(default=None, metadata={"help": "4-bit type; default: the SFT run's.",
                                                                    "choices": ["fp4", "nf4"]})
    use_bnb_nested_quant: bool | None = field(default=None, metadata={
        "help": "Double quantisation; default: as the SFT run."})


def inherit_from_sft(script_args: FromSFTArguments, model_args: ModelConfig) -> RunConfig:
    """The SFT run's :class:`RunConfig` (``script_args.sft_adapter``), with the unset (None) :data:`INHERITED` fields
    of ``model_args`` and ``script_args.max_text_tokens`` filled from it. A value given that contradicts the SFT
    run's raises :class:`DataError` naming both, unless ``script_args.allow_config_override``."""
    return inherit_from_run(script_args.sft_adapter, script_args, model_args)


def inherit_from_run(run_dir: str, script_args, model_args, unset: dict | None = None) -> RunConfig:
    """The :class:`RunConfig` of ``run_dir``, with the :data:`INHERITED` fields of ``model_args`` and
    ``script_args.max_text_tokens`` that are unset filled from it, as :func:`inherit_from_sft` does. Unset means None,
    or equal to its value in ``unset`` (for parsers whose fields default to a value, not None: sft/train.py's TRL
    ``ModelConfig``; :func:`declared_defaults`). A value given that contradicts the run's raises :class:`DataError`
    naming both, unless ``script_args.allow_config_override``."""
    run = read_run_config(run_dir)
    where, allow, unset = str(Path(run_dir) / RUN_CONFIG), script_args.allow_config_override, unset or {}

    def given(args, name):
        value = getattr(args, name)
        return None if name in unset and value == unset[name] else value

    for name in INHERITED:
        setattr(model_args, name, run.agree(name, given(model_args, name), allow, where))
    script_args.max_text_tokens = run.agree("max_text_tokens", given(script_args, "max_text_tokens"), allow, where)
    return run


def declared_defaults(*dataclass_types) -> dict:
    """``{field name: default}`` of the dataclasses' fields that declare a plain default (later types win)."""
    return {f.name: f.default for cls in dataclass_types for f in dataclasses.fields(cls) if f.default is not MISSING}


def sft_eval_triplets(script_args: FromSFTArguments) -> pd.DataFrame | None:
    """The SCS eval triplets: ``--eval_triplets``, else the eval triplets saved in the SFT run's folder, capped at
    ``eval_scs_samples``; None when the eval is off or the run saved none."""
    if script_args.eval_scs_samples == 0:
        return None
    df = (read_split_triplets(script_args.eval_triplets) if script_args.eval_triplets
          else split_rows(script_args.sft_adapter, "eval"))
    if df is None:
        logger.warning("No %s in %s and no --eval_triplets: SCS eval skipped", SPLIT_ROWS, script_args.sft_adapter)
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


def load_base(model_args, adapter: str | None = None, is_trainable: bool = False, num_labels: int | None = None):
    """The base model of ``model_args`` (quantised per its ``load_in_4bit``/``load_in_8bit`` and ``bnb_4bit_*``
    settings, compute dtype = ``dtype``, by the builder inference uses too), with ``adapter`` on top when given;
    a sequence classifier with ``num_labels`` outputs when given (the reward model)."""
    return load_model(model_args.model_name_or_path, adapter=adapter, dtype=dtype_name(model_args),
                      load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
                      quant_type=model_args.bnb_4bit_quant_type, double_quant=model_args.use_bnb_nested_quant,
                      quant_storage=model_args.bnb_4bit_quant_storage, is_trainable=is_trainable,
                      revision=model_args.model_revision, attn_implementation=model_args.attn_implementation,
                      num_labels=num_labels)


# ------------------------------------------------------------------------------------------------------- data
def read_split_triplets(path: str, producers=(), max_samples: int | None = None, seed: int = 0,
                        exclude_ids: str | None = None) -> pd.DataFrame:
    """Triplets (``id, original_text, rewrite_prompt, rewritten_text``) via :func:`promptrec.triplets.read_triplets`,
    with the drop counts logged. ``exclude_ids`` names a table with an ``id`` column: those triplets are dropped
    before the ``max_samples`` sample is drawn (so the sample is of the rows that remain)."""
    if exclude_ids is None:
        df, counts = read_triplets(path, producers=producers, limit=max_samples, seed=seed)
    else:
        df, counts = read_triplets(path, producers=producers, seed=seed)
        excluded = set(read_table(exclude_ids, required=("id",))["id"].astype(str))
        keep = ~df["id"].isin(excluded)
        counts["excluded"] = int((~keep).sum())
        df = df[keep]
        if max_samples and max_samples < len(df):  # read_triplets' own sampling rule, on the rows left
            df = df.sample(n=max_samples, random_state=seed).sort_index()
        counts["kept"] = len(df)
        df = df.reset_index(drop=True)
        if df.empty:
            raise DataError(f"{path}: no triplets left after excluding the ids in {exclude_ids}")
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


def pairs_summary(pairs_path: str) -> dict:
    """The ``summary.json`` data_generation/build_pairs.py wrote beside the pairs (``{}`` when there is none)."""
    path = Path(pairs_path).with_name("summary.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_pairs_format(pairs_path: str, max_text_tokens: int | None) -> None:
    """Pairs must be rendered with the text budget the policy trained with; their :func:`pairs_summary` records
    theirs. Raises :class:`DataError` when the two differ."""
    recorded = pairs_summary(pairs_path)
    if "max_text_tokens" in recorded and recorded["max_text_tokens"] != max_text_tokens:
        raise DataError(f"{pairs_path}: its prompts cut texts to {recorded['max_text_tokens']} tokens, the policy "
                        f"trained with max_text_tokens {max_text_tokens}; rebuild the pairs from candidates made "
                        "with --policy_adapter <the SFT run> (build_pairs reads the budget from there)")


def read_pairs(path: str, max_pairs: int | None = None, seed: int = 0, keep: tuple[str, ...] = ()):
    """Preference pairs (TRL conversational: ``prompt`` user turns, ``chosen``/``rejected`` one assistant turn
    each) as a ``Dataset`` of ``prompt, chosen, rejected``; extra columns (``id, score_*, source_*``) are dropped,
    except the ``keep`` ones, which must then be there (``score_chosen`` and ``score_rejected`` must be numbers)."""
    from datasets import Dataset

    df = read_table(path, required=("prompt", "chosen", "rejected", *keep))
    if max_pairs and max_pairs < len(df):
        df = df.sample(n=max_pairs, random_state=seed).sort_index()
    for col in {"score_chosen", "score_rejected"} & set(keep):
        values = pd.to_numeric(df[col], errors="coerce")
        if not values.map(math.isfinite).all():
            row = int((~values.map(math.isfinite)).to_numpy().nonzero()[0][0]) + 1
            raise DataError(f"{path}: column '{col}' row {row} is not a number ({df[col].iloc[row - 1]!r:.40})")
        df[col] = values.astype(float)
    roles = (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant"))
    return Dataset.from_list([{**{col: _messages(getattr(r, col), role, f"{path}: column '{col}' row {i}")
                                  for col, role in roles}, **{col: getattr(r, col) for col in keep}}
                              for i, r in enumerate(df.itertuples(index=False), start=1)])


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


# ------------------------------------------------------------------------------------------------------- eval
def predict_prompts(model, tokenizer, df: pd.DataFrame, eval_args: EvalArguments, accelerator=None) -> list[str]:
    """Greedy recovered prompt of each triplet; rows are sharded over processes and gathered on every rank."""
    from accelerate.utils import gather_object

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


# ------------------------------------------------------------------------------------------------ time limit
class TimeLimit(TrainerCallback, ExportableState):
    """Ends training once ``seconds`` of wall time have passed since it began (``on_train_begin``; loading the model
    and data is not counted), checked at each optimizer step's end: the trainer stops as after its last step and the
    script evaluates and saves as usual. :meth:`summary` says how long it ran and the global step it reached.
    Checkpoints record the seconds trained up to them (transformers' stateful callbacks), so a run resumed with
    ``--resume_from_checkpoint`` gets what is left of the budget, not a fresh one. ``clock`` is for tests. With
    several processes the ranks agree (any rank past the limit stops all), so none is left waiting in a collective
    the others have quit."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.start: float | None = None
        self.before, self.elapsed, self.steps, self.stopped = 0.0, 0.0, 0, False

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds}, "attributes": {"elapsed": self.elapsed}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step else None
        self.before = self.elapsed = float(saved["attributes"]["elapsed"]) if isinstance(saved, dict) else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = self.clock()
        self.elapsed, self.steps = self.before + self.clock() - self.start, state.global_step
        if _on_any_rank(self.elapsed >= self.seconds, args):
            control.should_training_stop = self.stopped = True
            logger.info("Time limit: %.1f s >= %g s at step %d, training stops", self.elapsed, self.seconds,
                        state.global_step)
        return control

    def summary(self) -> dict:
        """``max_train_seconds``, the ``seconds`` trained (to the last step's end), the global ``steps`` reached and
        whether the limit ``stopped`` training (False: it ended by max_steps or epochs first)."""
        return {"max_train_seconds": self.seconds, "seconds": round(self.elapsed, 3), "steps": self.steps,
                "stopped": self.stopped}


def _on_any_rank(flag: bool, args) -> bool:
    """``flag`` on one process; its OR over all processes under torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor(float(flag), device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ---------------------------------------------------------------------------------------------------- saving
def resolve_resume(training_args) -> str | None:
    """``resume_from_checkpoint``: a checkpoint dir, or ``last``/``true`` = the newest in ``output_dir`` (None when
    there is none yet, so the same command starts or continues a run)."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("last", "true", "yes", "auto"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        logger.info("Resuming from %s", last or "scratch (no checkpoint yet)")
        return last
    require_path(value, "directory", hint="--resume_from_checkpoint")
    return value


def chat_template_name(tokenizer) -> str:
    """Which chat template a tokenizer renders with: its own, or one promptrec gave it (ensure_chat_template)."""
    given = {GEMMA_CHAT_TEMPLATE: "promptrec's Gemma", INSTRUCT_OUTPUT_TEMPLATE: "promptrec's Instruct/Output"}
    return given.get(getattr(tokenizer, "chat_template", None), "the tokenizer's own")


def run_sections(script_args, training_args, model_args, **extra) -> dict:
    """The non-schema sections of a ``run_config.json``: world size, the resolved dataclasses, the environment."""
    return {"world_size": training_args.world_size, **extra, **asdict_all(script_args, training_args, model_args),
            "environment": describe_environment(training_dtype=training_dtype(training_args, model_args))}


def _model_fields(model_args) -> dict:
    return {**{name: getattr(model_args, name) for name in INHERITED}, "dtype": dtype_name(model_args)}


def sft_run_config(script_args, training_args, model_args, model, tokenizer, lora_targets,
                   data: TrainingData) -> RunConfig:
    """The :class:`RunConfig` an SFT run writes: the base (``model`` as loaded, before the adapter) and how it was
    loaded, the prompt format of ``tokenizer`` and ``script_args.max_text_tokens``, the LoRA targets, the data."""
    return new_adapter_run_config("sft", script_args, training_args, model_args, model, tokenizer, lora_targets,
                                  data=data)


def new_adapter_run_config(stage: str, script_args, training_args, model_args, model, tokenizer, lora_targets,
                           data: TrainingData | None = None, trained_on: str | None = None, **extra) -> RunConfig:
    """The :class:`RunConfig` of a run that trained a new LoRA adapter on ``model_args``' base (SFT, the reward
    model): as :func:`sft_run_config`, with its ``stage``, what it ``trained_on`` and ``extra`` top-level keys."""
    return RunConfig(stage=stage, **_model_fields(model_args), base_model_id=hub_id(model_args.model_name_or_path),
                     base_shape=model_shape(model.config), tokenizer=model_args.model_name_or_path,
                     chat_template=chat_template_name(tokenizer), max_text_tokens=script_args.max_text_tokens,
                     lora_target_modules=sorted(lora_targets), lora_r=model_args.lora_r,
                     lora_alpha=model_args.lora_alpha, data=data, trained_on=trained_on,
                     sections=run_sections(script_args, training_args, model_args, **extra))


def continued_run_config(stage: str, sft: RunConfig, script_args, training_args, model_args,
                         trained_on: str | None, data: TrainingData | None = None, **extra) -> RunConfig:
    """The :class:`RunConfig` of a run that continued the SFT run ``sft`` (DPO, GRPO, SFT continued): the SFT run's,
    with this run's model settings (the SFT run's unless overridden), its stage, what it trained on besides the SFT
    data, its own ``data`` when it split triplets itself (SFT continued), and ``extra`` top-level keys."""
    sections = run_sections(script_args, training_args, model_args, sft_run=sft.to_dict(), **extra)
    return dataclasses.replace(sft, stage=stage, **_model_fields(model_args), trained_on=trained_on,
                               max_text_tokens=script_args.max_text_tokens, sections=sections,
                               data=data or sft.data,
                               base_model_id=hub_id(model_args.model_name_or_path) or sft.base_model_id)


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


def save_run(trainer, config: RunConfig, metrics: dict, panels: list[tuple[str, ...]],
             from_run: str | None = None) -> Path:
    """Write the run folder (``training_args.output_dir``): adapter, tokenizer, ``run_config.json``, ``metrics.json``,
    ``curves.png``, the model card ``README.md`` (replacing TRL's) and, with ``from_run`` (the run this one
    continued), its saved triplets, so a run continuing this one (an iterative DPO round) finds the same rows. Call
    on every rank (collective under DeepSpeed)."""
    out = Path(trainer.args.output_dir)
    trainer.save_model(str(out))
    metrics.setdefault("train", {})["global_step"] = trainer.state.global_step  # the step of the saved adapter
    if trainer.accelerator.is_main_process:
        # DPOTrainer keeps a frozen copy of the SFT adapter named "ref" as its reference; PEFT saves every
        # adapter, so drop that copy: the run's adapter is the trained "default" one at the folder's root.
        shutil.rmtree(out / "ref", ignore_errors=True)
        trainer.processing_class.save_pretrained(out)
        config.save(out)
        write_json(metrics, out / "metrics.json")
        plot_curves(trainer.state.log_history, out / "curves.png", panels)
        if from_run and (Path(from_run) / SPLIT_ROWS).is_file():
            shutil.copyfile(Path(from_run) / SPLIT_ROWS, out / SPLIT_ROWS)
        write_model_card(out, config, metrics)
    trainer.accelerator.wait_for_everyone()
    return out
