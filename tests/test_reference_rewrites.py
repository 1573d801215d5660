"""The bundled reference rewrites: they load as triplets, cover every category and genre, and are real rewrites."""

from __future__ import annotations

import re

from promptrec.corpus import prompt_bank, seed_texts
from promptrec.triplets import read_triplets


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_reference_rewrites_load_through_the_triplets_reader():
    df, counts = read_triplets("reference")
    assert counts["read"] == counts["kept"] == len(df) >= 500 and df["id"].is_unique
    bank, seeds = prompt_bank(), seed_texts()
    assert set(df["prompt_category"]) == set(bank["prompt_category"])  # every category
    assert set(df["genre"]) == set(seeds["genre"])  # every genre
    assert set(df["rewrite_prompt"]) <= set(bank["rewrite_prompt"]) and set(df["text_id"]) <= set(seeds["text_id"])
    originals = dict(zip(seeds["text_id"], seeds["original_text"]))
    assert (df["original_text"] == df["text_id"].map(originals)).all()


def test_reference_rewrites_follow_their_prompts_not_copy_the_text():
    df, _ = read_triplets("reference")
    assert not (df["rewritten_text"].str.strip() == df["original_text"].str.strip()).any()
    novel = [len(_words(r) - _words(o)) / max(1, len(_words(r))) for o, r in zip(df.original_text, df.rewritten_text)]
    # share of a rewrite's distinct words not in its original: real Gemma-7b-it 0.61-0.73, SmolLM2's copies 0.28
    assert sum(novel) / len(novel) >= 0.45 and min(novel) > 0.2
    assert df["rewritten_text"].is_unique
