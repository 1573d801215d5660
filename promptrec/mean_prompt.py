"""Mean-prompt search: one string that maximises the mean SCS against a set of prompts.

Beam search over word appends and insertions from a vocabulary, within a token budget. Pure: the embedding
function (``encode(list[str]) -> (n, d)`` L2-normalised array, e.g. ``Scorer.encode``) and the token counter are
passed in, so tests can use any model or a toy one. ``reward/mean_prompt.py`` is the entry script.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from promptrec.scoring import scs_matrix

Encode = Callable[[list[str]], np.ndarray]
WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")


def build_vocabulary(prompts: Iterable[str], size: int = 150, min_count: int = 2) -> list[str]:
    """The ``size`` words that occur in the most prompts (each counted once per prompt, case kept), ≥ ``min_count``.

    Ties break alphabetically, so the result is deterministic.
    """
    counts = Counter(w for p in prompts for w in set(WORD_RE.findall(str(p))))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:size]


def expand(prompt: str, vocabulary: list[str], insertions: bool = True) -> list[str]:
    """Every prompt one word longer: each vocabulary word appended, and (``insertions``) inserted before each word."""
    words = prompt.split()
    positions = range(len(words) + 1) if insertions else [len(words)]
    out = dict.fromkeys(" ".join([*words[:pos], w, *words[pos:]]) for pos in positions for w in vocabulary)
    out.pop(prompt, None)
    return list(out)


def mean_scs(candidates: np.ndarray, targets: np.ndarray, exponent: float = 3.0, chunk: int = 1024) -> np.ndarray:
    """Mean SCS of each candidate vector (k, d) over all target vectors (n, d) → (k,). Rows L2-normalised."""
    candidates = np.atleast_2d(candidates)
    out = np.empty(len(candidates))
    for start in range(0, len(candidates), chunk):
        out[start:start + chunk] = scs_matrix(candidates[start:start + chunk], targets, exponent).mean(axis=1)
    return out


@dataclass
class SearchResult:
    """The best prompt, its mean train SCS, and one history entry per step (best score never decreases)."""

    prompt: str
    score: float
    history: list[dict] = field(default_factory=list)
    n_evaluated: int = 0


def beam_search(targets: np.ndarray, encode: Encode, vocabulary: list[str], *, init: str = "", beam_width: int = 4,
                max_steps: int = 16, max_tokens: int | None = 32, count_tokens: Callable[[str], int] | None = None,
                insertions: bool = True, max_candidates: int | None = 2000, exponent: float = 3.0, seed: int = 0,
                encode_batch: int = 512, progress: bool = False) -> SearchResult:
    """Beam search for the string with the highest mean SCS against ``targets`` (n, d).

    Each step expands every beam member by one word (:func:`expand`), drops strings over ``max_tokens`` (counted by
    ``count_tokens``, default whitespace words) or already scored, keeps a seeded random ``max_candidates`` of the
    rest, scores them, and keeps the ``beam_width`` best of old beam + new candidates, so the best score never
    decreases. Stops after ``max_steps`` or when no new candidate enters the beam.
    """
    if beam_width < 1 or max_steps < 0:
        raise ValueError("beam_width must be >= 1 and max_steps >= 0")
    if not vocabulary:
        raise ValueError("empty vocabulary")
    count_tokens = count_tokens or (lambda s: len(s.split()))
    rng = np.random.default_rng(seed)
    scored: dict[str, float] = {}

    def evaluate(texts: list[str]) -> None:
        for start in range(0, len(texts), encode_batch):
            batch = texts[start:start + encode_batch]
            scored.update(zip(batch, mean_scs(encode(batch), targets, exponent).tolist()))

    init = " ".join(init.split())
    if init and max_tokens is not None and count_tokens(init) > max_tokens:
        raise ValueError(f"the initial prompt has {count_tokens(init)} tokens, over the token budget of {max_tokens}")
    if init:
        evaluate([init])
    beam = [init] if init else [""]  # "" only seeds the first expansion; it is never a result
    history = []
    steps = range(max_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="mean-prompt search", unit="step")
    for step in steps:
        pool = dict.fromkeys(c for p in beam for c in expand(p, vocabulary, insertions))
        fresh = [c for c in pool if c not in scored and (max_tokens is None or count_tokens(c) <= max_tokens)]
        if max_candidates is not None and len(fresh) > max_candidates:
            fresh = [fresh[i] for i in sorted(rng.choice(len(fresh), max_candidates, replace=False))]
        evaluate(fresh)
        contenders = [p for p in beam if p in scored] + fresh
        new_beam = sorted(contenders, key=lambda p: (-scored[p], p))[:beam_width]
        if not new_beam:
            break
        history.append({"step": step + 1, "best_score": scored[new_beam[0]], "best_prompt": new_beam[0],
                        "n_candidates": len(fresh), "beam": new_beam})
        if progress:
            steps.set_postfix(best=f"{scored[new_beam[0]]:.4f}")
        if set(new_beam) == set(beam):
            break
        beam = new_beam
    best = max((p for p in beam if p in scored), key=lambda p: scored[p], default=None)
    if best is None:
        raise ValueError("no candidate fits the token budget: raise max_tokens or shorten init")
    return SearchResult(prompt=best, score=scored[best], history=history, n_evaluated=len(scored))
