"""Pure pair building, prompt clusters and negative selection on hand-made scores and embeddings."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from promptrec.pairs import (
    STRATEGIES,
    build_pairs,
    cluster_by_similarity,
    margin_stats,
    prompt_cluster_keys,
    select_negatives,
    source_counts,
    text_key,
)
from promptrec.splits import eval_mask

CANDS = ["true prompt", "good", "fair", "poor", "bad"]
SCORES = [1.0, 0.7, 0.5, 0.2, 0.05]
SOURCES = ["true", "policy", "bank_hard", "mean", "bank_random"]


def margins(pairs):
    return [p["score_chosen"] - p["score_rejected"] for p in pairs]


def test_best_vs_worst_pairs_best_with_worst_and_carries_scores_and_sources():
    (pair,) = build_pairs(CANDS, SCORES, "best_vs_worst", sources=SOURCES)
    assert pair == {"chosen": "true prompt", "rejected": "bad", "score_chosen": 1.0, "score_rejected": 0.05,
                    "source_chosen": "true", "source_rejected": "bank_random"}
    # input order does not matter
    order = [3, 0, 4, 2, 1]
    (again,) = build_pairs([CANDS[i] for i in order], [SCORES[i] for i in order], sources=[SOURCES[i] for i in order])
    assert again == pair


def test_true_prompt_is_never_chosen_when_not_allowed():
    for strategy in STRATEGIES:
        pairs = build_pairs(CANDS, SCORES, strategy, sources=SOURCES, allow_true_chosen=False)
        assert pairs and all(p["source_chosen"] != "true" for p in pairs)
    (pair,) = build_pairs(CANDS, SCORES, "best_vs_worst", sources=SOURCES, allow_true_chosen=False)
    assert pair["chosen"] == "good"
    # a policy sample equal to the true prompt (case, spacing, final dot aside) is the true prompt too
    pairs = build_pairs(["Make it formal", "Make it FORMAL.", "x"], [0.99, 1.0, 0.1], "all_pairs",
                        sources=["policy"] * 3, true_prompt="make  it formal.", allow_true_chosen=False)
    assert pairs == []


def test_rejected_sources_limits_the_rejected_side_to_those_sources():
    sources = ["true", "policy", "bank_hard", "policy", "bank_random"]
    (pair,) = build_pairs(CANDS, SCORES, "best_vs_worst", sources=sources, rejected_sources=["policy"])
    assert (pair["chosen"], pair["rejected"]) == ("true prompt", "poor")  # the worst policy sample, not "bad"
    for strategy in STRATEGIES:
        pairs = build_pairs(CANDS, SCORES, strategy, sources=sources, rejected_sources=["policy"])
        assert pairs and all(p["source_rejected"] == "policy" for p in pairs)
    assert build_pairs(CANDS, SCORES, "all_pairs", sources=sources, rejected_sources=["mean"]) == []
    # the best policy sample can still be chosen over a worse policy sample
    pairs = build_pairs(CANDS, SCORES, "all_pairs", sources=sources, rejected_sources=["policy"])
    assert ("good", "poor") in {(p["chosen"], p["rejected"]) for p in pairs}


def test_chosen_and_rejected_sources_policy_make_self_play_pairs():
    sources = ["true", "policy", "bank_hard", "policy", "bank_random"]
    (pair,) = build_pairs(CANDS, SCORES, "best_vs_worst", sources=sources, chosen_sources=["policy"],
                          rejected_sources=["policy"])
    assert (pair["chosen"], pair["rejected"]) == ("good", "poor")  # not the true prompt over the worst sample
    for strategy in STRATEGIES:
        pairs = build_pairs(CANDS, SCORES, strategy, sources=sources, chosen_sources=["policy"],
                            rejected_sources=["policy"])
        assert pairs and {(p["source_chosen"], p["source_rejected"]) for p in pairs} == {("policy", "policy")}
    # the chosen side alone: the best bank prompt may not be chosen, the worst of anything may be rejected
    pairs = build_pairs(CANDS, SCORES, "all_pairs", sources=sources, chosen_sources=["policy"])
    assert {p["source_chosen"] for p in pairs} == {"policy"} and "bad" in {p["rejected"] for p in pairs}

def test_topk_bottomk_takes_top_k_chosen_times_bottom_k_rejected():
    pairs = build_pairs(CANDS, SCORES, "topk_bottomk", k=2, sources=SOURCES)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == set(itertools.product(["true prompt", "good"],
                                                                                  ["bad", "poor"]))
    assert margins(pairs) == sorted(margins(pairs), reverse=True)
    # k larger than the list: every ordered pair with a margin, none of a candidate with itself
    wide = build_pairs(CANDS, SCORES, "topk_bottomk", k=10)
    assert len(wide) == 10 and all(p["chosen"] != p["rejected"] for p in wide)


def test_all_pairs_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(0, 9))
        scores = np.round(rng.uniform(-0.2, 1.0, n), 2)  # rounding makes ties
        cands = [f"prompt {i}" for i in range(n)]
        m = float(rng.choice([0.0, 0.1, 0.3]))
        pairs = build_pairs(cands, scores, "all_pairs", m)
        expected = {(cands[i], cands[j]) for i in range(n) for j in range(n)
                    if scores[i] - scores[j] >= m - 1e-9 and scores[i] - scores[j] > 1e-6}
        assert {(p["chosen"], p["rejected"]) for p in pairs} == expected, trial
        assert margins(pairs) == sorted(margins(pairs), reverse=True)


def test_min_margin_filters_and_ties_never_pair():
    assert build_pairs(["a", "b"], [0.5, 0.45], "best_vs_worst", min_margin=0.1) == []
    assert len(build_pairs(["a", "b"], [0.5, 0.45], "best_vs_worst", min_margin=0.05)) == 1
    for strategy in STRATEGIES:
        assert build_pairs(["a", "b", "c"], [0.4, 0.4, 0.4], strategy) == []
    # among tied best candidates the first one given is chosen
    (pair,) = build_pairs(["first", "second", "low"], [0.8, 0.8, 0.1])
    assert pair["chosen"] == "first"
    assert all(m >= 0.3 for m in margins(build_pairs(CANDS, SCORES, "all_pairs", 0.3)))


def test_cap_keeps_the_largest_margins():
    full = build_pairs(CANDS, SCORES, "all_pairs")
    capped = build_pairs(CANDS, SCORES, "all_pairs", max_pairs=3)
    assert capped == full[:3] and len(full) == 10
    assert sorted(margins(full), reverse=True)[:3] == margins(capped)
    assert build_pairs(CANDS, SCORES, "all_pairs", max_pairs=0) == []


def test_duplicates_are_removed_first_copy_wins():
    pairs = build_pairs(["Make it formal.", "make it  formal", "Shorten it"], [0.9, 0.2, 0.1], "all_pairs",
                        sources=["bank_hard", "policy", "mean"])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Make it formal.", "Shorten it")]
    assert text_key(" Make it   FORMAL!") == text_key("make it formal")


def test_empty_and_single_candidate_lists_give_no_pairs():
    for strategy in STRATEGIES:
        assert build_pairs([], [], strategy) == []
        assert build_pairs(["only"], [0.3], strategy) == []
        assert build_pairs(["", "  "], [0.9, 0.1], strategy) == []  # empty strings are no candidates


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": ["a"], "scores": [0.1, 0.2]}, "1 candidates but 2 scores"),
    ({"candidates": ["a", "b"], "scores": [0.1, float("nan")]}, "finite"),
    ({"candidates": ["a"], "scores": [0.1], "strategy": "best"}, "unknown strategy"),
    ({"candidates": ["a"], "scores": [0.1], "sources": []}, "sources"),
    ({"candidates": ["a"], "scores": [0.1], "min_margin": -1}, "min_margin"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_pairs(**kwargs)


def test_summary_helpers():
    pairs = build_pairs(CANDS, SCORES, "topk_bottomk", sources=SOURCES)
    counts = source_counts(pairs)
    assert counts["chosen"] == {"true": 2, "policy": 2} and sum(counts["combinations"].values()) == 4
    stats = margin_stats(margins(pairs))
    assert stats["count"] == 4 and stats["min"] == pytest.approx(0.5) and stats["max"] == pytest.approx(0.95)
    assert margin_stats([])["count"] == 0


# ---------------------------------------------------------------- splits and clusters


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_clusters_are_transitive_and_keep_rephrasings_on_one_side():
    # a~b and b~c above the threshold (a and c are not): one cluster; d alone
    emb = unit([[1, 0, 0], [0.92, 0.39, 0], [0.7, 0.71, 0], [0, 0, 1]])
    assert (emb[0] @ emb[2]) < 0.85 < min(emb[0] @ emb[1], emb[1] @ emb[2])
    labels = cluster_by_similarity(emb, 0.85)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    keys = prompt_cluster_keys(["b", "a", "c", "d"], emb[[1, 0, 2, 3]], 0.85)
    assert keys == ["a", "a", "a", "d"]


def test_prompt_split_never_puts_one_prompt_on_both_sides():
    rng = np.random.default_rng(1)
    prompts = [f"Rewrite this as prompt {i}." for i in range(40)]
    df = pd.DataFrame({"id": [f"ex{i}" for i in range(400)],
                       "rewrite_prompt": [prompts[i] for i in rng.integers(0, 40, 400)]})
    mask = eval_mask(df, 0.2, "prompt", seed=3)
    train, evals = set(df.rewrite_prompt[~mask]), set(df.rewrite_prompt[mask])
    assert train and evals and not train & evals
    # by id the same data does leak prompts: the prompt split is what prevents it
    by_id = eval_mask(df, 0.2, "id", seed=3)
    assert set(df.rewrite_prompt[~by_id]) & set(df.rewrite_prompt[by_id])


# ---------------------------------------------------------------- negatives


def test_negatives_respect_the_ceiling_and_rank_hard_ones():
    rng = np.random.default_rng(0)
    bank = unit(rng.normal(size=(200, 16)))
    queries = np.concatenate([bank[:3], unit(rng.normal(size=(2, 16)))])  # 3 queries have an exact copy in the bank
    picks = select_negatives(queries, bank, n_hard=5, n_random=6, ceiling=0.8, seeds=[11, 12, 13, 14, 15])
    for q, (hard, rand) in zip(queries, picks):
        sims = bank @ q
        allowed = np.flatnonzero(sims < 0.8)
        assert len(hard) == 5 and len(rand) == 6 and not set(hard) & set(rand)
        assert np.all(sims[np.concatenate([hard, rand])] < 0.8)
        assert list(hard) == list(allowed[np.argsort(-sims[allowed], kind="stable")][:5])
    assert all(0 not in h and 0 not in r for h, r in picks[:1])  # the query's own copy is never a negative
    # a row's draw depends on its seed, not on the other rows in the call
    alone = select_negatives(queries[3:4], bank, 5, 6, 0.8, seeds=[14])
    assert np.array_equal(alone[0][1], picks[3][1])
    assert select_negatives(queries[:1], bank, 0, 0, 0.8)[0][0].size == 0
