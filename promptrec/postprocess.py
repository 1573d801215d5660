"""Post-processing of the policy's raw generations into submission prompts: pure string functions.

Each step is switchable in :class:`PostprocessConfig`. :func:`clean_prediction` applies the cleaning steps and returns
``""`` when nothing usable is left; :func:`postprocess` then falls back to the mean prompt (so a submission never holds
a blank or NaN prompt) and optionally appends it, as the competition's top solutions did: a mean prompt after the
prediction lifts the sharpened cosine of a poor guess and costs a good one little.

Order of the steps on ``"Sure! Here is the instruction:\\n1. \\"Rewrite this as a poem.\\" This makes it rhyme."``:
first usable line (``first_line``) → list marker (``strip_list_markers``) → label ``"Here is the instruction:"``
(``strip_labels``) → quotes and markdown (``strip_quotes``) → trailing chatter (``strip_chatter``) → sentences
(``max_sentences``) → words (``max_words``) → ``"Rewrite this as a poem."``. A result that is a verbatim copy of
the row's texts (``drop_copies``, a small model's usual failure), a refusal, an echo of the task or degenerate
repetition counts as unusable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from promptrec.tables import DataError
from promptrec.templates import RECOVERY_INSTRUCTION

DEFAULT_MEAN_PROMPT = "Improve the text to this."

_WORDS = "instruction|prompt|answer|output|response|task|request"
# A label the model puts before its answer: "The prompt was:", "Instruction:", "Sure, here is the recovered
# instruction:", "**Answer:**". Bare nouns need the colon, so "Output this as a poem" is left alone.
_LABEL = re.compile(
    r"^(?:(?:sure|certainly|okay|ok|of course|great)\b[\s,!.]*)?(?:here(?:'s| is| are)\s+)?(?:the\s+|an?\s+)?"
    r"(?:(?:original|recovered|likely|probable|exact|given|rewrite|rewriting|llm's|llm)\s+)*"
    rf"(?:{_WORDS})s?\b(?:\s+(?:was|is|would be|used|given|in one sentence))*(?:\s*:|\s+[-–—])\s*",
    re.IGNORECASE,
)
# "The instruction was to rewrite it as a poem." → "rewrite it as a poem." (then capitalised).
_DESCRIBED = re.compile(rf"^(?:the\s+)?(?:original\s+)?(?:{_WORDS})\s+(?:was|is)\s+to\s+", re.IGNORECASE)
# The model echoing its input instead of answering.
_ECHO = re.compile(r"^(?:the\s+)?(?:original|rewritten)\s+text\b", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•+>]+|#+|\d{1,2}[.)]|\(?[a-zA-Z][.)])\s+")
_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}
_OPENERS = {close: open_ for open_, close in _PAIRS.items()}
_MARKDOWN = re.compile(r"\*\*|__")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[\"'“‘(A-Z])")
# Sentences that comment on the answer rather than give it.
_CHATTER = re.compile(
    r"^(?:this|that|these|it|note|i\b|i'm|i've|hope|let me|here|please note|the (?:rewritten|original|new) text|"
    r"the (?:instruction|prompt|llm|model)|in this|such|overall|explanation|reason)",
    re.IGNORECASE,
)
_REFUSAL = re.compile(r"^(?:i'?m sorry|sorry|i cannot|i can'?t|i am unable|as an ai)", re.IGNORECASE)


@dataclass
class PostprocessConfig:
    """How raw generations become submission prompts (every step can be switched off)."""

    mean_prompt: str = field(default=DEFAULT_MEAN_PROMPT, metadata={
        "help": "Fallback for empty or unusable predictions (and what --append_mean_prompt appends): a string, or a "
                "JSON file with a 'mean_prompt' key as reward/mean_prompt.py writes it."})
    append_mean_prompt: bool = field(default=False, metadata={
        "help": "Append the mean prompt to every prediction ('<prediction> <mean prompt>'), as top solutions did."})
    first_line: bool = field(default=True, metadata={
        "help": "Keep only the first line that holds an answer (skipping label-only lines and echoed input)."})
    strip_labels: bool = field(default=True, metadata={
        "help": "Strip leading labels: 'The prompt was:', 'Instruction:', 'Sure, here is the instruction:', "
                "and turn 'The instruction was to X' into 'X'."})
    strip_quotes: bool = field(default=True, metadata={"help": "Strip wrapping quotes and markdown emphasis."})
    strip_list_markers: bool = field(default=True, metadata={"help": "Strip a leading '1.', '-', '*', '#' marker."})
    strip_chatter: bool = field(default=True, metadata={
        "help": "Drop trailing sentences that comment on the answer ('This prompt asks…', 'Note: …', 'I hope…')."})
    max_sentences: int = field(default=1, metadata={"help": "Keep at most this many sentences (0: all)."})
    max_words: int = field(default=50, metadata={"help": "Cut the prediction to this many words (0: no cap)."})
    min_letters: int = field(default=3, metadata={
        "help": "A prediction with fewer letters is unusable (→ mean prompt); so are refusals, echoes of the task "
                "and degenerate repetition."})
    drop_copies: bool = field(default=True, metadata={
        "help": "A prediction of 4+ words found verbatim in the row's original or rewritten text is a copy of the "
                "input, not a prompt (→ mean prompt). Needs the texts (predict passes them)."})

    def __post_init__(self):
        if not isinstance(self.mean_prompt, str) or not self.mean_prompt.strip():
            raise ValueError("mean_prompt must be a non-empty string (the fallback for unusable predictions)")
        if self.max_sentences < 0 or self.max_words < 0 or self.min_letters < 0:
            raise ValueError("max_sentences, max_words and min_letters must be >= 0")


def as_text(value) -> str:
    """``None``/NaN → ``""``; anything else → its string with whitespace runs kept (lines matter to ``first_line``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("\r\n", "\n").replace("\r", "\n")


def text_lines(value) -> list[str]:
    return [line for line in as_text(value).split("\n") if line.strip()]


def squash(text: str) -> str:
    """Collapse every whitespace run (newlines included) to one space and trim."""
    return " ".join(text.split())


def strip_list_marker(text: str) -> str:
    """``"1. Rewrite it."``, ``"- Rewrite it."``, ``"## Rewrite it."`` → ``"Rewrite it."``."""
    return _LIST_MARKER.sub("", text, count=1).strip()


def strip_label(text: str) -> str:
    """Remove a leading answer label (repeatedly: ``"Answer: Prompt: X"``); ``"The prompt was to x"`` → ``"X"``."""
    text = _MARKDOWN.sub("", text).strip() if text.startswith(("**", "__")) else text.strip()
    while True:
        new = _LABEL.sub("", text, count=1).strip()
        described = _DESCRIBED.sub("", new, count=1)
        if described != new:
            new = described[:1].upper() + described[1:]
        if new == text:
            return text
        text = new


def strip_quotes(text: str) -> str:
    """``'"Rewrite it." This asks…'`` → ``"Rewrite it."`` (a leading quoted span wins); wrapping quotes and
    markdown emphasis go."""
    text = _MARKDOWN.sub("", text).strip()
    if text and text[0] in _PAIRS:
        close = text.find(_PAIRS[text[0]], 1)
        if close > 1 and len(text[1:close].split()) >= 2:
            return text[1:close].strip()
    return _strip_unmatched_quotes(text)


def _strip_unmatched_quotes(text: str) -> str:
    """Drop wrapping quote pairs and dangling quotes at either end; a quote closed inside the text stays."""
    while len(text) >= 2 and text[0] in _PAIRS and text[-1] == _PAIRS[text[0]]:
        text = text[1:-1].strip()
    if text and text[0] in _PAIRS and _dangling(text, text[0], _PAIRS[text[0]]):
        text = text[1:].strip()
    if text and text[-1] in _OPENERS and _dangling(text, text[-1], _OPENERS[text[-1]]):
        text = text[:-1].strip()
    return text


def _dangling(text: str, quote: str, partner: str) -> bool:
    return text.count(partner) == (1 if partner == quote else 0)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def strip_chatter(text: str) -> str:
    """Drop the sentences from the first one that comments on the answer (the first sentence always stays)."""
    sentences = split_sentences(text)
    for i, sentence in enumerate(sentences[1:], start=1):
        if _CHATTER.match(sentence):
            return " ".join(sentences[:i])
    return " ".join(sentences)


def keep_sentences(text: str, max_sentences: int) -> str:
    return " ".join(split_sentences(text)[:max_sentences]) if max_sentences else text


def cap_words(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words]) if max_words and len(words) > max_words else text


def _plain(text: str) -> str:
    return re.sub(r"^(?:the|an|a)\s+", "", squash(text).lower())


def is_echo(text: str) -> bool:
    """The model repeating its input ("Original text: …") or the task's own instruction ("The LLM was given…")."""
    head = _plain(text)[:48]
    return bool(_ECHO.match(text.strip())) or (len(head) >= 24 and head in _plain(RECOVERY_INSTRUCTION))


def _clean_line(line: str, config: PostprocessConfig) -> str:
    if config.strip_list_markers:
        line = strip_list_marker(line)
    if config.strip_labels:
        line = strip_label(line)
    if config.strip_quotes:
        line = strip_quotes(line)
    if config.strip_list_markers:  # a marker inside quotes or after a label: '"1. Rewrite…"'
        line = strip_list_marker(line)
    return squash(line)


def is_copy(text: str, sources: Iterable[str]) -> bool:
    """``text`` (4+ words) appears verbatim, case and spacing aside, in one of ``sources`` (the row's texts)."""
    plain = squash(text).lower().rstrip(".!?")
    return len(plain.split()) >= 4 and any(plain in squash(as_text(s)).lower() for s in sources)


def unusable_reason(text: str, sources: Iterable[str] = (), config: PostprocessConfig | None = None) -> str | None:
    """Why a cleaned answer is not a prompt, or None when it is one: the one rule behind inference's mean-prompt
    fallback, the GRPO reward's floor and the policy samples that may become DPO candidates.

    Reasons: ``"too few letters"`` (under ``config.min_letters``, blank included), ``"refusal"``, ``"echo"`` (of the
    input or of the task's instruction), ``"repetition"`` (8+ words, under 30% distinct) and, with
    ``config.drop_copies``, ``"copy of the input"`` (4+ words found verbatim in one of ``sources``: the row's original
    and rewritten texts).
    """
    config = config or PostprocessConfig()
    if sum(ch.isalpha() for ch in text) < max(config.min_letters, 1):
        return "too few letters"
    if _REFUSAL.match(text):
        return "refusal"
    if is_echo(text):
        return "echo"
    words = text.lower().split()
    if len(words) >= 8 and len(set(words)) / len(words) < 0.3:
        return "repetition"
    if config.drop_copies and is_copy(text, sources):
        return "copy of the input"
    return None


def clean_prediction(raw, config: PostprocessConfig | None = None, sources: Iterable[str] = ()) -> str:
    """The cleaned prediction, or ``""`` when the raw generation holds nothing usable (:func:`unusable_reason`).
    ``sources`` are the row's original and rewritten texts, for ``drop_copies``: pass them wherever the row is known.
    """
    config = config or PostprocessConfig()
    if config.first_line:
        text = ""
        for line in text_lines(raw):
            if is_echo(line):  # what follows is a copy of the input, not an answer
                break
            if line := _clean_line(line, config):
                text = line
                break
    else:
        text = _clean_line(squash(as_text(raw)), config)
    if config.strip_chatter:
        text = strip_chatter(text)
    text = cap_words(keep_sentences(text, config.max_sentences), config.max_words)
    if config.strip_quotes:
        text = strip_quotes(text)
    text = squash(text)
    return "" if unusable_reason(text, sources, config) else text


def finalize(text: str, config: PostprocessConfig | None = None) -> str:
    """The submission prompt for an already cleaned prediction (``""`` when unusable): the mean prompt in its place
    when empty, and appended when ``append_mean_prompt``; never blank. MBR selection cleans its candidates first,
    picks, then finalizes the pick."""
    config = config or PostprocessConfig()
    mean = squash(config.mean_prompt)
    text = squash(text) or mean
    if config.append_mean_prompt and text != mean:
        text = f"{text} {mean}"
    return text


def postprocess(raw, config: PostprocessConfig | None = None, sources: Iterable[str] = ()) -> str:
    """The submission prompt for one raw generation: cleaned, else the mean prompt; never blank."""
    config = config or PostprocessConfig()
    return finalize(clean_prediction(raw, config, sources), config)


def resolve_mean_prompt(value: str) -> str:
    """A mean prompt given as the string itself or as a JSON file with a ``mean_prompt`` key."""
    if not value.strip().endswith(".json"):
        return squash(value)
    path = Path(value.strip())
    if not path.is_file():
        raise DataError(f"{path}: no such mean-prompt JSON file")
    try:
        prompt = json.loads(path.read_text(encoding="utf-8")).get("mean_prompt")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a JSON object ({type(err).__name__})") from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{path}: no non-empty 'mean_prompt' string in it")
    return squash(prompt)
