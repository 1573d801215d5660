"""Post-processing on hand-made generations: each step, its switch, and the never-blank guarantee."""

from __future__ import annotations

import math

import pytest

from promptrec.postprocess import PostprocessConfig, clean_prediction, postprocess, unusable_reason

MEAN = "Improve the text to this."


@pytest.mark.parametrize("raw, expected", [
    ("Rewrite this as a pirate would say it.", "Rewrite this as a pirate would say it."),
    ("The prompt was: Make it more formal.", "Make it more formal."),
    ("Instruction: Rewrite the email as a sonnet.", "Rewrite the email as a sonnet."),
    ("**Answer:** Convert this into a haiku.", "Convert this into a haiku."),
    ("Sure! Here is the recovered instruction:\n\nTurn this into a news headline.",
     "Turn this into a news headline."),
    ("The instruction was to rewrite the text as a limerick.", "Rewrite the text as a limerick."),
    ('"Explain this to a five-year-old."', "Explain this to a five-year-old."),
    ('The prompt was: "Make it sound like Shakespeare." This prompt asks for old English.',
     "Make it sound like Shakespeare."),
    ("1. Rewrite this recipe as a numbered list.", "Rewrite this recipe as a numbered list."),
    ("- Make it shorter", "Make it shorter"),
    ("Rewrite it as a poem. I hope this helps! Let me know.", "Rewrite it as a poem."),
    ("Rewrite it as a rap song.\n\nExplanation: the text rhymes.", "Rewrite it as a rap song."),
    # Not labels: imperative verbs that happen to be label words stay.
    ("Output this as a shopping list.", "Output this as a shopping list."),
    ('Rewrite it in the style of "Hamlet"', 'Rewrite it in the style of "Hamlet"'),  # a closed quote stays
    ("Prompt-engineer this text into a tweet.", "Prompt-engineer this text into a tweet."),
])
def test_clean_keeps_the_prompt_sentence(raw, expected):
    assert postprocess(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "   \n\n ", None, math.nan, '" "', "...", "1.",
    "I'm sorry, but I can't determine the instruction.",
    "The original text:\nThe meeting moved to Tuesday.",  # echoing the input
    "An LLM was given an instruction and an original text, and it rewrote the text.",  # echoing the task
    "Anya: Anya: Anya: Anya: Anya: Anya: Anya: Anya: Anya: Anya:",  # degenerate repetition
])
def test_unusable_falls_back_to_the_mean_prompt(raw):
    assert clean_prediction(raw) == ""
    assert postprocess(raw, PostprocessConfig(mean_prompt="  Make  it better. ")) == "Make it better."


def test_echo_ends_the_answer_even_when_a_line_follows():
    assert postprocess("Original text: The river flooded.\nThe valley drowned.") == MEAN
    assert postprocess("Rewrite it as a poem.\nOriginal text: The river flooded.") == "Rewrite it as a poem."


def test_each_step_can_be_switched_off():
    raw = 'Instruction: "Rewrite it as a poem." Note: it rhymes.\nSecond line.'
    assert postprocess(raw) == "Rewrite it as a poem."
    assert postprocess(raw, PostprocessConfig(strip_labels=False)) == 'Instruction: "Rewrite it as a poem."'
    assert postprocess(raw, PostprocessConfig(strip_quotes=False)) == '"Rewrite it as a poem."'
    raw = "Instruction: Rewrite it as a poem. Note: it rhymes.\nSecond line."
    assert postprocess(raw, PostprocessConfig(strip_chatter=False, max_sentences=0)) == (
        "Rewrite it as a poem. Note: it rhymes.")
    assert postprocess(raw, PostprocessConfig(first_line=False, max_sentences=0)) == "Rewrite it as a poem."
    assert (postprocess(raw, PostprocessConfig(first_line=False, strip_chatter=False, max_sentences=0))
            == "Rewrite it as a poem. Note: it rhymes. Second line.")
    assert postprocess("2) Make it formal.", PostprocessConfig(strip_list_markers=False)) == "2) Make it formal."


def test_sentence_and_word_caps():
    raw = "Rewrite it as a poem. Make every line rhyme. Use ten lines."
    assert postprocess(raw) == "Rewrite it as a poem."
    assert postprocess(raw, PostprocessConfig(max_sentences=2)) == "Rewrite it as a poem. Make every line rhyme."
    assert postprocess(raw, PostprocessConfig(max_sentences=0, max_words=6)) == "Rewrite it as a poem. Make"
    long = " ".join(["word"] * 5 + [f"w{i}" for i in range(100)])
    assert len(postprocess(long, PostprocessConfig(max_words=50)).split()) == 50


def test_append_mean_prompt():
    config = PostprocessConfig(append_mean_prompt=True, mean_prompt=MEAN)
    assert postprocess("Instruction: Make it a haiku.", config) == f"Make it a haiku. {MEAN}"
    assert postprocess("", config) == MEAN  # the fallback is not doubled


def test_never_blank_and_order_kept():
    raws = ["Make it a haiku.", None, "", math.nan, "Sure, here is the instruction:", "Turn it into a tweet."]
    out = [postprocess(raw) for raw in raws]
    assert out == ["Make it a haiku.", MEAN, MEAN, MEAN, MEAN, "Turn it into a tweet."]
    assert all(isinstance(p, str) and p.strip() for p in out)


@pytest.mark.parametrize("kwargs", [{"mean_prompt": " "}, {"max_words": -1}, {"max_sentences": -2}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PostprocessConfig(**kwargs)


def test_a_copy_of_the_input_is_not_a_prompt():
    texts = ("The meeting moved to Tuesday at 3pm.", "Arr, the gatherin' be moved to Tuesday at three bells!")
    assert postprocess("The gatherin' be moved to  Tuesday.", sources=texts) == MEAN
    assert postprocess("Rewrite this as a pirate would say it.", sources=texts) == (
        "Rewrite this as a pirate would say it.")
    assert postprocess("Tuesday.", sources=texts) == "Tuesday."  # too short to call a copy
    assert postprocess("The gatherin' be moved to Tuesday.", PostprocessConfig(drop_copies=False), texts) == (
        "The gatherin' be moved to Tuesday.")
    assert [postprocess(p, sources=texts) for p in ("The meeting moved to Tuesday", "Make it formal.")] == [
        MEAN, "Make it formal."]


TEXTS = ("The river flooded the valley after three days of rain.", "Three days of rain, the river rose high.")


@pytest.mark.parametrize("answer, reason", [
    ("Rewrite this as a short poem.", None),
    ("Rewrite the valley text as a poem.", None),  # shares words with the input, but is no copy of it
    ("", "too few letters"),
    ("1.", "too few letters"),
    ("I'm sorry, I cannot help with that.", "refusal"),
    ("Original text: the river flooded.", "echo"),
    ("An LLM was given an instruction and an original text, and it rewrote the text.", "echo"),
    ("poem poem poem poem poem poem poem poem poem", "repetition"),
    ("the river flooded the valley", "copy of the input"),  # of the original text
    ("Three days of rain, the river rose high.", "copy of the input"),  # of the rewritten text, verbatim
])
def test_unusable_reason_on_hand_made_answers(answer, reason):
    assert unusable_reason(answer, TEXTS) == reason
    assert (clean_prediction(answer, sources=TEXTS) == "") == (reason is not None)  # the rule clean_prediction uses


def test_unusable_reason_switches():
    assert unusable_reason("the river flooded the valley") is None  # no texts given: nothing to copy
    assert unusable_reason("the river flooded the valley", TEXTS, PostprocessConfig(drop_copies=False)) is None
    assert unusable_reason("Do it.", TEXTS, PostprocessConfig(min_letters=5)) == "too few letters"
