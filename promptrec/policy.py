"""A recovery policy resolved once from a checkpoint: base model + adapter + tokenizer + text budget + quantisation.

Every stage that runs a trained policy (candidates, pairs' prompt rendering, predict, merge, the Kaggle notebook)
asks :func:`resolve_policy` what to load and :func:`load_policy` to load it, so they all render prompts and quantise
the base exactly as training did. What training decided is read back from the run folder's ``run_config.json``
(written by :func:`promptrec.training.save_run`); a flag given on the command line wins over it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from promptrec.generation import SamplingParams, iter_generate
from promptrec.models import ModelNotFoundError, generation_dtype, load_model, load_tokenizer

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
DEFAULT_MAX_TEXT_TOKENS = 256


def read_run_config(run_dir: str | Path | None, required: bool = True) -> dict:
    """``run_config.json`` of a saved run (e.g. the SFT adapter DPO starts from); ``{}`` when there is none and it
    is not ``required``."""
    path = Path(run_dir or "") / RUN_CONFIG
    if run_dir and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if required:
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder of sft/train.py or dpo/train.py?")
    return {}


def find_config_value(config, key: str):
    """The first value stored under ``key`` anywhere in a nested dict/list (run configs group their dataclasses)."""
    if isinstance(config, dict):
        if config.get(key) not in (None, ""):
            return config[key]
        config = list(config.values())
    for value in config if isinstance(config, list) else ():
        found = find_config_value(value, key)
        if found is not None:
            return found
    return None


def resolve_base_model(model: str | None, adapter: str | None, run_config: dict) -> str:
    """``model`` if given; else the base the adapter records (run_config.json, then adapter_config.json)."""
    if model:
        return model
    if not adapter:
        return "embedded"
    name = find_config_value(run_config, "model_name_or_path")
    adapter_config = Path(adapter) / "adapter_config.json"
    if not name and adapter_config.is_file():
        name = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if name:
        return str(name)
    raise ModelNotFoundError(f"{adapter}: no run_config.json with model_name_or_path (nor adapter_config.json "
                             f"base_model_name_or_path); pass --model")


@dataclass(frozen=True)
class Policy:
    """What to load. ``max_text_tokens`` None renders texts uncut (a run trained uncut records null)."""

    model: str
    adapter: str | None = None
    max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS
    load_in_4bit: bool = False
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: str | None = None

    @property
    def tokenizer_source(self) -> str:
        """The adapter's saved tokenizer (training may set the pad token or chat template), else the base model's."""
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").is_file():
            return str(self.adapter)
        return self.model

    def summary(self) -> dict:
        return {"model": self.model, "adapter": self.adapter, "max_text_tokens": self.max_text_tokens,
                "load_in_4bit": self.load_in_4bit}


def resolve_policy(model: str | None = None, adapter: str | None = None, max_text_tokens: int | None = None,
                   load_in_4bit: bool | None = None) -> Policy:
    """The policy of ``adapter`` (a run folder) or ``model``: flags first, then the run's ``run_config.json``
    (base model, text budget, 4-bit settings as trained), then defaults (4-bit when CUDA is available)."""
    config = read_run_config(adapter, required=False) or read_run_config(model, required=False)
    if max_text_tokens is None:
        # top-level key as saved by promptrec.training (null = trained uncut), else anywhere in the nested config
        max_text_tokens = config["max_text_tokens"] if "max_text_tokens" in config else (
            find_config_value(config, "max_text_tokens") or DEFAULT_MAX_TEXT_TOKENS)
    trained_4bit = bool(find_config_value(config, "load_in_4bit"))
    nested = find_config_value(config, "use_bnb_nested_quant")
    return Policy(
        model=resolve_base_model(model, adapter, config), adapter=str(adapter) if adapter else None,
        max_text_tokens=max_text_tokens,
        load_in_4bit=(trained_4bit or torch.cuda.is_available()) if load_in_4bit is None else load_in_4bit,
        quant_type=find_config_value(config, "bnb_4bit_quant_type") or "nf4",
        double_quant=True if nested is None else bool(nested),
        quant_storage=find_config_value(config, "bnb_4bit_quant_storage"))


def load_policy(policy: Policy, dtype: str = "auto", device_map=None):
    """``(model, tokenizer)`` of ``policy``, the model in eval mode."""
    tokenizer = load_tokenizer(policy.tokenizer_source)
    logger.info("Loading %s%s (%s)", policy.model, f" + adapter {policy.adapter}" if policy.adapter else "",
                "4-bit" if policy.load_in_4bit else dtype)
    model = load_model(policy.model, adapter=policy.adapter, load_in_4bit=policy.load_in_4bit, dtype=dtype,
                       device_map=device_map, quant_type=policy.quant_type, double_quant=policy.double_quant,
                       quant_storage=policy.quant_storage)
    model.eval()
    return model, tokenizer


def load_sampler(policy: Policy, params: SamplingParams, backend: str = "hf", dtype: str = "auto",
                 batch_size: int | None = None, use_cpu: bool = False):
    """``(tokenizer, batches)`` of ``policy`` (the rewrite step's generator or the candidate sampler), where
    ``batches(conversations, desc)`` yields ``(indices, outputs)`` per batch: HF generate, or vLLM (no adapter).
    ``dtype`` is resolved by :func:`promptrec.models.generation_dtype` (``auto_bf16``: bf16 on a bf16 CPU)."""
    if backend == "vllm":
        from promptrec.vllm_backend import vllm_batches

        tokenizer = load_tokenizer(policy.tokenizer_source)
        return tokenizer, vllm_batches(policy.model, tokenizer, params)
    model, tokenizer = load_policy(policy, generation_dtype(dtype), device_map="cpu" if use_cpu else None)
    return tokenizer, lambda convs, desc: iter_generate(model, tokenizer, convs, params, batch_size, desc=desc)
