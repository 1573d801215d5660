"""Report rows from one sampled decode (issue 24, docs/reward_model.md): pure functions over the raw output that
``inference/predict.py --selection mbr --reward_model DIR --raw_output F`` writes, where every row's candidates (the
cleaned greedy answer, the mean prompt, the cleaned samples) come with their MBR scores and rewards.

From those recorded scores, with no second decode, each rule picks one candidate per row exactly as predict.py's
own selection would (:class:`promptrec.selection.SelectionRule`, on scores saved as its ties round them): ``mbr``,
``rm`` (predict's ``reward``), ``rm_mbr`` (``reward_mbr``, z(reward) + w · z(MBR)) and ``oracle`` (highest SCS
against the true prompt: an upper bound at the same N, not a method). The weight w is chosen on validation rows
(:func:`choose_weight`), never on the rows it is reported on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from promptrec.evaluation import within_group_spearman
from promptrec.postprocess import PostprocessConfig, finalize
from promptrec.selection import SelectionRule, order_by_score

RULES = {"mbr": "mbr", "rm": "reward", "rm_mbr": "reward_mbr"}  # report row id → predict.py's --selection
ROWS = ("rm", "rm_mbr", "oracle")  # the report rows picked here (the mbr row is predict.py's own)
WEIGHTS = (0.25, 0.5, 1.0, 2.0)  # the hybrid's MBR weights tried on validation (docs/reward_model.md)


def recorded(raw: pd.DataFrame, path: str = "raw output"
             ) -> tuple[list[list[str]], list[np.ndarray], list[np.ndarray]]:
    """Each row's candidates, MBR scores and rewards from a raw output table (JSON list columns). Raises ValueError
    naming ``path`` and the row when a column is missing or a row's lists disagree in length."""
    missing = [c for c in ("candidates", "mbr_scores", "rewards") if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} column (predict.py --selection mbr --reward_model DIR "
                         "--raw_output F records them)")
    candidates = [json.loads(c) for c in raw["candidates"]]
    mbr = [np.asarray(json.loads(s), dtype=np.float64) for s in raw["mbr_scores"]]
    rewards = [np.asarray(json.loads(s), dtype=np.float64) for s in raw["rewards"]]
    for i, (c, m, r) in enumerate(zip(candidates, mbr, rewards)):
        if not len(c) == len(m) == len(r):
            raise ValueError(f"{path}: row {i} (id {raw['id'].iloc[i]}): {len(c)} candidates, {len(m)} MBR scores, "
                             f"{len(r)} rewards")
    return candidates, mbr, rewards


def rule_picks(rule: str, mbr: Sequence[np.ndarray], rewards: Sequence[np.ndarray], weight: float = 1.0) -> list[int]:
    """Per row, the index of the candidate ``rule`` picks, as predict.py's ``--selection RULES[rule]`` with
    ``--mbr_weight weight`` picks it (-1 for a row without candidates; ties go to the lowest index, the greedy
    answer)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    selection = SelectionRule(RULES[rule], mbr_weight=weight)
    return [int(order_by_score(selection.scores(m, r))[0]) if len(m) else -1 for m, r in zip(mbr, rewards,
                                                                                             strict=True)]


def oracle_picks(truth_scores: Sequence[np.ndarray]) -> list[int]:
    """Per row, the candidate with the highest SCS against the truth (-1 without candidates)."""
    return [int(order_by_score(s)[0]) if len(s) else -1 for s in truth_scores]


def picked_prompts(candidates: Sequence[Sequence[str]], picks: Sequence[int], post: PostprocessConfig) -> list[str]:
    """The submitted prompt of each row: its pick, post-processed as predict.py does (the mean prompt for a row
    without candidates), so a pick never leaves a blank prompt."""
    return [finalize(row[p] if p >= 0 else "", post) for row, p in zip(candidates, picks, strict=True)]


def picked_scores(truth_scores: Sequence[np.ndarray], picks: Sequence[int], fallback: Sequence[float]) -> np.ndarray:
    """The SCS of each row's pick; ``fallback[i]`` (the mean prompt's SCS on row i) for a row without candidates."""
    return np.array([s[p] if p >= 0 else f for s, p, f in zip(truth_scores, picks, fallback, strict=True)])


def choose_weight(mbr: Sequence[np.ndarray], rewards: Sequence[np.ndarray], truth_scores: Sequence[np.ndarray],
                  fallback: Sequence[float], weights: Sequence[float] = WEIGHTS) -> tuple[float, dict[float, float]]:
    """The hybrid's MBR weight with the highest mean SCS of its picks (validation rows; ties: the first listed), and
    every weight's mean (``fallback`` as :func:`picked_scores`)."""
    means = {float(w): float(picked_scores(truth_scores, rule_picks("rm_mbr", mbr, rewards, w), fallback).mean())
             for w in weights}
    best = max(means.values())
    return next(w for w in means if means[w] == best), means


def validation_choice(raw: pd.DataFrame, truth: Sequence[str], scorer, mean_prompt: str,
                      path: str = "validation raw output") -> dict:
    """What the validation decode decides and shows: the hybrid's MBR weight (:func:`choose_weight`), each weight's
    mean, each rule's mean SCS (greedy = the first candidate, the oracle too) and the within-row Spearman of reward
    with true SCS. ``truth``: each raw row's true prompt, in order; ``scorer``: a
    :class:`promptrec.scoring.Scorer`."""
    candidates, mbr, rewards = recorded(raw, path)
    scores = scorer.score_candidates(candidates, list(truth))
    fallback = scorer.score([mean_prompt] * len(truth), list(truth))  # what a row without candidates submits
    weight, means = choose_weight(mbr, rewards, scores, fallback)
    picks = {"greedy": [0 if len(c) else -1 for c in candidates], "mbr": rule_picks("mbr", mbr, rewards),
             "rm": rule_picks("rm", mbr, rewards), "rm_mbr": rule_picks("rm_mbr", mbr, rewards, weight),
             "oracle": oracle_picks(scores)}
    rho, ranked = within_group_spearman(zip(rewards, scores))
    return {"mbr_weight": weight, "hybrid_means": {str(w): m for w, m in means.items()},
            "means": {rule: float(picked_scores(scores, chosen, fallback).mean()) for rule, chosen in picks.items()},
            "spearman_within_row": None if np.isnan(rho) else rho, "rows_ranked": ranked, "rows": len(candidates)}


def rerank_rows(raw: pd.DataFrame, truth: Sequence[str], scorer, weight: float, post: PostprocessConfig,
                path: str = "raw output") -> dict[str, list[str]]:
    """The submitted prompts of the rows ``rm``, ``rm_mbr`` (with ``weight``) and ``oracle`` (``truth``: each raw
    row's true prompt, read by the oracle only), picked among the raw output's candidates."""
    candidates, mbr, rewards = recorded(raw, path)
    picks = {"rm": rule_picks("rm", mbr, rewards), "rm_mbr": rule_picks("rm_mbr", mbr, rewards, weight),
             "oracle": oracle_picks(scorer.score_candidates(candidates, list(truth)))}
    return {row: picked_prompts(candidates, chosen, post) for row, chosen in picks.items()}
