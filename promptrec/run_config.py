"""The run contract: :class:`RunConfig`, the one schema of a run folder's ``run_config.json``.

sft/train.py decides once what every later stage must agree on: the base model and how it is loaded (revision,
dtype, quantisation, attention kernel), the prompt format (tokenizer, chat template, text budget), the LoRA targets
and the data it trained on (its train/eval triplets are saved beside it, :data:`SPLIT_ROWS`). It writes them at the
top level of ``run_config.json``; DPO and GRPO inherit them (:meth:`RunConfig.agree`: a value given there that
contradicts the SFT run's stops with both named, unless ``--allow_config_override true``) and write them again;
candidates, pairs, predict, merge and the Kaggle notebook read them through :func:`promptrec.policy.resolve_policy`.
The file's other top-level keys (the resolved dataclasses, ``environment``, ``world_size``, ``sft_run``) are kept as
:attr:`RunConfig.sections`. Files written before this schema load too: missing fields come from their
``ModelConfig`` / ``*Arguments`` sections.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from promptrec.corpus import REFERENCE
from promptrec.models import EMBEDDED_ALIASES, model_shape, parse_dtype
from promptrec.tables import DataError, read_table, require_path, write_json, write_table

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
SPLIT_ROWS = "split.parquet"  # the SFT run's train and eval triplets (column ``split``), carried on by DPO and GRPO
DEFAULT_MAX_TEXT_TOKENS = 256
# TRL ModelConfig fields a run decides once: DPO and GRPO take them from the SFT run (None in their recipes).
INHERITED = ("model_name_or_path", "model_revision", "dtype", "attn_implementation", "load_in_4bit", "load_in_8bit",
             "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
OVERRIDE_HELP = ("Let a value given to this stage differ from the one the run's run_config.json records (base model, "
                 "quantisation, dtype, attention, text budget); without it a difference stops with both named.")


def override_field():
    """The ``--allow_config_override`` flag, declared the same way by every stage that reads a RunConfig."""
    return field(default=False, metadata={"help": OVERRIDE_HELP})


@dataclass
class TrainingData:
    """The triplets a run trained on: where they came from, how they were split, and that data's licence."""

    source: str
    producers: list[str] = field(default_factory=list)
    split_by: str = "id"
    eval_fraction: float = 0.0
    seed: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    rows: str = SPLIT_ROWS  # in the run folder
    licence: str = "unknown: see the source"


@dataclass
class RunConfig:
    """What a run decided once (the top-level keys of ``run_config.json``). Model fields carry TRL ModelConfig's
    names; ``dtype`` is resolved (never ``auto``); ``max_text_tokens`` None means texts were not cut."""

    stage: str
    model_name_or_path: str | None
    model_revision: str = "main"
    base_model_id: str | None = None  # its hub id when known (the model card's base_model)
    base_shape: dict = field(default_factory=dict)  # models.model_shape: recognises a local copy of the base
    dtype: str = "auto"
    attn_implementation: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = True
    bnb_4bit_quant_storage: str | None = None
    tokenizer: str | None = None  # where the tokenizer was loaded from; the run folder holds the copy it used
    chat_template: str = "the tokenizer's own"
    max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS
    lora_target_modules: list[str] | str | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    data: TrainingData | None = None
    trained_on: str | None = None  # what this stage trained on besides the SFT data (DPO pairs, GRPO prompts)
    sections: dict = field(default_factory=dict, repr=False)  # the file's other top-level keys

    def to_dict(self) -> dict:
        schema = dataclasses.asdict(self)
        sections = schema.pop("sections")
        return {**schema, **{k: v for k, v in sections.items() if k not in schema}}

    def save(self, run_dir: str | Path) -> Path:
        return write_json(self.to_dict(), Path(run_dir) / RUN_CONFIG)

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """The schema fields of a ``run_config.json`` dict; files written before the schema fill missing fields
        from their ``ModelConfig`` and ``*Arguments`` sections. Other keys become :attr:`sections`."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "sections"]
        old_sections = [raw[k] for k in raw if k.endswith("Arguments") and isinstance(raw[k], dict)]
        legacy = {k: v for section in [*old_sections, raw.get("ModelConfig") or {}] for k, v in section.items()}
        values = {name: raw[name] if name in raw else legacy[name] for name in names if name in raw or name in legacy}
        if isinstance(values.get("data"), dict):
            known = {f.name for f in dataclasses.fields(TrainingData)}
            values["data"] = TrainingData(**{k: v for k, v in values["data"].items() if k in known})
        values.setdefault("stage", "unknown")
        values.setdefault("model_name_or_path", None)
        return cls(**values, sections={k: v for k, v in raw.items() if k not in names})

    def agree(self, name: str, given, allow_override: bool = False, where: str = RUN_CONFIG):
        """The value of field ``name`` a later stage uses: the recorded one when ``given`` is None, else ``given``
        if it agrees with it. A contradiction raises :class:`DataError` naming both values (a warning instead with
        ``allow_override``). A base model agrees when it is the same name or a copy of the same model (same shape)."""
        recorded = getattr(self, name)
        if given is None or _same(name, given, recorded, self.base_shape):
            return recorded if given is None else given
        message = f"{name}: {given!r} given, {recorded!r} in {where}"
        if not allow_override:
            raise DataError(f"{message}; the run was trained that way (pass --allow_config_override true to use "
                            f"{given!r} anyway)")
        logger.warning("%s: using %r (--allow_config_override)", message, given)
        return given


def _same(name: str, given, recorded, base_shape: dict) -> bool:
    if given == recorded:
        return True
    if name == "dtype":
        return str(parse_dtype(given)) == str(parse_dtype(recorded))
    if name == "model_name_or_path":
        if {str(given).lower(), str(recorded).lower()} <= set(EMBEDDED_ALIASES):
            return True
        recorded_shape = base_shape or _shape(str(recorded))
        if not recorded_shape and Path(str(given)).expanduser().is_dir():  # an old run, its base unreadable here
            logger.warning("%s cannot be checked against the run's base %s (the run recorded no fingerprint of it): "
                           "assumed a local copy of it", given, recorded)
            return True
        return same_shape(_shape(str(given)), recorded_shape)
    return False


def _shape(name: str) -> dict:
    """:func:`promptrec.models.model_shape` of ``name``; ``{}`` when it is no readable model here (a hub id offline,
    a path that holds none): then it is simply another model."""
    try:
        return model_shape(name)
    except (OSError, ValueError):
        return {}


def same_shape(a: dict, b: dict) -> bool:
    """Two config fingerprints describe one model: the keys both state agree, and they state the core ones (a key
    one transformers version writes as null or omits, e.g. a nested rope_theta, is not a difference)."""
    core = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    if not all(a.get(k) is not None and b.get(k) is not None for k in core):
        return False
    return all(a[k] == b[k] for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)


def read_run_config(run_dir: str | Path, required: bool = True) -> RunConfig | None:
    """The :class:`RunConfig` of a run folder. A missing folder is a :class:`DataError` ("no such directory"); a
    folder without ``run_config.json`` is one too when ``required``, else None (e.g. an adapter trained elsewhere)."""
    path = require_path(run_dir, "directory") / RUN_CONFIG
    if not path.is_file():
        if required:
            raise DataError(f"{run_dir}: no {RUN_CONFIG} (not a run folder of sft/train.py, dpo/train.py or "
                            "dpo/grpo.py)")
        return None
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise DataError(f"{path}: not a run config ({err})") from err


def data_licence(source: str) -> str:
    """What is known of a triplet file's licence: the bundled data and the rewrite step's output of the bundled
    seed texts are the project's own; anything else is the source's to state."""
    if str(source) == REFERENCE or "promptrec/assets" in Path(source).as_posix():
        return "the project's own (bundled with promptrec, written for it)"
    manifest = Path(f"{source}.manifest.json")  # data_generation/rewrite.py's output
    if manifest.is_file():
        generator = json.loads(manifest.read_text(encoding="utf-8")).get("generator", "a model")
        return (f"the project's own seed texts and prompt bank, rewritten by {generator} "
                "(data_generation/rewrite.py): that model's terms apply to its outputs")
    return "external data: see its source for the licence"


def save_split(run_dir: str | Path, train: pd.DataFrame, evaluation: pd.DataFrame) -> Path:
    """:data:`SPLIT_ROWS` in ``run_dir``: the train and eval triplets (``id, original_text, rewrite_prompt,
    rewritten_text, split``), so later stages find their rows in the run folder, not in the source file."""
    columns = ["id", "original_text", "rewrite_prompt", "rewritten_text"]
    rows = pd.concat([train[columns].assign(split="train"), evaluation[columns].assign(split="eval")])
    return write_table(rows.reset_index(drop=True), Path(run_dir) / SPLIT_ROWS)


def split_rows(run_dir: str | Path, side: str) -> pd.DataFrame | None:
    """The ``side`` (``train`` or ``eval``) triplets a run saved (:func:`save_split`, carried on by DPO and GRPO),
    in their saved order; None when the run has none (a run from before they were saved)."""
    path = Path(run_dir) / SPLIT_ROWS
    if not path.is_file():
        return None
    rows = read_table(str(path), required=("id", "original_text", "rewrite_prompt", "rewritten_text", "split"))
    return rows[rows["split"] == side].drop(columns="split").reset_index(drop=True)
