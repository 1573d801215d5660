"""A recovery policy resolved once from a run folder: base model + adapter + tokenizer + text budget + how to load it.

Every stage that runs a trained policy (candidates, pairs' prompt rendering, predict, merge, the Kaggle notebook)
asks :func:`resolve_policy` what to load and :func:`load_policy` to load it, so they all render prompts and load the
base exactly as training did. What training decided is the run's :class:`~promptrec.run_config.RunConfig`; a flag
given on the command line must agree with it, unless ``--allow_config_override true``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from promptrec.generation import SamplingParams, iter_generate
from promptrec.models import ModelNotFoundError, generation_dtype, load_model, load_tokenizer
from promptrec.run_config import DEFAULT_MAX_TEXT_TOKENS, RUN_CONFIG, read_run_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """What to load. ``max_text_tokens`` None renders texts uncut (a run trained uncut records null)."""

    model: str
    adapter: str | None = None
    max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: str | None = None
    revision: str | None = None
    attn_implementation: str | None = None

    @property
    def tokenizer_source(self) -> str:
        """The adapter's saved tokenizer (training may set the pad token or chat template), else the base model's."""
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").is_file():
            return str(self.adapter)
        return self.model

    def summary(self) -> dict:
        return {"model": self.model, "adapter": self.adapter, "max_text_tokens": self.max_text_tokens,
                "load_in_4bit": self.load_in_4bit}


class PolicyFlags(Protocol):
    """What an entry script's arguments say about the policy (predict's; candidates' name them policy*)."""

    model: str | None
    adapter: str | None
    max_text_tokens: int | None
    load_in_4bit: bool | None
    allow_config_override: bool


def policy_of(flags: PolicyFlags) -> Policy:
    """The policy an entry script's flags name (candidates, predict, the notebook): :func:`resolve_policy`."""
    return resolve_policy(flags.model, flags.adapter, flags.max_text_tokens, flags.load_in_4bit,
                          flags.allow_config_override)


def adapter_base(adapter: str) -> str:
    """The base model an adapter without a run config names (``adapter_config.json``: one trained elsewhere)."""
    path = Path(adapter) / "adapter_config.json"
    name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") if path.is_file() else None
    if not name:
        raise ModelNotFoundError(f"{adapter}: no {RUN_CONFIG} with model_name_or_path (nor adapter_config.json "
                                 "base_model_name_or_path); pass --model")
    return str(name)


def resolve_policy(model: str | None = None, adapter: str | None = None, max_text_tokens: int | None = None,
                   load_in_4bit: bool | None = None, allow_override: bool = False) -> Policy:
    """The policy of ``adapter`` (a run folder) or ``model`` (a base model, or a merged run folder).

    The run's :class:`~promptrec.run_config.RunConfig` gives the base, the text budget and how the base is loaded
    (revision, 4-bit settings, attention); ``model`` and ``max_text_tokens``, when given, must agree with it
    (:meth:`~promptrec.run_config.RunConfig.agree`; ``allow_override`` lets them differ). Quantising is a memory
    choice at inference: ``load_in_4bit`` None loads as the run trained, or in 4-bit on CUDA. Without a run config
    (a base alone, an adapter trained elsewhere) the flags and defaults decide.
    """
    merged = not adapter and model and (Path(model) / RUN_CONFIG).is_file()
    run = read_run_config(adapter, required=False) if adapter else read_run_config(model) if merged else None
    if run is None:
        base = model or (adapter_base(adapter) if adapter else "embedded")
        quantised = torch.cuda.is_available() if load_in_4bit is None else load_in_4bit
        budget = DEFAULT_MAX_TEXT_TOKENS if max_text_tokens is None else max_text_tokens
        return Policy(base, adapter, budget, quantised)
    where = str(Path(adapter or model) / RUN_CONFIG)
    if adapter and run.model_name_or_path:
        base = run.agree("model_name_or_path", model, allow_override, where)
    else:  # a merged folder is its own base; a run config without a base: the adapter's
        base = model or adapter_base(adapter)
    as_trained = run.load_in_4bit or (not run.load_in_8bit and torch.cuda.is_available())
    return Policy(model=base, adapter=str(adapter) if adapter else None,
                  max_text_tokens=run.agree("max_text_tokens", max_text_tokens, allow_override, where),
                  load_in_4bit=as_trained if load_in_4bit is None else load_in_4bit,
                  load_in_8bit=load_in_4bit is None and run.load_in_8bit, quant_type=run.bnb_4bit_quant_type,
                  double_quant=run.use_bnb_nested_quant, quant_storage=run.bnb_4bit_quant_storage,
                  revision=run.model_revision)  # attention kernel: this machine's default, not training's (a
    # flash_attention_2 run must load on a T4 or a CPU, and every kernel computes the same attention)


MERGE_CHOICES = ("auto", "true", "false")
MERGE_HELP = ("Fold the LoRA update into the base weights before decoding (PEFT merge): the same model without the "
              "LoRA matmuls, so faster where they cost (a CPU). 'auto': when the base is not quantised (merging into "
              "4/8-bit weights re-quantises them); 'true': the same, an error on a quantised base; 'false': keep the "
              "LoRA layers. Greedy answers may differ from unmerged ones by float rounding on near-ties.")


def check_merge_choice(value: str) -> str:
    """``value`` if it is a ``--merge_adapter`` choice, else the one-line error every entry script gives."""
    if value not in MERGE_CHOICES:
        raise ValueError(f"--merge_adapter must be one of {', '.join(MERGE_CHOICES)}, not {value!r}")
    return value


def should_merge(policy: Policy, merge: str | bool) -> bool:
    """Whether ``policy``'s adapter is merged into its base for decoding, (``--merge_adapter``, :data:`MERGE_HELP`)."""
    merge = check_merge_choice(str(merge).lower())
    quantised = bool(policy.load_in_4bit or policy.load_in_8bit)
    if merge == "true" and quantised:
        raise ValueError("--merge_adapter true needs an unquantised base: merging into 4/8-bit weights re-quantises "
                         "them (use auto or false)")
    return bool(policy.adapter) and merge != "false" and not quantised


def load_policy(policy: Policy, dtype: str = "auto", device_map=None, merge: bool = False):
    """``(model, tokenizer)`` of ``policy``, the model in eval mode; with ``merge`` (see :func:`should_merge`) the
    adapter is folded into the base (``merge_and_unload``) and a plain model comes back."""
    tokenizer = load_tokenizer(policy.tokenizer_source)
    logger.info("Loading %s%s (%s%s)", policy.model, f" + adapter {policy.adapter}" if policy.adapter else "",
                "4-bit" if policy.load_in_4bit else dtype, ", merged" if merge and policy.adapter else "")
    model = load_model(policy.model, adapter=policy.adapter, dtype=dtype, device_map=device_map,
                       load_in_4bit=policy.load_in_4bit, load_in_8bit=policy.load_in_8bit, revision=policy.revision,
                       quant_type=policy.quant_type, double_quant=policy.double_quant,
                       quant_storage=policy.quant_storage, attn_implementation=policy.attn_implementation)
    if merge and policy.adapter:
        model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def load_sampler(policy: Policy, params: SamplingParams, backend: str = "hf", dtype: str = "auto",
                 batch_size: int | None = None, use_cpu: bool = False, merge: bool = False):
    """``(tokenizer, batches)`` of ``policy`` (the rewrite step's generator or the candidate sampler), where
    ``batches(conversations, desc)`` yields ``(indices, outputs)`` per batch: HF generate, or vLLM (no adapter).
    ``dtype`` is resolved by :func:`promptrec.models.generation_dtype` (``auto_bf16``: bf16 on a bf16 CPU)."""
    if backend == "vllm":
        from promptrec.vllm_backend import vllm_batches

        tokenizer = load_tokenizer(policy.tokenizer_source)
        return tokenizer, vllm_batches(policy.model, tokenizer, params)
    model, tokenizer = load_policy(policy, generation_dtype(dtype), device_map="cpu" if use_cpu else None, merge=merge)
    return tokenizer, lambda convs, desc: iter_generate(model, tokenizer, convs, params, batch_size, desc=desc)
