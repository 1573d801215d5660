"""Minimum-Bayes-risk (MBR) selection among a row's candidate prompts: pure functions over embeddings.

The policy often samples a good prompt without ranking it first. MBR picks the candidate that agrees best with the
others, i.e. the one with the highest expected metric if the true prompt were drawn from the candidates:
``score[i] = mean_{j != i} SCS(e_i, e_j)`` with SCS the competition's sharpened cosine
(:func:`promptrec.scoring.scs_matrix`). Duplicates count as votes: a string sampled three times is three
candidates. Ties (within 1e-9) go to the lowest index, so the candidate put first (the greedy answer) wins them.

``concat_top`` joins the top-k distinct candidates, as the competition's top solutions submitted several guesses in
one prompt. :func:`mbr_choose` does a whole batch of rows with a scorer, embedding every distinct string once;
:func:`mbr_frame` is the predict step's output from each row's raw greedy answer and raw samples.

Reward selection (issue 24) picks among the same candidates by a learned reward model's score instead
(:func:`rerank_scores`, :func:`rerank_picks`), or by the hybrid ``z(reward) + w * z(mbr)``. Rewards (logits of
any scale) and MBR scores (mean SCS, in [-1, 1]) are not comparable, so each is standardised within the row, over
that row's candidates, before they are added: ``z(x) = (x - mean(x)) / std(x)``, and all zeros when the row's
scores do not vary (one candidate, or all equal to ``TIE_DECIMALS`` decimals), so that term then decides nothing.
``w`` is thus the weight of one standard deviation of consensus against one of reward. Ties go to the lowest index.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from promptrec.postprocess import PostprocessConfig, clean_prediction, finalize, squash
from promptrec.scoring import scs_matrix

TIE_DECIMALS = 9  # scores equal to this many decimals tie (sums of the same values in another order differ by ulps)
CANDIDATE_SELECTIONS = ("mbr", "reward", "reward_mbr")


class Encoder(Protocol):
    """What :func:`score_rows` needs of a scorer: :class:`promptrec.scoring.Scorer` fits."""

    exponent: float

    def encode(self, texts: list[str]) -> np.ndarray: ...


class Rewarder(Protocol):
    """What reward selection needs of a reward model: :class:`promptrec.reward_model.RewardModel` fits. ``score``
    returns, per row, one reward per candidate (higher is better)."""

    def score(self, originals: Sequence[str], rewrittens: Sequence[str], candidates: Sequence[Sequence[str]],
              batch_size: int = 16) -> list[np.ndarray]: ...


def mbr_scores(embeddings: np.ndarray, exponent: float = 3.0) -> np.ndarray:
    """Mean SCS of each candidate to the OTHER candidates. ``embeddings`` (k, d), rows L2-normalised; returns (k,).

    One candidate scores 0 (there is nothing to agree with)."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    k = len(embeddings)
    if k == 0:
        raise ValueError("mbr_scores: no candidates")
    if k == 1:
        return np.zeros(1)
    sims = scs_matrix(embeddings, embeddings, exponent)
    return (sims.sum(axis=1) - np.diag(sims)) / (k - 1)


def order_by_score(scores: np.ndarray) -> np.ndarray:
    """Candidate indices, best score first; ties keep index order (lowest index first)."""
    return np.argsort(-np.round(np.asarray(scores, dtype=np.float64), TIE_DECIMALS), kind="stable")


def mbr_order(embeddings: np.ndarray, exponent: float = 3.0) -> np.ndarray:
    """The MBR ranking of candidates ``embeddings`` (k, d): indices, best first, ties to the lowest index."""
    return order_by_score(mbr_scores(embeddings, exponent))


def mbr_select(embeddings: np.ndarray, exponent: float = 3.0) -> int:
    """Index of the MBR candidate: highest mean SCS to the others; ties → the lowest index."""
    return int(mbr_order(embeddings, exponent)[0])


def standardize(scores) -> np.ndarray:
    """One row's scores (k,) as z-scores over its candidates, ``(x - mean) / std``; all zeros when they do not vary
    (one candidate, or every score equal to ``TIE_DECIMALS`` decimals), so ties stay ties."""
    x = np.round(np.asarray(scores, dtype=np.float64), TIE_DECIMALS)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"standardize: expected a non-empty 1-d array of scores, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"standardize: non-finite score in {x.tolist()}")
    if np.ptp(x) == 0:
        return np.zeros(len(x))
    return (x - x.mean()) / x.std()


def rerank_scores(rewards, mbr=None, mbr_weight: float = 1.0) -> np.ndarray:
    """One row's selection scores (k,), the highest wins: ``z(rewards)`` (reward selection, ``mbr`` None), else
    ``z(rewards) + mbr_weight * z(mbr)`` (the hybrid), with z the per-row :func:`standardize`. ``rewards`` and ``mbr``
    hold one score per candidate, in the candidates' order."""
    if mbr_weight < 0:
        raise ValueError(f"rerank_scores: mbr_weight must be >= 0, not {mbr_weight}")
    z = standardize(rewards)
    if mbr is None:
        return z
    if np.shape(mbr) != z.shape:
        raise ValueError(f"rerank_scores: {len(z)} rewards but {np.shape(mbr)} MBR scores")
    return z + mbr_weight * standardize(mbr)


def rerank_picks(rewards: Sequence, mbr: Sequence | None = None, mbr_weight: float = 1.0) -> list[int]:
    """Per row, the index of the candidate with the highest :func:`rerank_scores` (``rewards[i]``, ``mbr[i]``: row
    i's (k_i,) scores; ``mbr`` None: reward alone). Ties go to the lowest index, i.e. the greedy answer put first."""
    if mbr is not None and len(mbr) != len(rewards):
        raise ValueError(f"rerank_picks: {len(rewards)} rows of rewards but {len(mbr)} of MBR scores")
    rows = mbr if mbr is not None else [None] * len(rewards)
    return [int(order_by_score(rerank_scores(r, m, mbr_weight))[0]) for r, m in zip(rewards, rows)]


@dataclass(frozen=True)
class SelectionRule:
    """How each row's pick is made among its candidates (predict's ``--selection`` other than greedy,
    ``--mbr_weight``, ``--concat_top_k``, ``--reward_batch_size``): ``mbr`` by the MBR score, ``reward`` by
    :func:`rerank_scores` of the rewards, ``reward_mbr`` by the hybrid with weight ``mbr_weight``."""

    selection: str = "mbr"
    mbr_weight: float = 1.0
    concat_top_k: int = 1
    reward_batch_size: int = 16

    def __post_init__(self):
        if self.selection not in CANDIDATE_SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(CANDIDATE_SELECTIONS)}, not {self.selection!r}")
        if self.mbr_weight < 0 or self.concat_top_k < 1 or self.reward_batch_size < 1:
            raise ValueError("mbr_weight must be >= 0, concat_top_k and reward_batch_size >= 1")

    @property
    def uses_rewards(self) -> bool:
        return self.selection != "mbr"

    def scores(self, mbr: np.ndarray, rewards: np.ndarray | None) -> np.ndarray:
        """One row's selection scores from its MBR scores and rewards (k,)."""
        if not self.uses_rewards:
            return np.asarray(mbr, dtype=np.float64)
        return rerank_scores(rewards, mbr if self.selection == "reward_mbr" else None, self.mbr_weight)


def top_distinct(candidates: Sequence[str], order: Sequence[int], k: int) -> list[str]:
    """The first ``k`` distinct strings of ``candidates`` taken in ``order``."""
    if k < 1:
        raise ValueError("top_distinct: k must be >= 1")
    out: list[str] = []
    for i in order:
        if candidates[i] not in out:
            out.append(candidates[i])
            if len(out) == k:
                break
    return out


def concat_top(candidates: Sequence[str], order: Sequence[int], k: int, sep: str = " ") -> str:
    """The top-``k`` distinct candidates in rank order joined by ``sep`` (``k=1``: the MBR pick itself)."""
    return sep.join(top_distinct(candidates, order, k))


def combine(candidates: Sequence[str], scores: np.ndarray, top_k: int = 1, sep: str = " ",
            last: str | None = None) -> str:
    """The selected text of one row: :func:`concat_top` by ``scores``, except that ``last`` (the mean prompt that
    post-processing appends) goes to the end of a concatenation of several rather than be repeated there."""
    members = top_distinct(candidates, order_by_score(scores), top_k)
    if last is not None and len(members) > 1 and last in members:
        members.remove(last)
        members.append(last)
    return sep.join(members)


def score_rows(rows: Sequence[Sequence[str]], scorer: Encoder, exponent: float | None = None) -> list[np.ndarray]:
    """MBR scores of each row's candidates (``rows[i]``: k_i >= 1 strings) → a list of (k_i,) arrays.

    Every distinct string across all rows is embedded in one ``scorer.encode`` call (which caches), so candidates
    shared by rows (the mean prompt) and repeated samples cost one embedding. ``exponent`` defaults to the scorer's.
    """
    exponent = getattr(scorer, "exponent", 3.0) if exponent is None else exponent
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"score_rows: row {i} has no candidates")
    distinct = list(dict.fromkeys(str(c) for row in rows for c in row))
    if not distinct:
        return []
    vectors = np.asarray(scorer.encode(distinct))
    position = {text: i for i, text in enumerate(distinct)}
    return [mbr_scores(vectors[[position[str(c)] for c in row]], exponent) for row in rows]


def mbr_choose(rows: Sequence[Sequence[str]], scorer: Encoder, top_k: int = 1, sep: str = " ",
               last: str | None = None, exponent: float | None = None) -> list[str]:
    """The selected string of each row (``rows[i]``: its candidates, the greedy answer first): the MBR pick, or the
    top-``top_k`` distinct candidates joined (see :func:`combine` for ``last``)."""
    return [combine(row, scores, top_k, sep, last) for row, scores in zip(rows, score_rows(rows, scorer, exponent))]


def mbr_candidates(primary: str, extra: list[str], post: PostprocessConfig, texts=()) -> list[str]:
    """One row's MBR candidates: the cleaned primary (greedy) answer, the mean prompt, the cleaned samples, in that
    order (so the greedy answer wins ties); unusable ones dropped, duplicates kept (they are votes)."""
    cleaned = [clean_prediction(raw, post, texts) for raw in [primary, *extra]]
    candidates = [cleaned[0], squash(post.mean_prompt), *cleaned[1:]]
    return [c for c in candidates if c]


def reward_rows(rows: Sequence[Sequence[str]], sources, rewarder: Rewarder, batch_size: int = 16) -> list[np.ndarray]:
    """The reward of each row's candidates (``rows[i]``: k_i strings; ``sources[i]``: the row's original and
    rewritten texts) → a list of (k_i,) arrays, in one ``rewarder.score`` call; a row without candidates gets an
    empty array and is not sent. Raises ValueError unless the reward model gives one finite reward per candidate."""
    live = [i for i, row in enumerate(rows) if len(row)]
    out = [np.zeros(0) for _ in rows]
    if not live:
        return out
    got = rewarder.score([sources[i][0] for i in live], [sources[i][1] for i in live], [list(rows[i]) for i in live],
                         batch_size=batch_size)
    if len(got) != len(live):
        raise ValueError(f"reward model: {len(got)} rows of rewards for {len(live)} rows of candidates")
    for i, rewards in zip(live, got):
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(rewards) != len(rows[i]) or not np.isfinite(rewards).all():
            raise ValueError(f"reward model: row {i}: rewards {rewards.tolist()} for {len(rows[i])} candidates")
        out[i] = rewards
    return out


def _saved(scores) -> str:
    """Scores as written per candidate: rounded as the picks round them (``TIE_DECIMALS``), so a pick recomputed from
    the file (promptrec/rerank.py) is the pick made here."""
    return json.dumps([float(x) for x in np.round(np.asarray(scores, dtype=np.float64), TIE_DECIMALS)])


def mbr_frame(ids, raw: list[str], extra: list[list[str]], ok, sources, post: PostprocessConfig, scorer: Encoder,
              rule: SelectionRule | None = None, rewarder: Rewarder | None = None) -> pd.DataFrame:
    """The prediction frame of :func:`promptrec.predict.predict_frame` when it picks among candidates (``rule``:
    MBR by default, or reward selection, which needs ``rewarder``), from each row's raw greedy answer and raw
    samples; rows without text (``ok`` False) have no candidates and get the mean prompt. The MBR scores are always
    computed, and the rewards whenever ``rewarder`` is given, so one set of samples serves every rule. Besides ``id,
    rewrite_prompt, raw_prediction``: ``fallback`` (the row had text but every answer and sample was unusable, so
    the mean prompt is its only candidate), ``raw_samples`` (JSON list of the raw samples), ``candidates`` (JSON list
    of :func:`mbr_candidates`), ``mbr_scores`` (JSON list, one per candidate), ``rewards`` (JSON list, one per
    candidate; only with ``rewarder``), ``selected_index`` (the top candidate's index in ``candidates``; -1 without
    candidates) and ``selected`` (the pick, or the top-k joined, before the mean prompt is appended)."""
    rule = rule or SelectionRule()
    if rule.uses_rewards and rewarder is None:
        raise ValueError(f"mbr_frame: selection {rule.selection!r} needs a reward model")
    candidates = [mbr_candidates(r, e, post, texts) if good else [] for r, e, good, texts
                  in zip(raw, extra, ok, sources, strict=True)]
    live_scores = iter(score_rows([c for c in candidates if c], scorer))
    scores = [next(live_scores) if c else np.zeros(0) for c in candidates]
    rewards = None if rewarder is None else reward_rows(candidates, sources, rewarder, rule.reward_batch_size)
    choice = [rule.scores(s, None if rewards is None else rewards[i]) if c else np.zeros(0)
              for i, (c, s) in enumerate(zip(candidates, scores))]
    last = squash(post.mean_prompt) if post.append_mean_prompt else None
    selected = [combine(c, x, rule.concat_top_k, last=last) if c else "" for c, x in zip(candidates, choice)]
    columns = {"id": ids, "rewrite_prompt": [finalize(text, post) for text in selected],
               "fallback": [bool(good) and len(c) == 1 for good, c in zip(ok, candidates)],
               "raw_prediction": raw, "raw_samples": [json.dumps(e, ensure_ascii=False) for e in extra],
               "candidates": [json.dumps(c, ensure_ascii=False) for c in candidates],
               "mbr_scores": [_saved(s) for s in scores]}
    if rewards is not None:
        columns["rewards"] = [_saved(r) for r in rewards]
    columns["selected_index"] = [int(order_by_score(x)[0]) if len(x) else -1 for x in choice]
    columns["selected"] = selected
    return pd.DataFrame(columns)


def mbr_pick_counts(result: pd.DataFrame, post: PostprocessConfig) -> dict:
    """How often the MBR pick was the greedy answer, the mean prompt, a sample only, or a concatenation."""
    mean = squash(post.mean_prompt)
    counts: Counter = Counter()
    for selected, candidates in zip(result["selected"], result["candidates"]):
        candidates = json.loads(candidates)
        if not candidates:
            counts["no_text"] += 1
        elif selected == candidates[0] and selected != mean:
            counts["greedy"] += 1
        elif selected == mean:
            counts["mean_prompt"] += 1
        elif selected in candidates:
            counts["sample"] += 1
        else:
            counts["concatenation"] += 1
    return dict(counts)
