"""The learned reward model: the policy's base as a sequence classifier (one output, the ``score`` head) with a LoRA
adapter, trained by reward/train_rm.py on SCS-ranked pairs; loaded here to score candidate prompts.

Its input is the recovery prompt exactly as the policy sees it (:func:`promptrec.templates.recovery_messages`, texts
cut to the run's ``max_text_tokens``) followed by one candidate as the assistant's reply, through the tokenizer's chat
template: :func:`reward_input_ids`, the one rendering of training (pairs' ``chosen_ids``/``rejected_ids``) and of
scoring (:meth:`RewardModel.score`). The reward is read where TRL's ``RewardTrainer`` reads it: the model's logit at
the last token that is not padding (``config.pad_token_id``), sequences padded on the right.

    from promptrec.reward_model import load_reward_model
    rm = load_reward_model("checkpoints/reward/smollm2")
    rm.score(originals, rewrittens, [[c1, c2, ...], ...])  # per row, an array of one reward per candidate

The eval helpers are pure: :func:`pairwise_accuracy`, :func:`spearman`, :func:`eval_candidates` and
:func:`ranking_metrics` (reward/train_rm.py's held-out report).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from promptrec.evaluation import spearman, within_group_spearman
from promptrec.models import load_model, load_tokenizer
from promptrec.run_config import RUN_CONFIG, RunConfig, read_run_config
from promptrec.tables import DataError
from promptrec.templates import recovery_answer, recovery_messages

logger = logging.getLogger(__name__)

STAGE = "reward_model"  # run_config.json's stage of a reward/train_rm.py run
HEAD = "score"  # the sequence-classification head of transformers' *ForSequenceClassification (Llama, Mistral, Phi…)


# ---------------------------------------------------------------------------------------------------- rendering
def reward_input_ids(tokenizer, prompt: Sequence[dict], answer: str | Sequence[dict]) -> list[int]:
    """The token ids the reward model reads for one candidate: the ``prompt`` turns (the recovery prompt as the policy
    sees it), then ``answer`` as the assistant's reply (a string goes through
    :func:`promptrec.templates.recovery_answer`, as build_pairs renders pairs), through the chat template; what TRL's
    ``RewardTrainer`` itself tokenises for a conversational row (``prompt + chosen``)."""
    reply = recovery_answer(answer) if isinstance(answer, str) else list(answer)
    return list(tokenizer.apply_chat_template([*prompt, *reply], tokenize=True, return_dict=True)["input_ids"])


def preference_ids(row: dict, tokenizer, margin: bool = False) -> dict:
    """TRL's tokenised preference row of one conversational pair (``prompt``, ``chosen``, ``rejected``; with
    ``margin`` also ``score_chosen``, ``score_rejected``): ``chosen_ids``, ``rejected_ids`` and, with ``margin``,
    ``margin`` = score_chosen − score_rejected (``RewardTrainer`` then asks the reward gap to exceed it)."""
    out = {side: reward_input_ids(tokenizer, row["prompt"], row[name])
           for side, name in (("chosen_ids", "chosen"), ("rejected_ids", "rejected"))}
    if margin:
        out["margin"] = float(row["score_chosen"]) - float(row["score_rejected"])
    return out


# -------------------------------------------------------------------------------------------------------- model
@dataclass
class RewardModel:
    """A loaded reward model: the PEFT sequence classifier (eval mode), its tokenizer (with a pad token that is the
    model config's ``pad_token_id``) and the text budget its prompts were rendered with."""

    model: torch.nn.Module
    tokenizer: object
    max_text_tokens: int | None
    run: RunConfig | None = None

    def score(self, originals: Sequence[str], rewrittens: Sequence[str], candidates: Sequence[Sequence[str]],
              batch_size: int = 16) -> list[np.ndarray]:
        """Per row (original text, rewritten text, its candidate prompts), a float array with one reward per candidate
        (higher: the model ranks it better). Rewards are comparable within a row; a row without candidates gets an
        empty array."""
        if not len(originals) == len(rewrittens) == len(candidates):
            raise ValueError(f"{len(originals)} originals, {len(rewrittens)} rewrittens and {len(candidates)} "
                             "candidate lists: one of each per row")
        prompts = [recovery_messages(o, r, self.tokenizer, self.max_text_tokens)
                   for o, r in zip(originals, rewrittens)]
        flat = [(prompt, str(c)) for prompt, row in zip(prompts, candidates) for c in row]
        rewards = self.score_messages([p for p, _ in flat], [c for _, c in flat], batch_size)
        bounds = np.cumsum([0, *(len(row) for row in candidates)])
        return [rewards[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def score_messages(self, prompts: Sequence[Sequence[dict]], answers: Sequence[str | Sequence[dict]],
                       batch_size: int = 16) -> np.ndarray:
        """The reward (n,) of each (rendered prompt turns, answer) pair: e.g. a pairs file's ``prompt`` and
        ``chosen``."""
        ids = [reward_input_ids(self.tokenizer, p, a) for p, a in zip(prompts, answers)]
        return self.score_ids(ids, batch_size)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
        """The reward (n,) of each token sequence; equal sequences are run once, batches are of similar lengths and
        padded on the right (as TRL's collator pads them in training)."""
        unique = list(dict.fromkeys(tuple(x) for x in ids))
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        found: dict[tuple, float] = {}
        was_training = self.model.training
        self.model.eval()
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="reward", unit="batch", disable=len(starts) < 8):
            batch = [unique[i] for i in order[start:start + batch_size]]
            width = max(len(x) for x in batch)
            input_ids = torch.tensor([[*x, *[pad] * (width - len(x))] for x in batch], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
            logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            found.update(zip(batch, logits[:, 0].float().cpu().tolist()))
        self.model.train(was_training)
        return np.array([found[tuple(x)] for x in ids], dtype=np.float64)


def load_reward_model(path: str, dtype: str = "auto", base: str | None = None,
                      allow_override: bool = False) -> RewardModel:
    """The reward model saved by reward/train_rm.py in ``path``: its base (``run_config.json``: model, revision,
    4-bit/8-bit settings as trained; ``dtype`` ``auto``: bf16/fp16 on a GPU, fp32 on the CPU) as a sequence
    classifier, the adapter and score head on top, in eval mode, with the tokenizer saved beside it and the run's
    text budget. ``base``: a local copy of that base (offline, e.g. a Kaggle dataset), checked against the run's
    fingerprint of it. A folder that is no reward-model run, or another base (unless ``allow_override``), is a
    one-line :class:`~promptrec.tables.DataError`."""
    run = read_run_config(path)
    if run.stage != STAGE:
        raise DataError(f"{path}: {RUN_CONFIG} says stage {run.stage!r}, not a reward model ({STAGE}, saved by "
                        "reward/train_rm.py)")
    base = run.agree("model_name_or_path", base, allow_override, where=str(Path(path) / RUN_CONFIG))
    tokenizer = load_tokenizer(path)
    logger.info("Loading reward model %s on %s (%s)", path, base,
                "4-bit" if run.load_in_4bit else "8-bit" if run.load_in_8bit else dtype)
    model = load_model(base, adapter=path, dtype=dtype, load_in_4bit=run.load_in_4bit,
                       load_in_8bit=run.load_in_8bit, quant_type=run.bnb_4bit_quant_type,
                       double_quant=run.use_bnb_nested_quant, quant_storage=run.bnb_4bit_quant_storage,
                       revision=run.model_revision, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # where the classifier reads the reward
    model.eval()
    return RewardModel(model, tokenizer, run.max_text_tokens, run)


# --------------------------------------------------------------------------------------------------------- eval
def pairwise_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> float:
    """Share of pairs whose chosen side gets the strictly higher reward (TRL's ``accuracy``); nan without pairs."""
    chosen, rejected = np.asarray(chosen_rewards, dtype=float), np.asarray(rejected_rewards, dtype=float)
    if chosen.shape != rejected.shape:
        raise ValueError(f"{chosen.size} chosen but {rejected.size} rejected rewards")
    return float(np.mean(chosen > rejected)) if chosen.size else float("nan")


def _prompt_key(prompt) -> str:
    return json.dumps(list(prompt), sort_keys=True)


def _answer_text(answer) -> str:
    return list(answer)[-1]["content"]


def eval_candidates(pairs: pd.DataFrame) -> pd.DataFrame:
    """The distinct candidates of conversational pairs (``prompt``, ``chosen``, ``rejected``, ``score_chosen``,
    ``score_rejected``) with their true score: one row per (prompt, candidate) with columns ``group`` (the prompt's
    index, 0…), ``prompt`` (its turns), ``candidate`` (the answer's text) and ``score``."""
    rows, groups = {}, {}
    for r in pairs.itertuples(index=False):
        group = groups.setdefault(_prompt_key(r.prompt), len(groups))
        for answer, score in ((r.chosen, r.score_chosen), (r.rejected, r.score_rejected)):
            text = _answer_text(answer)
            rows.setdefault((group, text), {"group": group, "prompt": list(r.prompt), "candidate": text,
                                            "score": float(score)})
    return pd.DataFrame(list(rows.values()), columns=["group", "prompt", "candidate", "score"])


def ranking_metrics(pairs: pd.DataFrame, candidates: pd.DataFrame, rewards: Sequence[float]) -> dict:
    """How a reward ranks held-out pairs: ``pairwise_accuracy`` over ``pairs`` and, over ``candidates`` (from
    :func:`eval_candidates`, ``rewards`` in its order), ``spearman`` between reward and true score pooled over all
    candidates, and ``spearman_within_prompt``: its mean over the prompts with 3 or more candidates of unequal scores
    (what reranking needs: the order among one prompt's candidates), with their count ``prompts_ranked``."""
    table = candidates.assign(reward=np.asarray(rewards, dtype=float))
    reward_of = {(_prompt_key(p), c): r for p, c, r in zip(table["prompt"], table["candidate"], table["reward"])}
    chosen = [reward_of[(_prompt_key(r.prompt), _answer_text(r.chosen))] for r in pairs.itertuples(index=False)]
    rejected = [reward_of[(_prompt_key(r.prompt), _answer_text(r.rejected))] for r in pairs.itertuples(index=False)]
    within, ranked = within_group_spearman((t["reward"], t["score"]) for _, t in table.groupby("group"))
    return {"pairs": len(pairs), "pairwise_accuracy": pairwise_accuracy(chosen, rejected),
            "mean_reward_chosen": float(np.mean(chosen)) if chosen else float("nan"),
            "mean_reward_rejected": float(np.mean(rejected)) if rejected else float("nan"),
            "candidates": len(table), "spearman": spearman(table["reward"], table["score"]),
            "spearman_within_prompt": within, "prompts_ranked": ranked}
