"""promptrec.drift (opening-word measures, the pair-level drift controls) and their flags in build_pairs.py."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from stage_helpers import load_script

from promptrec.cli import parse_args
from promptrec.drift import (
    cap_opening_share,
    drift_controls,
    drift_summary,
    opening_distribution,
    opening_entropy,
    opening_word,
    shares_prefix,
    top_opening,
)

build_pairs_py = load_script("data_generation/build_pairs.py")


def test_opening_word_is_the_first_word_lower_cased_without_punctuation():
    assert opening_word("Rewrite this as a poem.") == "rewrite"
    assert opening_word('  "Re-write," he said') == "rewrite"
    assert opening_word("- **Change** the tone") == "change"
    assert opening_word("Don't shout") == "dont"
    assert opening_word("") == opening_word("   ") == opening_word(" ... !") == opening_word(None) == ""


def test_distribution_entropy_and_top_opening():
    dist = opening_distribution(["Make it short", "make it long", "Turn it", "Change it", ""])
    assert dist == {"make": 0.4, "": 0.2, "change": 0.2, "turn": 0.2}  # largest first, ties alphabetical
    assert list(dist) == ["make", "", "change", "turn"]
    assert top_opening(dist) == ("make", 0.4)
    assert opening_entropy(dist) == pytest.approx(-(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2)))  # nats
    assert opening_entropy({"make": 1.0}) == 0.0
    assert opening_distribution([]) == {} and top_opening({}) == ("", 0.0) and opening_entropy({}) == 0.0
    assert top_opening({"b": 0.5, "a": 0.5}) == ("a", 0.5)


def test_drift_summary_flags_a_top_share_above_twice_the_reference_top_share():
    reference = ["Rewrite a"] * 3 + ["Make b"] * 3 + ["Turn c"] * 2 + ["Change d"] * 2  # top share 0.3
    drifted = ["Change x"] * 7 + ["Rewrite y"] * 3  # change: 0.7 > 2 × 0.3
    summary = drift_summary(drifted, reference)
    assert summary["top_word"] == "change" and summary["top_share"] == 0.7 and summary["n"] == 10
    assert summary["top5"] == {"change": 0.7, "rewrite": 0.3}
    assert summary["reference"]["top_share"] == 0.3 and summary["reference"]["top_word"] == "make"
    assert summary["reference_share_of_top_word"] == 0.2
    assert summary["doubled"] is True
    # exactly twice is not "exceeds twice"; a word whose own share doubled but stays under 2 × the top share is not
    assert drift_summary(["Change x"] * 6 + ["Make y"] * 4, reference)["doubled"] is False
    assert drift_summary(["Turn x"] * 5 + ["Make y"] * 5, reference)["doubled"] is False  # turn 0.2 → 0.5
    assert "doubled" not in drift_summary(drifted) and drift_summary([])["top_share"] == 0.0
    with pytest.raises(ValueError, match="reference_texts is empty"):
        drift_summary(drifted, [])


def test_shares_prefix_on_hand_made_token_lists():
    assert shares_prefix([1, 2, 3], [1, 2, 4], 2) and not shares_prefix([1, 2, 3], [1, 2, 4], 3)
    assert not shares_prefix([1, 2], [1, 2, 3], 3)  # a side shorter than k never shares k tokens
    assert not shares_prefix(["Make", " it"], ["make", " it"], 1)  # tokens compare as given (case kept)
    assert not shares_prefix([1], [1], 0)  # 0 = off
    with pytest.raises(ValueError, match="k must be >= 0"):
        shares_prefix([1], [1], -1)


def test_opening_cap_keeps_the_largest_margins_within_the_cap():
    openings = ["change"] * 10 + ["make", "turn"]
    margins = [0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.4, 0.6, 0.7, 0.15, 0.05, 0.05]
    keep = cap_opening_share(openings, margins, 0.5)
    assert keep == [1, 5, 10, 11]  # the two largest "change" margins and both others: 2 of 4 = 0.5
    kept = [openings[i] for i in keep]
    assert max(kept.count(w) for w in set(kept)) / len(kept) <= 0.5
    assert cap_opening_share(openings, margins, 1.0) == list(range(12))  # 1 = off
    assert cap_opening_share(["a"] * 3, [0.5, 0.5, 0.5], 0.5) == []  # one word only: nothing can satisfy the cap
    three = cap_opening_share(["a", "a", "b", "b", "c"], [1, 2, 1, 2, 1], 0.34)
    assert three == [1, 3, 4]  # ties between words: the alphabetically first is cut first, margins decide within
    with pytest.raises(ValueError, match=r"max_share must be in \(0, 1\]"):
        cap_opening_share(openings, margins, 0)


def pair(chosen: str, rejected: str, margin: float) -> dict:
    return {"chosen": chosen, "rejected": rejected, "score_chosen": 0.5 + margin, "score_rejected": 0.5}


def test_drift_controls_with_the_rendering_tokenizer(embedded_tokenizer):
    def tokenize(texts):
        return embedded_tokenizer(texts, add_special_tokens=False)["input_ids"]

    pairs = [pair("Make it formal", "Make it short", 0.3), pair("Make it formal", "make it short", 0.2),
             pair("Change the tone", "Make it sad", 0.4), pair("Change the style", "Turn it", 0.1),
             pair("Change the voice", "Turn it", 0.2)]
    kept, dropped = drift_controls(pairs, tokenize, shared_prefix_tokens=2)
    assert kept == pairs[1:] and dropped == {"shared_prefix": 1, "opening_share": 0, "opening_share_words": {}}
    kept, dropped = drift_controls(pairs, tokenize, shared_prefix_tokens=2, max_opening_share=0.5)
    assert kept == [pairs[1], pairs[2]]  # "change": 3 of 4, then 2 of 3 (the 0.1, then the 0.2 margin go), 1 of 2
    assert dropped == {"shared_prefix": 1, "opening_share": 2, "opening_share_words": {"change": 2}}
    assert drift_controls(pairs) == (pairs, {"shared_prefix": 0, "opening_share": 0, "opening_share_words": {}})
    with pytest.raises(ValueError, match="shared_prefix_tokens must be >= 0"):
        drift_controls(pairs, tokenize, shared_prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"max_opening_share must be in \(0, 1\]"):
        drift_controls(pairs, tokenize, max_opening_share=1.5)


@pytest.mark.parametrize("flag", [["--drop_shared_prefix_tokens", "-1"], ["--max_opening_share", "0"],
                                  ["--max_opening_share", "1.2"]])
def test_bad_drift_flags_are_one_line_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_pairs_py.PairArguments, args=flag)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {flag[0].removeprefix('--')} must be")


def test_build_pairs_applies_the_drift_controls_per_side_and_records_them(tmp_path, embedded_tokenizer):
    """build_pairs.py's main on hand-made candidates (scored by MiniLM): every chosen answer obeys the cap, no pair
    shares its first 2 tokens, and summary.json says what was dropped and how the chosen answers open."""
    truths = ["Change the tone to formal", "Change it into a poem", "Change the style to pirate speak",
              "Make it shorter", "Turn it into a list", "Change the voice to passive"]
    triplets = pd.DataFrame({"id": [f"t{i}" for i in range(6)], "original_text": ["The cat sat."] * 6,
                             "rewrite_prompt": truths, "rewritten_text": ["The feline was seated."] * 6})
    triplets.to_parquet(tmp_path / "triplets.parquet")
    rows = []
    for i, truth in enumerate(truths):
        rows += [(f"t{i}", truth, "true"), (f"t{i}", " ".join(truth.split()[:2]) + " text", "policy"),
                 (f"t{i}", "Describe a banana", "policy")]  # the true prompt and the 2nd share 2 tokens
    pd.DataFrame(rows, columns=["id", "candidate", "source"]).to_parquet(tmp_path / "candidates.parquet")

    def run(out, *flags):
        (args,) = parse_args(build_pairs_py.PairArguments, args=[
            "--candidates", str(tmp_path / "candidates.parquet"), "--output_dir", str(tmp_path / out),
            "--scorer", "embedded", "--strategy", "all_pairs", "--min_margin", "0", "--max_pairs_per_example", "4",
            "--eval_fraction", "0", "--max_text_tokens", "32", *flags])
        return build_pairs_py.main(args)

    plain = run("plain")
    assert plain["drift_controls"]["dropped"]["train"] == {"shared_prefix": 0, "opening_share": 0,
                                                           "opening_share_words": {}}
    summary = run("controlled", "--drop_shared_prefix_tokens", "2", "--max_opening_share", "0.5")
    train = pd.read_json(tmp_path / "controlled" / "train.jsonl", lines=True, dtype=False)
    chosen, rejected = ([m[0]["content"] for m in train[side]] for side in ("chosen", "rejected"))
    openings = pd.Series([opening_word(c) for c in chosen]).value_counts(normalize=True)
    assert len(train) and openings.max() <= 0.5
    ids = [embedded_tokenizer(t, add_special_tokens=False)["input_ids"] for t in chosen + rejected]
    assert not any(shares_prefix(ids[i], ids[i + len(chosen)], 2) for i in range(len(chosen)))

    dropped = summary["drift_controls"]["dropped"]["train"]
    assert dropped["shared_prefix"] > 0 and dropped["opening_share"] > 0
    assert len(train) == plain["train_pairs"] - dropped["shared_prefix"] - dropped["opening_share"]
    recorded = json.loads((tmp_path / "controlled" / "summary.json").read_text())["drift_controls"]
    assert recorded["drop_shared_prefix_tokens"] == 2 and recorded["max_opening_share"] == 0.5
    assert recorded["chosen_openings"]["train"] == drift_summary(chosen)
    assert recorded["chosen_openings"]["eval"]["n"] == 0
    assert plain["drift_controls"]["chosen_openings"]["train"]["top_word"] == "change"
