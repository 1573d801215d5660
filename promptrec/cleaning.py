"""Cleaning of generated rewrites: each rule is a pure function and can be switched off.

Raw Gemma output often opens with a chat preamble ("Sure, here is the rewritten text:"), sometimes
refuses, and sometimes echoes the original. The rules, in order: ``strip_preamble`` (edits the text),
then ``drop_refusal``, ``drop_empty``, ``drop_identical`` (drop the row).
"""

from __future__ import annotations

import re

from promptrec.corpus import normalize

RULES = ("strip_preamble", "drop_refusal", "drop_empty", "drop_identical")

_PREAMBLE = re.compile(
    r"^\s*(?:\*\*)?(?:(?:sure|certainly|okay|ok|of course|absolutely|here you go)\b[^\n]{0,20}?[,!.:]?\s*)?"
    r"(?:here(?:'s| is| are)|below is|this is)\b[^\n]{0,160}?:\s*(?:\*\*)?\s*\n+",
    re.IGNORECASE,
)
_SHORT_OPENER = re.compile(r"^\s*(?:sure|certainly|okay|of course|absolutely)\b[^\n]{0,40}[!.:]\s*\n+", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry, (?:but )?i|i cannot|i can'?t|i am unable|i'?m unable|as an ai\b|"
    r"i (?:will|would) not be able|unfortunately,? i (?:cannot|can'?t|am unable))",
    re.IGNORECASE,
)


def strip_preamble(text: str) -> str:
    """Remove an opening line such as "Sure, here is the rewritten text:" (and a bare "Sure!" line)."""
    out = _PREAMBLE.sub("", text, count=1)
    out = _SHORT_OPENER.sub("", out, count=1)
    return out.strip()


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text))


def is_empty(text: str) -> bool:
    return len(text.strip()) < 3


def is_identical(text: str, original: str) -> bool:
    return normalize(text) == normalize(original)


def clean_rewrite(text: str, original: str, rules: tuple[str, ...] | list[str] = RULES
                  ) -> tuple[str | None, str | None]:
    """Apply the enabled rules: ``(cleaned_text, None)`` to keep, ``(None, rule)`` naming the rule that dropped it."""
    text = (text or "").strip()
    if "strip_preamble" in rules:
        text = strip_preamble(text)
    if "drop_refusal" in rules and is_refusal(text):
        return None, "drop_refusal"
    if "drop_empty" in rules and is_empty(text):
        return None, "drop_empty"
    if "drop_identical" in rules and is_identical(text, original):
        return None, "drop_identical"
    return text, None
