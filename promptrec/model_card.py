"""The model card (``README.md``) of a trained adapter, written from its :class:`~promptrec.run_config.RunConfig`.

It replaces TRL's default card (no base, no data, a generic quick start) with what a user who publishes the adapter
needs: the task, the base model, the data and its licence, the method and its key settings, the held-out SCS, and
how to load it. :func:`model_card` is pure; :func:`write_model_card` writes it into a run folder, with a measured
figure (e.g. the pipeline report's) when one is given.
"""

from __future__ import annotations

import json
from pathlib import Path

from promptrec.run_config import RunConfig, read_run_config
from promptrec.tables import write_json

# stage → (method name, the section of run_config.json holding its trainer's resolved settings)
METHODS = {"sft": ("SFT", "SFTConfig"), "sft_continued": ("SFT, continued", "SFTConfig"),
           "dpo": ("DPO", "DPOConfig"), "grpo": ("GRPO", "GRPOConfig"),
           "reward_model": ("Reward model", "RewardConfig")}
REWARD_STAGE = "reward_model"  # reward/train_rm.py: a sequence classifier that scores candidate prompts
TASK = ("**Task.** Given an original text and its rewrite by an LLM, recover the rewrite prompt that produced it "
        "(Kaggle's LLM Prompt Recovery). An answer is scored by SCS: the cosine similarity of the sentence-t5-base "
        "embeddings of the recovered and the true prompt, cubed.")


def _base(config: RunConfig) -> str:
    name = config.base_model_id or config.model_name_or_path
    loaded = f" (loaded as `{config.model_name_or_path}`)" if name != config.model_name_or_path else ""
    nested = ", double quantisation" if config.use_bnb_nested_quant else ""
    quant = (f"4-bit {config.bnb_4bit_quant_type}{nested}" if config.load_in_4bit
             else "8-bit" if config.load_in_8bit else "not quantised")
    budget = "uncut" if config.max_text_tokens is None else f"cut to {config.max_text_tokens} tokens each"
    attention = config.attn_implementation or "the library default"
    return (f"**Base model.** `{name}`{loaded}, revision `{config.model_revision}`: {config.dtype}, {quant}, "
            f"attention {attention}. Its licence applies to this adapter too.\n\n"
            "**Prompt format.** promptrec's recovery prompt (`promptrec.templates.recovery_messages`) in "
            f"{config.chat_template} chat template; original and rewritten texts {budget}.")


def _data(config: RunConfig) -> str:
    if config.stage == REWARD_STAGE:
        pairs = config.sections.get("pairs", {})
        scorer = (pairs.get("scorer") or {}).get("model", "not recorded")
        held = f", {pairs['eval_pairs']} eval pairs `{pairs['eval']}`" if pairs.get("eval") else ""
        return (f"**Data.** SCS-ranked preference pairs (data_generation/build_pairs.py; SCS scorer {scorer}): "
                f"{pairs.get('train_pairs', '?')} train pairs `{config.trained_on}`{held}; margin column "
                f"{'on' if pairs.get('margin') else 'off'}. Licence: that of the triplets the pairs were built from.")
    d = config.data
    if d is None:
        return "**Data.** Not recorded."
    producers = f" (producers: {', '.join(d.producers)})" if d.producers else ""
    also = f"\nThis stage also trained on `{config.trained_on}`." if config.trained_on else ""
    return (f"**Data.** `{d.source}`{producers}: {d.train_rows} train / {d.eval_rows} eval triplets, split by "
            f"{d.split_by} (eval fraction {d.eval_fraction}, seed {d.seed}), saved beside the adapter as `{d.rows}`. "
            f"Licence of that data: {d.licence}.{also}")


def _method(config: RunConfig) -> str:
    name, section = METHODS.get(config.stage, (config.stage, ""))
    training = config.sections.get(section, {})
    targets = config.lora_target_modules  # the LoRA shape is the SFT run's: DPO and GRPO train its adapter further
    shape = [f"r {config.lora_r}, alpha {config.lora_alpha}"] if config.lora_r else []
    shape += [f"targets {', '.join(targets) if isinstance(targets, list) else targets}"] if targets else []
    settings = []
    if (training.get("max_steps") or 0) > 0:
        settings.append(f"{training['max_steps']} steps")
    elif "num_train_epochs" in training:
        settings.append(f"{training['num_train_epochs']:g} epoch(s)")
    if "learning_rate" in training:
        settings.append(f"learning rate {training['learning_rate']:g}")
    if config.stage in ("dpo", "grpo") and "beta" in training:
        settings.append(f"beta {training['beta']:g}")
    if config.stage == "dpo" and training.get("loss_type"):
        loss = training["loss_type"]
        settings.append("loss " + " + ".join(loss if isinstance(loss, list) else [loss]))
    adapter = f"a LoRA adapter ({'; '.join(shape)})" if shape else "a LoRA adapter"
    if config.stage == REWARD_STAGE:
        adapter += " and a one-output score head (TRL's Bradley–Terry loss on the pairs)"
    further = ", trained further from the SFT adapter" if config.stage in ("dpo", "grpo", "sft_continued") else ""
    return f"**Method.** {name} (TRL) of {adapter}{further}: {', '.join(settings) or 'settings not recorded'}."


def _scs(config: RunConfig, metrics: dict, measured: dict | None) -> str:
    lines = ["**Held-out SCS.**"]
    if measured:
        ci = f" (95% CI {measured['ci_low']:.4f} … {measured['ci_high']:.4f})" if "ci_low" in measured else ""
        rows = f" on {measured['n']} held-out rows" if measured.get("n") else ""
        lines.append(f"- {measured.get('where', 'measured')}: **{measured['mean_scs']:.4f}**{ci}{rows}")
    scs = metrics.get("scs") or {}
    if config.stage in scs:
        others = ", ".join(f"{k} {v:.4f}" for k, v in scs.items() if k not in (config.stage, "n") and
                           isinstance(v, float))
        scorer = (scs.get("scorer") or {}).get("model", "the configured scorer")
        lines.append(f"- the trainer's own eval (greedy, {scs.get('n')} eval rows of the split, scorer {scorer}, no "
                     f"CI): **{scs[config.stage]:.4f}**" + (f"; on the same rows {others}" if others else ""))
    return "\n".join(lines if len(lines) > 1 else [*lines, "- not measured (the run's SCS eval was off)"])


def _ranking(metrics: dict) -> str:
    ranking = metrics.get("ranking") or {}
    if not ranking:
        return "**Held-out ranking.**\n- not measured (no eval pairs)"
    return (f"**Held-out ranking** ({ranking['pairs']} eval pairs, {ranking['candidates']} distinct candidates).\n"
            f"- pairwise accuracy (chosen rewarded above rejected): **{ranking['pairwise_accuracy']:.4f}**\n"
            f"- Spearman of the reward with the true SCS: **{ranking['spearman']:.4f}** pooled, "
            f"{ranking['spearman_within_prompt']:.4f} within a prompt (mean over {ranking['prompts_ranked']} prompts)")


def _how_to_load_reward_model(config: RunConfig) -> str:
    return "\n".join([
        "## How to load", "",
        "With this repository (the base, text budget and 4-bit settings come from `run_config.json`):", "",
        "```python", "from promptrec.reward_model import load_reward_model",
        'rm = load_reward_model("<this folder>")',
        "rm.score(originals, rewrittens, [[candidate, ...], ...])  # per row, one reward per candidate", "```", "",
        "Reranking at inference: `python inference/predict.py --selection reward --reward_model <this folder> ...`.",
        f"The input is promptrec's recovery prompt (texts cut to {config.max_text_tokens} tokens each) with the "
        "candidate as the assistant's reply, through the chat template; the reward is the score head's output at "
        "the last token that is not padding."])


def _how_to_load(config: RunConfig) -> str:
    base = config.base_model_id or config.model_name_or_path
    quant = (f'\nquant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{config.bnb_4bit_quant_type}", '
             f"bnb_4bit_use_double_quant={config.use_bnb_nested_quant})" if config.load_in_4bit else "")
    return "\n".join([
        "## How to load", "",
        "With this repository (the base, text budget and 4-bit settings come from `run_config.json`):", "",
        "```bash", "python inference/predict.py --adapter <this folder> --input test.csv --output submission.csv",
        "```", "",
        "In the Kaggle notebook (`inference/kaggle_inference.ipynb`): attach this folder as a dataset and set "
        '`ADAPTER = "/kaggle/input/<this adapter>"`; `BASE_MODEL` is "" (the base above) or a local copy of it.', "",
        "With plain PEFT:", "", "```python", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer" + (", BitsAndBytesConfig" if quant else "")
        + quant,
        f'base = AutoModelForCausalLM.from_pretrained("{base}"' + (", quantization_config=quant)" if quant else ")"),
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "# the prompt to generate from: promptrec.templates.recovery_messages(original_text, rewritten_text, "
        f"tokenizer, {config.max_text_tokens})", "```"])


def model_card(config: RunConfig, metrics: dict, measured: dict | None = None) -> str:
    """The adapter's ``README.md``. ``metrics`` is the run's ``metrics.json`` (its ``scs`` entry: the trainer's eval);
    ``measured`` an optional held-out figure (``mean_scs``, ``ci_low``, ``ci_high``, ``n``, ``where``), e.g. the
    pipeline report's row for this adapter."""
    reward = config.stage == REWARD_STAGE
    front = ["---", "library_name: peft", *([f"base_model: {config.base_model_id}"] if config.base_model_id else []),
             f"pipeline_tag: {'text-classification' if reward else 'text-generation'}",
             f"tags: [promptrec, prompt-recovery, lora, {config.stage}]", "---"]
    base = config.base_model_id or config.model_name_or_path
    title = (f"# Prompt-recovery reward model for {base}" if reward else
             f"# Prompt-recovery adapter ({METHODS.get(config.stage, (config.stage,))[0]}) for {base}")
    evaluation = _ranking(metrics) if reward else _scs(config, metrics, measured)
    loading = _how_to_load_reward_model(config) if reward else _how_to_load(config)
    return "\n\n".join(["\n".join(front), title, TASK, _base(config), _data(config), _method(config), evaluation,
                        loading]) + "\n"


def write_model_card(run_dir: str | Path, config: RunConfig | None = None, metrics: dict | None = None,
                     measured: dict | None = None) -> Path:
    """Write ``run_dir/README.md`` from the run's config and ``metrics.json`` (read from the folder when not given).
    A ``measured`` figure (see :func:`model_card`) is also kept in ``metrics.json`` as ``measured_scs``, so a later
    rewrite of the card keeps it."""
    run_dir = Path(run_dir)
    config = config or read_run_config(run_dir)
    metrics_path = run_dir / "metrics.json"
    if metrics is None:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    if measured:
        metrics = {**metrics, "measured_scs": measured}
        write_json(metrics, metrics_path)
    path = run_dir / "README.md"
    path.write_text(model_card(config, metrics, measured or metrics.get("measured_scs")), encoding="utf-8")
    return path
