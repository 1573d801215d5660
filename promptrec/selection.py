"""Minimum-Bayes-risk (MBR) selection among a row's candidate prompts: pure functions over embeddings.

The policy often samples a good prompt without ranking it first. MBR picks the candidate that agrees best with the
others, i.e. the one with the highest expected metric if the true prompt were drawn from the candidates:
``score[i] = mean_{j != i} SCS(e_i, e_j)`` with SCS the competition's sharpened cosine
(:func:`promptrec.scoring.scs_matrix`). Duplicates count as votes: a string sampled three times is three
candidates. Ties (within 1e-9) go to the lowest index, so the candidate put first (the greedy answer) wins them.

``concat_top`` joins the top-k distinct candidates, as the competition's top solutions submitted several guesses in
one prompt. :func:`mbr_choose` does a whole batch of rows with a scorer, embedding every distinct string once;
:func:`mbr_frame` is the predict step's MBR output from each row's raw greedy answer and raw samples.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from promptrec.postprocess import PostprocessConfig, clean_prediction, finalize, squash
from promptrec.scoring import scs_matrix

TIE_DECIMALS = 9  # scores equal to this many decimals tie (sums of the same values in another order differ by ulps)


class Encoder(Protocol):
    """What :func:`score_rows` needs of a scorer: :class:`promptrec.scoring.Scorer` fits."""

    exponent: float

    def encode(self, texts: list[str]) -> np.ndarray: ...


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


def mbr_frame(ids, raw: list[str], extra: list[list[str]], ok, sources, post: PostprocessConfig, scorer: Encoder,
              concat_top_k: int = 1) -> pd.DataFrame:
    """The MBR prediction frame of :func:`promptrec.predict.predict_frame` from each row's raw greedy answer and raw
    samples; rows without text (``ok`` False) have no candidates and get the mean prompt. Besides ``id,
    rewrite_prompt, raw_prediction``: ``fallback`` (the row had text but every answer and sample was unusable, so
    the mean prompt is its only candidate), ``raw_samples`` (JSON list of the raw samples), ``candidates`` (JSON list
    of :func:`mbr_candidates`), ``mbr_scores`` (JSON list, one per candidate) and ``selected`` (the pick before the
    mean prompt is appended)."""
    candidates = [mbr_candidates(r, e, post, texts) if good else [] for r, e, good, texts
                  in zip(raw, extra, ok, sources, strict=True)]
    live_scores = iter(score_rows([c for c in candidates if c], scorer))
    scores = [next(live_scores) if c else [] for c in candidates]
    last = squash(post.mean_prompt) if post.append_mean_prompt else None
    selected = [combine(c, s, concat_top_k, last=last) if c else "" for c, s in zip(candidates, scores)]
    return pd.DataFrame({"id": ids, "rewrite_prompt": [finalize(text, post) for text in selected],
                         "fallback": [bool(good) and len(c) == 1 for good, c in zip(ok, candidates)],
                         "raw_prediction": raw, "raw_samples": [json.dumps(e, ensure_ascii=False) for e in extra],
                         "selected": selected, "candidates": [json.dumps(c, ensure_ascii=False) for c in candidates],
                         "mbr_scores": [json.dumps([round(float(x), 4) for x in s]) for s in scores]})


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
