"""MBR and reward selection (promptrec.selection) on hand-made embeddings and rewards, and their use in predict's
candidate handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptrec.postprocess import PostprocessConfig
from promptrec.selection import (
    SelectionRule,
    combine,
    concat_top,
    mbr_candidates,
    mbr_choose,
    mbr_frame,
    mbr_order,
    mbr_scores,
    mbr_select,
    order_by_score,
    rerank_picks,
    rerank_scores,
    reward_rows,
    score_rows,
    standardize,
    top_distinct,
)


def unit(*rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FakeScorer:
    """A scorer over a fixed string → vector table that records what it was asked to embed."""

    exponent = 3.0

    def __init__(self, table: dict[str, list[float]]):
        self.table = {k: unit(v)[0] for k, v in table.items()}
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts])


# Three near each other (the consensus is the middle one), one far away.
CLUSTER = unit([1.0, 0.2, 0.0], [1.0, 0.0, 0.0], [1.0, -0.2, 0.0], [0.0, 0.0, 1.0])


def test_the_consensus_candidate_is_chosen():
    assert mbr_select(CLUSTER) == 1
    assert list(mbr_order(CLUSTER)) == [1, 0, 2, 3]


def test_an_outlier_is_never_chosen():
    rng = np.random.default_rng(0)
    for _ in range(20):
        centre = rng.normal(size=8)
        near = centre + 0.1 * rng.normal(size=(4, 8))
        outlier = rng.normal(size=(1, 8))
        for where in range(5):  # the outlier anywhere, index 0 (the tie-winner) included
            emb = unit(*np.insert(near, where, outlier, axis=0))
            assert mbr_select(emb) != where
            assert mbr_order(emb)[-1] == where


def test_self_similarity_is_excluded():
    # With self-similarity included the duplicated pair and the singleton would differ by 1/k; excluded, the pair's
    # members score (1 + s) / 2 against each other and the singleton s.
    emb = unit([1.0, 0.0], [1.0, 0.0], [0.6, 0.8])
    s = 0.6 ** 3
    np.testing.assert_allclose(mbr_scores(emb), [(1 + s) / 2, (1 + s) / 2, s])


def test_ties_go_to_the_lowest_index():
    assert mbr_select(np.eye(3)) == 0  # all orthogonal: every score 0
    assert mbr_select(unit([0.0, 1.0], [0.0, 1.0])) == 0  # two identical
    assert list(order_by_score(np.array([0.5, 0.7, 0.5, 0.7 + 1e-12]))) == [1, 3, 0, 2]  # ulp noise ties too


def test_one_candidate_is_chosen():
    assert mbr_select(unit([0.3, 0.4])) == 0
    assert mbr_choose([["Rewrite it as a poem."]], FakeScorer({"Rewrite it as a poem.": [1, 0]})) == [
        "Rewrite it as a poem."]
    with pytest.raises(ValueError):
        mbr_scores(np.zeros((0, 3)))


def test_concat_top_joins_distinct_candidates_in_rank_order():
    candidates = ["a poem", "a sonnet", "a sonnet", "a limerick"]
    assert concat_top(candidates, [2, 1, 0, 3], 2) == "a sonnet a poem"  # the duplicate counts once
    assert concat_top(candidates, [0, 1, 2, 3], 2, sep=" | ") == "a poem | a sonnet"
    assert concat_top(candidates, [3, 2, 1, 0], 1) == "a limerick"
    assert top_distinct(candidates, [1, 2, 0, 3], 10) == ["a sonnet", "a poem", "a limerick"]


def test_combine_moves_the_appended_mean_prompt_last():
    scores = np.array([0.2, 0.9, 0.5])
    assert combine(["X", "MEAN", "Y"], scores, top_k=2, last="MEAN") == "Y MEAN"
    assert combine(["X", "MEAN", "Y"], scores, top_k=1, last="MEAN") == "MEAN"  # alone: finalize won't append it
    assert combine(["X", "MEAN", "Y"], scores, top_k=2) == "MEAN Y"


def test_score_rows_embeds_every_distinct_string_once():
    scorer = FakeScorer({"poem": [1, 0.5, 0], "verse": [1, 0, 0], "mean": [0, 1, 0], "news": [0, 0, 1]})
    rows = [["poem", "mean", "verse", "verse"], ["news", "mean", "poem"]]
    scores = score_rows(rows, scorer)
    assert len(scorer.calls) == 1 and sorted(scorer.calls[0]) == ["mean", "news", "poem", "verse"]
    assert [s.shape for s in scores] == [(4,), (3,)]
    # row 0: the duplicated "verse" outvotes "poem"; row 1: "mean" and "poem" tie, the lower index wins
    assert mbr_choose(rows, scorer) == ["verse", "mean"]
    with pytest.raises(ValueError, match="row 1 has no candidates"):
        score_rows([["poem"], []], scorer)


def test_candidates_are_cleaned_greedy_first_mean_second():
    post = PostprocessConfig(mean_prompt="Improve the text to this.")
    texts = ("The cat sat on the mat all day long.", "A cat on a mat.")
    got = mbr_candidates('Sure! Here is the instruction: "Rewrite it as a poem."', [
        "1. Make it a poem.", "", "I'm sorry, I can't.", "The cat sat on the mat", "Make it a poem."], post, texts)
    assert got == ["Rewrite it as a poem.", "Improve the text to this.", "Make it a poem.", "Make it a poem."]
    assert mbr_candidates("", [""], post) == ["Improve the text to this."]


def test_mbr_frame_finalizes_the_pick_and_never_leaves_a_blank():
    mean = "Improve the text to this."
    post = PostprocessConfig(mean_prompt=mean, append_mean_prompt=True)
    scorer = FakeScorer({"Rewrite it as a poem.": [1, 0, 0], "Make it a poem.": [0.95, 0.05, 0.1],
                         "Write a poem.": [0.9, 0, 0.1], mean: [0.3, 1, 0], "Summarise it.": [0, 0, 1]})
    frame = mbr_frame(["a", "b", "c"], ["Summarise it.", "", ""],
                      [["Make it a poem.", "Write a poem.", "Rewrite it as a poem."], ["???"], []],
                      [True, True, False], [("x", "y")] * 3, post, scorer)
    assert list(frame["selected"]) == ["Make it a poem.", mean, ""]
    assert list(frame["fallback"]) == [False, True, False]  # b had text, nothing usable; c had no text
    assert list(frame["rewrite_prompt"]) == [f"Make it a poem. {mean}", mean, mean]
    assert json.loads(frame["candidates"][0])[:2] == ["Summarise it.", mean]
    assert json.loads(frame["candidates"][2]) == [] and json.loads(frame["mbr_scores"][2]) == []


# ---------------------------------------------------------------- reward selection


class FakeRewarder:
    """A reward model over a fixed string → reward table that records its calls (default reward 0)."""

    def __init__(self, table: dict[str, float] | None = None):
        self.table = table or {}
        self.calls: list[tuple] = []

    def score(self, originals, rewrittens, candidates, batch_size=16):
        self.calls.append((list(originals), list(rewrittens), [list(c) for c in candidates], batch_size))
        return [np.array([self.table.get(c, 0.0) for c in row]) for row in candidates]


def test_reward_selection_picks_the_highest_reward():
    assert rerank_picks([[0.1, 2.0, -1.0], [5.0, 4.0], [-3.0, -2.0, -2.5]]) == [1, 0, 1]
    # the scale of the rewards does not matter, only their order within the row
    assert rerank_picks([[10.0, 200.0, -100.0]]) == rerank_picks([[0.001, 0.002, 0.0]]) == [1]


def test_standardize_is_a_per_row_z_score_and_zero_without_variance():
    z = standardize([1.0, 2.0, 3.0])
    np.testing.assert_allclose(z, [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)
    for flat in ([0.7, 0.7, 0.7], [4.2], [1.0, 1.0 + 1e-12]):  # equal, alone, equal to TIE_DECIMALS
        assert list(standardize(flat)) == [0.0] * len(flat)
    for bad in ([], [1.0, np.nan]):
        with pytest.raises(ValueError, match="standardize"):
            standardize(bad)


def test_hybrid_flips_the_pick_when_the_mbr_weight_is_large():
    rewards, mbr = [[1.0, 1.2, 0.0]], [[0.6, 0.2, 0.4]]  # reward prefers 1, consensus prefers 0
    assert rerank_picks(rewards, mbr, mbr_weight=0.0) == rerank_picks(rewards) == [1]
    assert rerank_picks(rewards, mbr, mbr_weight=0.1) == [1]  # the flip is at w ≈ 0.155
    assert rerank_picks(rewards, mbr, mbr_weight=5.0) == [0]
    # z-scored: the raw MBR scale (here 1000x smaller) changes nothing
    assert rerank_picks(rewards, [[x / 1000 for x in mbr[0]]], mbr_weight=5.0) == [0]
    np.testing.assert_allclose(rerank_scores(rewards[0], mbr[0], 2.0),
                               standardize(rewards[0]) + 2.0 * standardize(mbr[0]))


def test_rerank_ties_go_to_the_lowest_index():
    assert rerank_picks([[0.3, 0.5, 0.5], [0.2, 0.2, 0.2], [1.0, 1.0 + 1e-12, 0.0]]) == [1, 0, 0]
    # equal rewards: the consensus decides; equal both: the greedy answer (index 0)
    assert rerank_picks([[0.4, 0.4, 0.4]], [[0.1, 0.3, 0.2]]) == [1]
    assert rerank_picks([[0.4, 0.4]], [[0.3, 0.3]]) == [0]
    # a perfect trade-off (z-scores cancel at weight 1) is a tie too
    assert rerank_picks([[1.0, 0.0]], [[0.0, 1.0]], mbr_weight=1.0) == [0]
    assert rerank_picks([[-1.0]], [[0.0]]) == [0]


def test_rerank_errors_are_one_line():
    with pytest.raises(ValueError, match="mbr_weight must be >= 0"):
        rerank_scores([1.0, 2.0], [0.1, 0.2], mbr_weight=-1)
    with pytest.raises(ValueError, match="2 rewards but"):
        rerank_scores([1.0, 2.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="2 rows of rewards but 1"):
        rerank_picks([[1.0], [2.0]], [[0.0]])
    with pytest.raises(ValueError, match="selection must be one of mbr, reward, reward_mbr"):
        SelectionRule("greedy")


def test_reward_rows_skips_rows_without_candidates_and_checks_the_counts():
    rewarder = FakeRewarder({"a": 1.0, "b": 2.0})
    got = reward_rows([["a", "b"], [], ["b"]], [("o1", "r1"), (None, None), ("o3", "r3")], rewarder, batch_size=4)
    assert [g.tolist() for g in got] == [[1.0, 2.0], [], [2.0]]
    assert rewarder.calls == [(["o1", "o3"], ["r1", "r3"], [["a", "b"], ["b"]], 4)]  # one call, live rows only
    short = FakeRewarder()
    short.score = lambda o, r, c, batch_size=16: [np.zeros(1) for _ in c]
    with pytest.raises(ValueError, match="row 0: rewards"):
        reward_rows([["a", "b"]], [("o", "r")], short)


@pytest.mark.parametrize("selection, weight, expected", [
    ("mbr", 1.0, "Make it a poem."), ("reward", 1.0, "Summarise it."), ("reward_mbr", 0.1, "Summarise it."),
    ("reward_mbr", 10.0, "Make it a poem.")])
def test_mbr_frame_records_rewards_and_mbr_scores_for_every_rule(selection, weight, expected):
    mean = "Improve the text to this."
    post = PostprocessConfig(mean_prompt=mean)
    scorer = FakeScorer({"Rewrite it as a poem.": [1, 0, 0], "Make it a poem.": [0.95, 0.05, 0.1],
                         "Write a poem.": [0.9, 0, 0.1], mean: [0.3, 1, 0], "Summarise it.": [0, 0, 1]})
    rewarder = FakeRewarder({"Summarise it.": 3.0, "Make it a poem.": 1.0, mean: 0.5})
    frame = mbr_frame(["a", "b", "c"], ["Summarise it.", "", ""],
                      [["Make it a poem.", "Write a poem.", "Rewrite it as a poem."], ["???"], []],
                      [True, True, False], [("x", "y")] * 3, post, scorer, SelectionRule(selection, weight), rewarder)
    candidates = json.loads(frame["candidates"][0])
    assert candidates == ["Summarise it.", mean, "Make it a poem.", "Write a poem.", "Rewrite it as a poem."]
    assert json.loads(frame["rewards"][0]) == [3.0, 0.5, 1.0, 0.0, 0.0]
    assert len(json.loads(frame["mbr_scores"][0])) == 5
    assert frame["selected"][0] == expected and candidates[frame["selected_index"][0]] == expected
    # b: nothing usable, the mean prompt alone; c: no text, no candidates → the mean prompt, never a blank
    assert list(frame["selected_index"][1:]) == [0, -1] and list(frame["rewrite_prompt"][1:]) == [mean, mean]
    assert json.loads(frame["rewards"][2]) == [] and list(frame["fallback"]) == [False, True, False]


def test_reward_selection_needs_a_reward_model():
    post = PostprocessConfig(mean_prompt="Improve the text to this.")
    with pytest.raises(ValueError, match="'reward' needs a reward model"):
        mbr_frame(["a"], ["x"], [["y"]], [True], [("o", "r")], post, FakeScorer({}), SelectionRule("reward"))
