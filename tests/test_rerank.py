"""The reward rows of the report (promptrec/rerank.py) on hand-made recorded scores: each rule picks what it says,
the hybrid's weight is chosen on validation rows only, the oracle is an upper bound, and no pick is ever blank."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from promptrec.evaluation import ratio_ci, within_group_spearman
from promptrec.postprocess import PostprocessConfig
from promptrec.rerank import (
    RULES,
    choose_weight,
    oracle_picks,
    picked_prompts,
    recorded,
    rerank_rows,
    rule_picks,
    validation_choice,
)
from promptrec.selection import SelectionRule, mbr_frame

MEAN = "Rewrite this text in a new style."


class ExactScorer:
    """SCS 1 for the same string, else 0: enough to tell which candidate matched the truth."""

    def score(self, predictions, truths):
        return np.array([float(p == t) for p, t in zip(predictions, truths)])

    def score_candidates(self, candidates, truths):
        return [self.score(row, [t] * len(row)) for row, t in zip(candidates, truths)]


class VectorScorer:
    """An encoder with a fixed random unit vector per string: MBR scores with near-ties, as real ones have."""

    exponent = 3.0

    def __init__(self, seed: int = 0):
        self.rng, self.memory = np.random.default_rng(seed), {}

    def encode(self, texts):
        for t in texts:
            if t not in self.memory:
                v = self.rng.normal(size=8)
                self.memory[t] = v / np.linalg.norm(v)
        return np.stack([self.memory[t] for t in texts])


class TableRewarder:
    """Rewards from a table, tiny differences included (the picks must not flip on a rounding of them)."""

    def __init__(self, table):
        self.table = table

    def score(self, originals, rewrittens, candidates, batch_size=16):
        return [np.array([self.table[c] for c in row]) for row in candidates]


def raw_frame(rows: list[tuple[list[str], list[float], list[float]]]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i}" for i in range(len(rows))],
                         "candidates": [json.dumps(c) for c, _, _ in rows],
                         "mbr_scores": [json.dumps(m) for _, m, _ in rows],
                         "rewards": [json.dumps(r) for _, _, r in rows]})


# row 0: greedy "a" has consensus, the reward prefers "b"; row 1: no candidates (no text)
RAW = raw_frame([(["a", MEAN, "b", "c"], [0.9, 0.2, 0.5, 0.1], [0.0, -1.0, 3.0, 1.0]), ([], [], [])])


def test_each_rule_picks_by_its_own_score_and_ties_go_to_greedy():
    _, mbr, rewards = recorded(RAW)
    assert rule_picks("mbr", mbr, rewards) == [0, -1]
    assert rule_picks("rm", mbr, rewards) == [2, -1]
    # z(mbr) = [1.53, -0.72, 0.24, -1.05], z(reward) = [-0.51, -1.18, 1.52, 0.17]: w = 2 tips it to the consensus
    assert rule_picks("rm_mbr", mbr, rewards, 0.25) == [2, -1] and rule_picks("rm_mbr", mbr, rewards, 2.0) == [0, -1]
    assert rule_picks("rm", [np.array([0.3, 0.3])], [np.array([1.0, 1.0])]) == [0]  # a tie: the greedy answer
    with pytest.raises(ValueError, match="rule must be one of"):
        rule_picks("oracle", mbr, rewards)


def test_recorded_names_the_file_and_row_of_a_broken_raw_output():
    with pytest.raises(ValueError, match="out.raw.parquet: no rewards column"):
        recorded(RAW.drop(columns="rewards"), "out.raw.parquet")
    broken = raw_frame([(["a", "b"], [0.1, 0.2], [1.0])])
    with pytest.raises(ValueError, match=r"row 0 \(id r0\): 2 candidates, 2 MBR scores, 1 rewards"):
        recorded(broken)


def test_oracle_is_the_best_candidate_by_truth_and_picks_are_never_blank():
    candidates, _, _ = recorded(RAW)
    truth = ["c", "anything"]
    rows = rerank_rows(RAW, truth, ExactScorer(), 1.0, PostprocessConfig(mean_prompt=MEAN))
    assert rows["oracle"] == ["c", MEAN] and rows["rm"] == ["b", MEAN]  # a row without candidates: the mean prompt
    assert all(p.strip() for prompts in rows.values() for p in prompts)
    assert oracle_picks([np.array([0.1, 0.7, 0.7]), np.zeros(0)]) == [1, -1]
    assert picked_prompts(candidates, [3, -1], PostprocessConfig(mean_prompt=MEAN)) == ["c", MEAN]


def test_weight_is_chosen_by_validation_scores_ties_to_the_first_listed():
    _, mbr, rewards = recorded(RAW)
    truth_favours_greedy = [np.array([1.0, 0.0, 0.0, 0.0]), np.zeros(0)]
    weight, means = choose_weight(mbr, rewards, truth_favours_greedy, fallback=[0.0, 0.5])
    assert weight == 2.0 and means == {0.25: 0.25, 0.5: 0.25, 1.0: 0.25, 2.0: 0.75}  # row 1: the mean prompt's 0.5
    truth_favours_b = [np.array([0.0, 0.0, 1.0, 0.0]), np.zeros(0)]
    weight, means = choose_weight(mbr, rewards, truth_favours_b, fallback=[0.0, 0.0])
    assert weight == 0.25 and means[0.25] == means[0.5] == means[1.0] == 0.5


def test_validation_choice_reports_every_rule_and_the_reward_correlation():
    chosen = validation_choice(RAW, ["a", "zzz"], ExactScorer(), MEAN)
    assert chosen["mbr_weight"] == 2.0 and chosen["rows"] == 2
    assert chosen["means"] == {"greedy": 0.5, "mbr": 0.5, "rm": 0.0, "rm_mbr": 0.5, "oracle": 0.5}
    # row 0: rewards [0, -1, 3, 1] against truth [1, 0, 0, 0]: the reward ranks the right answer third
    assert chosen["spearman_within_row"] == pytest.approx(-0.2581989) and chosen["rows_ranked"] == 1
    rho, n = within_group_spearman([([1.0, 2.0, 3.0], [0.1, 0.2, 0.3]), ([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])])
    assert rho == pytest.approx(1.0) and n == 1  # a row whose rewards do not vary ranks nothing


def test_ratio_ci_brackets_the_ratio_of_means_and_resamples_groups():
    rng = np.random.default_rng(0)
    den = rng.uniform(0.2, 0.4, 200)
    num = 0.3 * den + rng.normal(0, 0.01, 200)
    low, high = ratio_ci(num, den, seed=1)
    assert low < num.mean() / den.mean() < high and high - low < 0.05
    groups = np.repeat(np.arange(20), 10)
    g_low, g_high = ratio_ci(num, den, seed=1, groups=groups)
    assert g_low < num.mean() / den.mean() < g_high
    assert all(np.isnan(ratio_ci(np.zeros(3), np.zeros(3))))  # no headroom at all: no interval
    half = ratio_ci(np.ones(4), np.array([1.0, -1.0, 1.0, -1.0]), seed=0)  # headroom often <= 0 when resampled
    assert all(np.isnan(half))
    with pytest.raises(ValueError, match="shape"):
        ratio_ci(np.ones(3), np.ones(4))


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("weight", [0.25, 1.0, 2.0])
def test_picks_from_the_saved_scores_are_the_picks_predict_made(rule, weight):
    """predict.py picks on full-precision scores and saves them; the report re-picks from the file. Over 200 rows
    with near-tied rewards (1e-7 apart) the two agree on every row, for every rule and weight."""
    rng = np.random.default_rng(7)
    words = [f"Make it sound like {w}." for w in ("a poem", "a memo", "a limerick", "a letter", "a speech", "a toast")]
    rewards = {w: float(i // 2) + 1e-7 * (i % 2) for i, w in enumerate(rng.permutation(words))}  # pairs 1e-7 apart
    rewards[MEAN] = 1.0 - 1e-7
    n = 200
    raw = [str(rng.choice(words)) for _ in range(n)]
    extra = [[str(w) for w in rng.choice(words, size=3)] for _ in range(n)]
    frame = mbr_frame([f"r{i}" for i in range(n)], raw, extra, [True] * n, [("o", "r")] * n,
                      PostprocessConfig(mean_prompt=MEAN), VectorScorer(), SelectionRule(RULES[rule], weight),
                      TableRewarder(rewards))
    _, mbr, saved_rewards = recorded(frame)
    assert rule_picks(rule, mbr, saved_rewards, weight) == frame["selected_index"].tolist()
