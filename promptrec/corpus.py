"""Original texts and rewrite prompts: the built-in seed set and prompt bank, user files, chunking, filtering.

All functions here are pure over lists/frames (the tokenizer, when given, only counts tokens).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from importlib import resources

import pandas as pd

from promptrec.tables import DataError, read_table


def _asset_rows(name: str) -> list[dict]:
    text = resources.files("promptrec").joinpath("assets", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def seed_texts() -> pd.DataFrame:
    """The project's own seed texts: columns ``text_id, genre, topic, original_text``."""
    df = pd.DataFrame(_asset_rows("seed_texts.jsonl"))
    return df.rename(columns={"id": "text_id", "text": "original_text"})


REFERENCE = "reference"  # --triplets reference: the bundled reference rewrites


def reference_triplets_path() -> str:
    """The bundled reference rewrites (``assets/reference_rewrites.jsonl``): 504 triplets written for this project
    over the seed texts and the prompt bank, as an instruction-tuned model follows a prompt (see assets/README.md)."""
    return str(resources.files("promptrec").joinpath("assets", "reference_rewrites.jsonl"))


def prompt_bank() -> pd.DataFrame:
    """The project's own rewrite prompts: columns ``rewrite_prompt, prompt_category``."""
    df = pd.DataFrame(_asset_rows("prompt_bank.jsonl"))
    return df.rename(columns={"prompt": "rewrite_prompt", "category": "prompt_category"})


def read_texts(path: str, text_column: str = "original_text", drop_empty: bool = False) -> pd.DataFrame:
    """Original texts from a user file (csv/jsonl/parquet/hf:); the text column is renamed ``original_text``.

    An empty or NaN text is an error naming its row, unless ``drop_empty``: then it is kept here as "" and
    dropped (and counted) by :func:`filter_texts`.
    """
    rename = {text_column: "original_text"} if text_column != "original_text" else None
    df = read_table(path, required=[text_column], rename=rename, text_columns=[] if drop_empty else [text_column])
    df["original_text"] = df["original_text"].map(lambda v: v if isinstance(v, str) else "")
    if "text_id" not in df.columns:
        df["text_id"] = [f"{i}" for i in range(len(df))]
    if "genre" not in df.columns:
        df["genre"] = "user"
    return df


def read_prompts(path: str, prompt_column: str = "rewrite_prompt", category_column: str = "prompt_category"
                 ) -> pd.DataFrame:
    """Rewrite prompts from a user file (e.g. ``../shared/data/prompts.csv`` with ``--prompt_column prompt``)."""
    rename = {prompt_column: "rewrite_prompt"}
    if category_column != "prompt_category":
        rename[category_column] = "prompt_category"
    df = read_table(path, required=[prompt_column], rename=rename, text_columns=[prompt_column])
    if "prompt_category" not in df.columns:
        df["prompt_category"] = "user"
    df["prompt_category"] = df["prompt_category"].fillna("user").astype(str)
    return df[["rewrite_prompt", "prompt_category"]]


def load_prompt_sources(sources: list[str], column: str = "rewrite_prompt", category_column: str = "prompt_category",
                        limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Distinct rewrite prompts from ``sources`` (``"bank"`` = :func:`prompt_bank`, anything else a file read by
    :func:`read_prompts` with ``column``): columns ``rewrite_prompt, prompt_category``.

    De-duplication, the one rule for every stage: two prompts are the same when they are equal after whitespace
    normalisation (runs collapsed, ends trimmed; case and punctuation count); the first occurrence is kept, in source
    then file order. ``limit`` keeps a seeded random sample of that many, still in that order.
    """
    frames = [prompt_bank() if src == "bank" else read_prompts(src, column, category_column) for src in sources]
    prompts = pd.concat(frames, ignore_index=True)
    prompts = prompts[~prompts["rewrite_prompt"].map(lambda p: " ".join(p.split())).duplicated()]
    if limit and limit < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = prompts.iloc[keep]
    return prompts.reset_index(drop=True)


def normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def filter_texts(df: pd.DataFrame, min_words: int = 5) -> tuple[pd.DataFrame, dict]:
    """Drop empty, near-empty (< ``min_words`` words) and duplicate texts; return the rest and the counts."""
    counts = Counter()
    keep, seen = [], set()
    for i, text in enumerate(df["original_text"]):
        key = normalize(text)
        if not key:
            counts["empty"] += 1
        elif len(key.split()) < min_words:
            counts["near_empty"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            keep.append(i)
    counts["kept"] = len(keep)
    return df.iloc[keep].reset_index(drop=True), dict(counts)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _n_tokens(text: str, tokenizer) -> int:
    return len(text.split()) if tokenizer is None else len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_text(text: str, max_tokens: int, tokenizer=None) -> list[str]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens, at paragraph, then sentence, then word bounds."""
    if _n_tokens(text, tokenizer) <= max_tokens:
        return [text]
    units: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        if _n_tokens(para, tokenizer) <= max_tokens:
            units.append(para)
            continue
        for sent in _SENTENCE_END.split(para):
            if _n_tokens(sent, tokenizer) <= max_tokens:
                units.append(sent)
            else:  # a monster sentence: cut by words
                words, step = sent.split(), max(1, max_tokens // 2)
                units.extend(" ".join(words[i:i + step]) for i in range(0, len(words), step))
    chunks, current = [], ""
    for unit in units:
        joined = f"{current}\n\n{unit}" if current else unit
        if current and _n_tokens(joined, tokenizer) > max_tokens:
            chunks.append(current)
            current = unit
        else:
            current = joined
    if current:
        chunks.append(current)
    return chunks


def chunk_texts(df: pd.DataFrame, max_tokens: int | None, tokenizer=None) -> pd.DataFrame:
    """One row per chunk; ``text_id`` gains ``#k`` for chunks after the first."""
    if not max_tokens:
        return df
    rows = []
    for row in df.to_dict(orient="records"):
        for k, chunk in enumerate(chunk_text(row["original_text"], max_tokens, tokenizer)):
            text_id = row["text_id"] if k == 0 else f"{row['text_id']}#{k}"
            rows.append({**row, "original_text": chunk, "text_id": text_id})
    return pd.DataFrame(rows)


def pair_id(original_text: str, rewrite_prompt: str) -> str:
    """Stable id of a (text, prompt) pair: the same inputs get the same id in every run and process."""
    return hashlib.sha1(f"{original_text}\x00{rewrite_prompt}".encode()).hexdigest()[:16]


def make_jobs(texts: pd.DataFrame, prompts: pd.DataFrame, prompts_per_text: int, seed: int,
              max_pairs: int | None = None) -> pd.DataFrame:
    """Pair each text with ``prompts_per_text`` distinct prompts drawn at random (seeded).

    Returns ``id, text_id, original_text, rewrite_prompt, prompt_category``, one row per distinct pair.
    """
    if len(prompts) == 0:
        raise DataError("no rewrite prompts to pair with the texts")
    rng = random.Random(seed)
    k = min(prompts_per_text, len(prompts))
    rows = []
    for text in texts.to_dict(orient="records"):
        for j in rng.sample(range(len(prompts)), k):
            p = prompts.iloc[j]
            rows.append({"id": pair_id(text["original_text"], p["rewrite_prompt"]), "text_id": text["text_id"],
                         "original_text": text["original_text"], "rewrite_prompt": p["rewrite_prompt"],
                         "prompt_category": p["prompt_category"]})
    jobs = pd.DataFrame(rows).drop_duplicates("id")
    jobs = jobs.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # a capped run still spans many texts
    if max_pairs:
        jobs = jobs.iloc[:max_pairs].reset_index(drop=True)
    return jobs
