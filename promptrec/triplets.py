"""Reading triplets (original text, rewrite prompt, rewritten text) from the rewrite step or an external file.

The rewrite step's output already has an ``id``; an external file such as ``../shared/data/triplets.csv`` gets
a stable one from :func:`promptrec.corpus.pair_id` (same text and prompt → same id in every run and process),
so resumed and sharded runs agree on which example is which.
"""

from __future__ import annotations

import pandas as pd

from promptrec.corpus import REFERENCE, pair_id, reference_triplets_path
from promptrec.tables import TRIPLET_COLUMNS, DataError, read_table


def filter_producers(df: pd.DataFrame, producers: list[str] | tuple[str, ...], name: str = "triplets") -> pd.DataFrame:
    """Rows whose ``producer`` equals or starts with one of ``producers`` ('gemma' does not match 'NOT gemma')."""
    if not producers:
        return df
    if "producer" not in df.columns:
        raise DataError(f"{name}: --producers given but the file has no 'producer' column")
    values = df["producer"].astype(str)
    keep = values.map(lambda v: any(v == p or v.startswith(p) for p in producers))
    if not keep.any():
        found = "; ".join(sorted(values.unique())[:10])
        raise DataError(f"{name}: no row's producer starts with any of {list(producers)} (found: {found})")
    return df[keep]


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def read_triplets(path: str, producers: list[str] | tuple[str, ...] = (), rename: dict[str, str] | None = None,
                  limit: int | None = None, seed: int = 0, need_prompt: bool = True) -> tuple[pd.DataFrame, dict]:
    """Read, filter and id triplets; returns the frame and counts of what was dropped.

    ``path`` is a .csv/.jsonl/.parquet/hf: file, or ``reference`` for the bundled reference rewrites.

    Columns out: ``id, original_text, rewrite_prompt, rewritten_text`` plus any others of the file. ``rename``
    maps the file's names to ours; rows with an empty text are dropped (counted), as are repeated ids.
    ``limit`` keeps a seeded random sample of that many rows, in file order. ``need_prompt`` False: texts whose
    prompt is unknown may come without ``rewrite_prompt`` (it is then None, and a missing id is made from the two
    texts).
    """
    if str(path) == REFERENCE:
        path = reference_triplets_path()
    columns = TRIPLET_COLUMNS if need_prompt else tuple(c for c in TRIPLET_COLUMNS if c != "rewrite_prompt")
    df = read_table(path, required=columns, rename=rename)
    df = filter_producers(df, producers, str(path))
    counts = {"read": len(df)}
    good = df[list(columns)].apply(lambda col: col.map(_is_text)).all(axis=1)
    counts["empty_text"] = int((~good).sum())
    df = df[good].copy()
    if df.empty:
        raise DataError(f"{path}: every row has an empty {' / '.join(columns)}")
    known = "rewrite_prompt" in df.columns
    if not known:
        df["rewrite_prompt"] = None
    if "id" in df.columns:
        df["id"] = df["id"].astype(str)
    else:
        second = df["rewrite_prompt"] if known else df["rewritten_text"]
        df.insert(0, "id", [pair_id(o, p) for o, p in zip(df["original_text"], second)])
    before = len(df)
    df = df.drop_duplicates("id")
    counts["duplicate_id"] = before - len(df)
    if limit and limit < len(df):
        df = df.sample(n=limit, random_state=seed).sort_index()
    counts["kept"] = len(df)
    return df.reset_index(drop=True), counts
