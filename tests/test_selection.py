"""MBR selection (promptrec.selection) on hand-made embeddings, and its use in predict's candidate handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptrec.postprocess import PostprocessConfig
from promptrec.selection import (
    combine,
    concat_top,
    mbr_candidates,
    mbr_choose,
    mbr_frame,
    mbr_order,
    mbr_scores,
    mbr_select,
    order_by_score,
    score_rows,
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
