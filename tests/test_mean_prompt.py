"""Mean-prompt search: the pure beam search on a toy embedding, and reward/mean_prompt.py on real prompts."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from promptrec.mean_prompt import beam_search, build_vocabulary, expand, mean_scs
from promptrec.scoring import ScorerArguments

REPO = Path(__file__).resolve().parents[1]
BASELINE = "Improve the text to this."


def toy_encode(texts: list[str]) -> np.ndarray:
    """Bag of words: the normalised sum of fixed random vectors, one per lower-cased word."""
    def word(w):
        return np.random.default_rng(int(hashlib.md5(w.lower().encode()).hexdigest()[:8], 16)).normal(size=16)

    vecs = np.stack([sum((word(w) for w in t.split()), np.zeros(16)) + 1e-9 for t in texts])
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_vocabulary_and_expansions():
    prompts = ["Rewrite this as a poem", "Rewrite it as a song", "Make this a poem", "poem poem"]
    assert build_vocabulary(prompts, size=3) == ["a", "poem", "Rewrite"]  # counted once per prompt, ties a→z
    assert build_vocabulary(prompts, size=10, min_count=3) == ["a", "poem"]
    assert set(expand("make it", ["x"])) == {"x make it", "make x it", "make it x"}
    assert expand("make it", ["x"], insertions=False) == ["make it x"]
    assert expand("", ["x", "y"]) == ["x", "y"]


def test_beam_search_never_lowers_its_objective_and_keeps_the_budget():
    rng = np.random.default_rng(0)
    words = ["rewrite", "make", "text", "poem", "formal", "story", "letter", "funny", "short", "simple", "child"]
    targets_text = [" ".join(rng.choice(words, size=4)) for _ in range(60)]
    targets = toy_encode(targets_text)
    result = beam_search(targets, toy_encode, build_vocabulary(targets_text, 12), beam_width=3, max_steps=6,
                         max_tokens=5, max_candidates=40, seed=1)
    best = [h["best_score"] for h in result.history]
    assert len(best) >= 2 and all(b >= a for a, b in itertools.pairwise(best))
    assert best[-1] > best[0]
    assert len(result.prompt.split()) <= 5
    assert result.score == pytest.approx(best[-1])
    assert result.score == pytest.approx(mean_scs(toy_encode([result.prompt]), targets)[0])
    again = beam_search(targets, toy_encode, build_vocabulary(targets_text, 12), beam_width=3, max_steps=6,
                        max_tokens=5, max_candidates=40, seed=1)
    assert again.prompt == result.prompt  # seeded


def test_beam_search_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="token budget"):
        beam_search(toy_encode(["a b"]), toy_encode, ["a"], init="a b c", max_tokens=2, max_steps=1)
    with pytest.raises(ValueError, match="no candidate fits the token budget"):
        beam_search(toy_encode(["a b"]), toy_encode, ["abc", "de"], max_tokens=1, count_tokens=len, max_steps=3)


def test_mean_prompt_beats_the_constant_on_held_out_prompts(shared_prompts, tmp_path):
    """A small search (MiniLM, 150 train prompts) must beat "Improve the text to this." on 150 held-out prompts."""
    shared_prompts.sample(300, random_state=0)[["prompt"]].to_csv(tmp_path / "prompts.csv", index=False)
    spec = importlib.util.spec_from_file_location("reward_mean_prompt", REPO / "reward" / "mean_prompt.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while the class is built
    spec.loader.exec_module(script)
    args = script.MeanPromptArguments(
        prompts=[str(tmp_path / "prompts.csv")], prompt_column="prompt", max_prompts=300, val_fraction=0.5,
        vocab_size=30, beam_width=2, max_steps=3, max_candidates=60,
        output=str(tmp_path / "mean_prompt.json"))
    out = script.main(args, ScorerArguments(scorer="embedded"))
    saved = json.loads((tmp_path / "mean_prompt.json").read_text())
    assert saved["mean_prompt"] == out["mean_prompt"] and saved["n_train"] == saved["n_val"] == 150
    assert saved["scorer"]["model"].startswith("all-MiniLM") and saved["config"]["MeanPromptArguments"]["seed"] == 42
    assert saved["baseline"]["prompt"] == BASELINE
    assert saved["val_scs"] > saved["baseline"]["val_scs"]
    assert saved["n_tokens"] <= args.max_tokens
