"""Preference pairs from scored candidate prompts, prompt clusters and negative selection — all pure.

For one example, ``candidates`` are recovered-prompt strings and ``scores`` their SCS against the true prompt.
:func:`build_pairs` turns them into (chosen, rejected) pairs by one of :data:`STRATEGIES`:

* ``best_vs_worst`` — the best candidate allowed as chosen vs the worst one: at most one pair;
* ``topk_bottomk`` — every top-``k`` (allowed as chosen) × every bottom-``k`` candidate;
* ``all_pairs`` — every ordered pair whose margin is at least ``min_margin``.

A pair is made only when ``score_chosen - score_rejected >= min_margin`` and the margin beats ``tie_tolerance``
(equal scores never make a pair). Candidates are de-duplicated first (case, spacing and end punctuation
ignored; the first copy wins). ``max_pairs`` keeps the pairs with the largest margins.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("best_vs_worst", "topk_bottomk", "all_pairs")
TRUE_SOURCE = "true"


def text_key(text: str) -> str:
    """What makes two prompts "the same": case, spacing and end punctuation ignored."""
    return " ".join(str(text).split()).casefold().rstrip(" .!?;:")


def dedupe_candidates(candidates: Sequence[str], scores: Sequence[float], sources: Sequence[str]
                      ) -> tuple[list[str], np.ndarray, list[str]]:
    """Drop empty and repeated candidates (by :func:`text_key`), keeping each one's first copy."""
    seen, keep = set(), []
    for i, text in enumerate(candidates):
        key = text_key(text)
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    return ([candidates[i] for i in keep], np.asarray(scores, dtype=np.float64)[keep], [sources[i] for i in keep])


def build_pairs(candidates: Sequence[str], scores: Sequence[float], strategy: str = "best_vs_worst",
                min_margin: float = 0.0, *, sources: Sequence[str] | None = None, k: int = 2,
                max_pairs: int | None = None, allow_true_chosen: bool = True, true_prompt: str | None = None,
                tie_tolerance: float = 1e-6, rejected_sources: Sequence[str] | None = None,
                chosen_sources: Sequence[str] | None = None) -> list[dict]:
    """Pairs for one example: dicts ``chosen, rejected, score_chosen, score_rejected, source_chosen, source_rejected``.

    ``sources[i]`` names where candidate i came from (``"true"`` marks the true prompt; so does matching
    ``true_prompt``). With ``allow_true_chosen=False`` the true prompt is never the chosen side, so the policy
    learns to rank its own kind of outputs rather than only to copy the label. ``rejected_sources`` (e.g.
    ``["policy"]``) limits the rejected side to those sources: on-policy pairs push down what the model actually
    says, where a random bank prompt is already unlikely. ``chosen_sources`` does the same for the chosen side: with
    both ``["policy"]`` the pairs are self-play, the policy's best sample against its worst. Pairs come in decreasing
    margin.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    sources = list(sources) if sources is not None else ["candidate"] * len(candidates)
    if len(sources) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(sources)} sources")
    if min_margin < 0 or tie_tolerance < 0 or k < 1 or (max_pairs is not None and max_pairs < 0):
        raise ValueError("min_margin and tie_tolerance must be >= 0, k >= 1 and max_pairs >= 0")
    if not np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        raise ValueError("scores must be finite")
    texts, values, srcs = dedupe_candidates(list(candidates), scores, sources)
    true_key = text_key(true_prompt) if true_prompt is not None else None
    is_true = [s == TRUE_SOURCE or text_key(t) == true_key for t, s in zip(texts, srcs)]
    order = sorted(range(len(texts)), key=lambda i: (-values[i], i))  # best first; ties keep input order
    can_choose = [i for i in order if (allow_true_chosen or not is_true[i])
                  and (not chosen_sources or srcs[i] in chosen_sources)]
    worst_first = [i for i in order[::-1] if not rejected_sources or srcs[i] in rejected_sources]
    if strategy == "best_vs_worst":
        combos = [(can_choose[0], worst_first[0])] if can_choose and worst_first else []
    elif strategy == "topk_bottomk":
        combos = [(c, r) for c in can_choose[:k] for r in worst_first[:k]]
    else:
        combos = [(c, r) for c in can_choose for r in worst_first]
    # the 1e-9 slack lets 0.5 vs 0.45 pass min_margin 0.05 despite float error
    kept = [(c, r) for c, r in combos
            if values[c] - values[r] > tie_tolerance and values[c] - values[r] >= min_margin - 1e-9]
    kept.sort(key=lambda cr: -(values[cr[0]] - values[cr[1]]))  # stable: equal margins keep the order above
    if max_pairs is not None:
        kept = kept[:max_pairs]
    return [{"chosen": texts[c], "rejected": texts[r], "score_chosen": float(values[c]),
             "score_rejected": float(values[r]), "source_chosen": srcs[c], "source_rejected": srcs[r]}
            for c, r in kept]


def margin_stats(margins: Sequence[float]) -> dict:
    """Count, mean, quantiles (10/50/90 %), min and max of pair margins (all 0 when there are none)."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        return {"count": 0, "mean": 0.0, "min": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    q10, q50, q90 = np.quantile(m, [0.1, 0.5, 0.9])
    return {"count": int(m.size), "mean": float(m.mean()), "min": float(m.min()), "p10": float(q10),
            "p50": float(q50), "p90": float(q90), "max": float(m.max())}


def source_counts(pairs: Sequence[dict]) -> dict:
    """How often each candidate source is chosen and rejected, and the (chosen, rejected) source combinations."""
    return {"chosen": dict(Counter(p["source_chosen"] for p in pairs).most_common()),
            "rejected": dict(Counter(p["source_rejected"] for p in pairs).most_common()),
            "combinations": {f"{c} > {r}": n for (c, r), n in
                             Counter((p["source_chosen"], p["source_rejected"]) for p in pairs).most_common()}}


# ---------------------------------------------------------------- prompt clusters (for leak-free splits)


def cluster_by_similarity(embeddings: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Cluster labels (n,): rows joined when their cosine ≥ ``threshold``, transitively (connected components).

    ``embeddings`` (n, d) must be L2-normalised. Labels are the smallest member index of each cluster.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    parent = np.arange(len(emb))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(emb), block):
        sims = emb[start:start + block] @ emb.T
        for a, b in zip(*np.nonzero(sims >= threshold)):
            ra, rb = find(start + int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(len(emb))])


def prompt_cluster_keys(prompts: Sequence[str], embeddings: np.ndarray, threshold: float) -> list[str]:
    """For each prompt, a key shared by its whole cluster (the cluster's first member in sorted order).

    ``embeddings`` (n, d), L2-normalised, are those of ``prompts``; splitting on these keys keeps rephrasings of
    one prompt on the same side of a train/eval split.
    """
    order = sorted(range(len(prompts)), key=lambda i: str(prompts[i]))
    labels = cluster_by_similarity(np.asarray(embeddings)[order], threshold)
    first = {i: str(prompts[order[i]]) for i in range(len(order))}
    keys = [""] * len(prompts)
    for pos, label in enumerate(labels):
        keys[order[pos]] = first[int(label)]
    return keys


# ---------------------------------------------------------------- negatives


def stable_seed(*parts) -> int:
    """A 64-bit seed from any values: the same on every process and run (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha1("\x00".join(map(str, parts)).encode("utf-8")).digest()[:8], "little")


def select_negatives(queries: np.ndarray, bank: np.ndarray, n_hard: int, n_random: int, ceiling: float = 0.9,
                     seeds: Sequence[int] | None = None, block: int = 512) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query row, bank indices of ``n_hard`` hard and ``n_random`` random negatives.

    ``queries`` (n, d) and ``bank`` (m, d) are L2-normalised embeddings. Bank rows with cosine ≥ ``ceiling`` to
    the query are near-duplicates of it (a rephrasing of the true prompt is no negative) and are never picked.
    Hard negatives are the most similar of the rest, most similar first; random ones are drawn from the rest
    minus the hard ones with ``np.random.default_rng(seeds[i])`` (default: the row index), so a row's draw does
    not depend on which other rows are in the batch.
    """
    queries, bank = np.asarray(queries, dtype=np.float32), np.asarray(bank, dtype=np.float32)
    seeds = list(range(len(queries))) if seeds is None else list(seeds)
    out = []
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ bank.T
        for row, sim in enumerate(sims):
            allowed = np.flatnonzero(sim < ceiling)
            hard = np.zeros(0, dtype=np.int64)
            if n_hard > 0 and allowed.size:
                top = allowed[np.argpartition(-sim[allowed], min(n_hard, allowed.size) - 1)[:n_hard]]
                hard = top[np.argsort(-sim[top], kind="stable")]
            rest = np.setdiff1d(allowed, hard)
            rng = np.random.default_rng(seeds[start + row])
            rand = rng.choice(rest, size=min(n_random, rest.size), replace=False) if n_random > 0 else rest[:0]
            out.append((hard, np.asarray(rand, dtype=np.int64)))
    return out
