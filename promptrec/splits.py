"""Train/eval splits that every stage computes alike, by example id or by prompt.

A row goes to eval when a seeded hash of its group key falls below ``eval_fraction``. The decision depends on
the key alone, not on which other rows are in the file, so SFT, candidate/pair building and DPO — each reading
the same triplets on its own — put the same examples (or the same prompts) in eval, and nothing trained on in
one stage is evaluated on in another. ``by="prompt"`` keeps every rewrite of one prompt on one side;
``by="cluster"`` keeps near-duplicate prompts ("Rewrite this as a poem" / "Rewrite the text as a poem") on one
side too: :func:`with_prompt_clusters` adds the cluster key each row is split by.

A split taken from the train side of another split needs its own ``salt``: with the same seed and salt the
inner eval rows (hash < 0.1, say) would all be ones the outer split already took (hash < 0.2), leaving the
inner eval side empty.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLIT_BY = ("id", "prompt", "cluster")
CLUSTER_COLUMN = "prompt_cluster"


def normalize_prompt(prompt: str) -> str:
    """Lower-case, whitespace-collapsed prompt: the group key of ``by="prompt"``."""
    return " ".join(str(prompt).lower().split())


def with_prompt_clusters(df: pd.DataFrame, encode, threshold: float) -> pd.DataFrame:
    """``df`` plus a ``prompt_cluster`` column: prompts whose embeddings (``encode(list of str)`` → (n, d),
    L2-normalised) have cosine ≥ ``threshold``, transitively, share one key."""
    from promptrec.pairs import prompt_cluster_keys

    prompts = sorted({normalize_prompt(p) for p in df["rewrite_prompt"]})
    key = dict(zip(prompts, prompt_cluster_keys(prompts, encode(prompts), threshold)))
    return df.assign(**{CLUSTER_COLUMN: df["rewrite_prompt"].map(lambda p: key[normalize_prompt(p)])})


def group_keys(df: pd.DataFrame, by: str = "id") -> pd.Series:
    """The split key of each row: ``id`` (``by="id"``), the normalised ``rewrite_prompt`` (``by="prompt"``) or the
    ``prompt_cluster`` column that :func:`with_prompt_clusters` adds (``by="cluster"``)."""
    if by == "id":
        return df["id"].astype(str)
    if by == "prompt":
        return df["rewrite_prompt"].map(normalize_prompt)
    if by == "cluster":
        if CLUSTER_COLUMN not in df.columns:
            raise ValueError("split_by cluster needs a prompt_cluster column (splits.with_prompt_clusters)")
        return df[CLUSTER_COLUMN].astype(str)
    raise ValueError(f"split_by must be one of {SPLIT_BY}, not '{by}'")


def key_fraction(key: str, seed: int = 0, salt: str = "") -> float:
    """A uniform number in [0, 1) fixed by ``(seed, salt, key)``."""
    salted = f"{seed}\x00{salt}\x00{key}" if salt else f"{seed}\x00{key}"
    digest = hashlib.sha1(salted.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def eval_mask(df: pd.DataFrame, eval_fraction: float, by: str = "id", seed: int = 0, salt: str = "") -> np.ndarray:
    """Boolean array, True for eval rows. With more than one group and ``0 < eval_fraction < 1``, both sides get
    at least one group (tiny sets would otherwise end with an empty side). ``salt`` names the split (see above)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    keys = group_keys(df, by)
    fractions = keys.map(lambda k: key_fraction(k, seed, salt)).to_numpy()
    mask = fractions < eval_fraction
    if eval_fraction > 0 and keys.nunique() > 1:
        if not mask.any():
            mask = fractions == fractions.min()
        elif mask.all():
            mask = fractions != fractions.max()
    return mask


def split_frame(df: pd.DataFrame, eval_fraction: float, by: str = "id", seed: int = 0, salt: str = ""
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, eval)`` rows of ``df`` (which needs ``id``; ``rewrite_prompt`` for ``by="prompt"``;
    ``prompt_cluster`` for ``by="cluster"``)."""
    mask = eval_mask(df, eval_fraction, by, seed, salt)
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)


def three_way_split(df: pd.DataFrame, heldout_fraction: float, validation_fraction: float, by: str = "id",
                    seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(train, validation, test)``, disjoint by ``by`` group. Test is what a two-way split with salt ``heldout``
    holds out (so adding a validation side leaves the test rows as they were); validation is ``validation_fraction``
    of the remaining groups (salt ``validation``); train is the rest. ``validation_fraction`` 0: no validation rows."""
    train, test = split_frame(df, heldout_fraction, by=by, seed=seed, salt="heldout")
    if validation_fraction <= 0:
        return train, train.iloc[:0], test
    train, validation = split_frame(train, validation_fraction, by=by, seed=seed, salt="validation")
    return train, validation, test
