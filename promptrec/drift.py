"""Opening-word drift: how much a set of prompts piles onto one first word, and the pair filters that limit it.

Preference optimisation tends to make a policy open most answers the same way ("Rewrite …"). Measures (issue 23,
docs/po_selection.md): :func:`opening_word` of each text, their :func:`opening_distribution` (shares), its
:func:`opening_entropy` (in **nats**) and :func:`top_opening`; :func:`drift_summary` puts them together and, given
reference texts (SFT's predictions), says whether the top opening's share ``doubled`` against the reference's.

Pair-level controls for data_generation/build_pairs.py, all pure (:func:`drift_controls` applies both):

* :func:`shares_prefix` — the chosen and rejected answers start with the same ``k`` tokens (such pairs are dropped);
* :func:`cap_opening_share` — no chosen opening word above a share of the pairs: pairs of an over-represented word
  are dropped, smallest margin first, until it is within the cap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence


def opening_word(text: str | None) -> str:
    """The first word of ``text``: its first whitespace-separated piece that holds a letter or digit, with every
    other character removed, case-folded (``'"Re-write it'`` → ``"rewrite"``); ``""`` when there is none."""
    for piece in str(text or "").split():
        word = "".join(ch for ch in piece if ch.isalnum())
        if word:
            return word.casefold()
    return ""


def opening_distribution(texts: Sequence[str]) -> dict[str, float]:
    """``{opening word: share of texts}`` over all ``texts`` (a blank text counts under ``""``), largest share
    first, ties alphabetical; ``{}`` for no texts."""
    counts = Counter(opening_word(t) for t in texts)
    return {w: c / len(texts) for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))}


def opening_entropy(dist: dict[str, float]) -> float:
    """Shannon entropy of an opening distribution, in nats (natural log); 0 for one word or none."""
    return float(max(0.0, -sum(p * math.log(p) for p in dist.values() if p > 0)))


def top_opening(dist: dict[str, float]) -> tuple[str, float]:
    """The most common opening word and its share (ties: alphabetical); ``("", 0.0)`` for an empty distribution."""
    return min(dist.items(), key=lambda wp: (-wp[1], wp[0]), default=("", 0.0))


def drift_summary(texts: Sequence[str], reference_texts: Sequence[str] | None = None) -> dict:
    """Opening-word summary of ``texts``: ``n``, ``top_word``, ``top_share``, ``entropy_nats``, ``top5``
    (``{word: share}``). With ``reference_texts`` (e.g. SFT's predictions of the same rows) also ``reference``
    (its ``n``, ``top_word``, ``top_share``, ``entropy_nats``), ``reference_share_of_top_word`` (the reference's share
    of *this* top word) and ``doubled``: this top word's share is more than twice the reference's *top* share
    (``top_share > 2 * reference.top_share``; the word may differ). That is the drift flag of
    docs/po_selection.md; it implies the share of the word itself more than doubled too. Shares are rounded to 4
    places, ``doubled`` is decided on the exact ones."""
    dist = opening_distribution(texts)
    word, share = top_opening(dist)
    out = {"n": len(texts), "top_word": word, "top_share": round(share, 4),
           "entropy_nats": round(opening_entropy(dist), 4),
           "top5": {w: round(p, 4) for w, p in list(dist.items())[:5]}}
    if reference_texts is not None:
        if not len(reference_texts):
            raise ValueError("drift_summary: reference_texts is empty")
        ref = opening_distribution(reference_texts)
        ref_word, ref_share = top_opening(ref)
        out["reference"] = {"n": len(reference_texts), "top_word": ref_word, "top_share": round(ref_share, 4),
                            "entropy_nats": round(opening_entropy(ref), 4)}
        out["reference_share_of_top_word"] = round(ref.get(word, 0.0), 4)
        out["doubled"] = bool(share > 2 * ref_share)
    return out


# ---------------------------------------------------------------- pair-level controls


def shares_prefix(chosen_tokens: Sequence, rejected_tokens: Sequence, k: int) -> bool:
    """Whether two token sequences start with the same ``k`` tokens (both at least ``k`` long); never for k = 0."""
    if k < 0:
        raise ValueError(f"k must be >= 0 (0 = off), not {k}")
    return k > 0 and len(chosen_tokens) >= k and len(rejected_tokens) >= k and \
        list(chosen_tokens[:k]) == list(rejected_tokens[:k])


def cap_opening_share(openings: Sequence[str], margins: Sequence[float], max_share: float) -> list[int]:
    """Indices (ascending) of the items kept so that no opening word is more than ``max_share`` of them.

    ``openings[i]`` is item i's (chosen answer's) opening word, ``margins[i]`` its score margin. While the most
    common word (ties: alphabetical) exceeds the cap, its item with the smallest margin (ties: the later one) is
    dropped; so each word keeps its largest margins, and a cap below one word per distinct word can empty the set.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1] (1 = off), not {max_share}")
    if len(openings) != len(margins):
        raise ValueError(f"{len(openings)} openings but {len(margins)} margins")
    queues: dict[str, list[int]] = {}  # per word, its items in drop order (popped from the end)
    for i in sorted(range(len(openings)), key=lambda i: (-margins[i], i)):
        queues.setdefault(openings[i], []).append(i)
    dropped, n = set(), len(openings)
    while n:
        word = min(queues, key=lambda w: (-len(queues[w]), w))
        if len(queues[word]) <= max_share * n + 1e-9:
            break
        dropped.add(queues[word].pop())
        n -= 1
    return [i for i in range(len(openings)) if i not in dropped]


def drift_controls(pairs: Sequence[dict], tokenize: Callable[[list[str]], list[Sequence]] | None = None,
                   shared_prefix_tokens: int = 0, max_opening_share: float = 1.0) -> tuple[list[dict], dict]:
    """``pairs`` (dicts with ``chosen, rejected, score_chosen, score_rejected``) minus those the controls drop, in
    their order, and what was dropped: ``{"shared_prefix": n, "opening_share": n, "opening_share_words": {word: n}}``.

    First pairs whose chosen and rejected share their first ``shared_prefix_tokens`` tokens (``tokenize`` maps texts
    to token lists; 0 = off), then :func:`cap_opening_share` of the chosen answers' opening words at
    ``max_opening_share`` (1 = off) over the rest, margin = ``score_chosen - score_rejected``.
    """
    if shared_prefix_tokens < 0:
        raise ValueError(f"shared_prefix_tokens must be >= 0 (0 = off), not {shared_prefix_tokens}")
    if not 0 < max_opening_share <= 1:
        raise ValueError(f"max_opening_share must be in (0, 1] (1 = off), not {max_opening_share}")
    kept = list(pairs)
    if shared_prefix_tokens and kept:
        if tokenize is None:
            raise ValueError("shared_prefix_tokens > 0 needs a tokenize function")
        chosen, rejected = tokenize([p["chosen"] for p in kept]), tokenize([p["rejected"] for p in kept])
        kept = [p for p, c, r in zip(kept, chosen, rejected) if not shares_prefix(c, r, shared_prefix_tokens)]
    n_prefix = len(pairs) - len(kept)
    openings = [opening_word(p["chosen"]) for p in kept]
    keep = cap_opening_share(openings, [p["score_chosen"] - p["score_rejected"] for p in kept], max_opening_share)
    capped = Counter(openings) - Counter(openings[i] for i in keep)
    return [kept[i] for i in keep], {"shared_prefix": n_prefix, "opening_share": sum(capped.values()),
                                     "opening_share_words": dict(capped.most_common())}
