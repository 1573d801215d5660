"""Reading and writing the files that pass between stages, with one schema per hand-off.

Formats: ``.csv``, ``.jsonl``/``.json``, ``.parquet``, or ``hf:<dataset name or dir>[:split]`` for a
``datasets`` dataset. Bad input raises :class:`DataError` whose message is one line naming the file,
column or row; entry scripts print it and exit 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

# The hand-offs. Extra columns are kept; these are the ones each stage relies on.
TRIPLET_COLUMNS = ("original_text", "rewrite_prompt", "rewritten_text")
REWRITE_COLUMNS = ("id", "original_text", "rewrite_prompt", "prompt_category", "rewritten_text", "generator",
                   "generation_params")
CANDIDATE_COLUMNS = ("id", "candidate", "source")
PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "source_chosen",
                "source_rejected")
TEST_COLUMNS = ("id", "original_text", "rewritten_text")
SUBMISSION_COLUMNS = ("id", "rewrite_prompt")


class DataError(ValueError):
    """Bad input data; the message is one line that names the file, column or row."""


class UserPathError(DataError, FileNotFoundError):
    """A path the user named (a flag, a recipe) is missing or of the wrong kind: ``"<path>: no such file"``.

    Entry scripts print it in one line like any :class:`DataError`; a ``FileNotFoundError`` raised anywhere else is
    an internal bug and keeps its traceback. It is also a ``FileNotFoundError``, for callers that catch that."""


def require_path(path: str | os.PathLike, kind: str = "file", hint: str = "") -> Path:
    """``path`` as a ``Path`` when it is an existing ``kind`` (``"file"`` or ``"directory"``); otherwise
    :class:`UserPathError` ``"<path>: no such <kind>"`` (``"<path>: not a <kind>"`` when it is the other kind),
    followed by ``hint`` when given."""
    path = Path(path)
    found = path.is_dir() if kind == "directory" else path.is_file()
    if not found:
        problem = f"not a {kind}" if path.exists() else f"no such {kind}"
        raise UserPathError(f"{path}: {problem}{f' ({hint})' if hint else ''}")
    return path


def read_table(path: str | os.PathLike, required: tuple[str, ...] | list[str] = (),
               rename: dict[str, str] | None = None, text_columns: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """Read a table and check it.

    ``rename`` maps the file's column names to ours (e.g. ``{"text": "original_text"}``). ``required`` columns
    must exist and ``text_columns`` must be non-empty strings in every row (the first bad row is named); both
    may be given in either the file's names or ours, and errors use the file's names.
    """
    name = str(path)
    df = _read_any(name)
    if len(df) == 0:
        raise DataError(f"{name}: no rows")
    rename = dict(rename or {})
    inverse = {v: k for k, v in rename.items()}
    df = df.rename(columns={k: v for k, v in rename.items() if k in df.columns})

    def ours(col):
        return rename.get(col, col)

    def theirs(col):
        return inverse.get(ours(col), ours(col))

    missing = list(dict.fromkeys(theirs(c) for c in required if ours(c) not in df.columns))
    if missing:
        found = ", ".join(theirs(str(c)) for c in df.columns)
        raise DataError(f"{name}: missing column(s) {', '.join(missing)} (found: {found})")
    for col in text_columns:
        bad = df[ours(col)].map(lambda v: not isinstance(v, str) or not v.strip())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            value = df[ours(col)].iloc[row]
            what = "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)[:40]
            raise DataError(f"{name}: column '{theirs(col)}' row {row + 1} is empty or not text ({what}); "
                            f"{int(bad.sum())} such row(s)")
    return df.reset_index(drop=True)


def _read_any(name: str) -> pd.DataFrame:
    if name.startswith("hf:"):
        return _read_hf(name[3:])
    path = require_path(name)
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix in (".csv", ".csv.gz"):
            return pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""])
        if suffix in (".jsonl", ".jsonl.gz"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.read_json(path, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except (ValueError, pd.errors.ParserError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name}: can't parse as {suffix[1:]}: {first}") from None
    raise DataError(f"{name}: unknown format '{suffix}' (use .csv, .jsonl, .json, .parquet or hf:<dataset>)")


def _read_hf(spec: str) -> pd.DataFrame:
    import datasets

    name, _, split = spec.partition(":")
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # datasets raises many types; the user needs the name and the reason
        reason = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"hf:{spec}: can't load the dataset ({type(err).__name__}: {reason})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
    return ds.to_pandas()


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file + rename), so a crash never leaves a half file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix in (".jsonl", ".json"):
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in df.to_dict(orient="records"):
                    fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            raise DataError(f"{path}: unknown output format '{path.suffix}' (use .csv, .jsonl or .parquet)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(obj, path: str | os.PathLike) -> Path:
    """Atomic JSON write (manifests, metrics, resolved configs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the sha256 of a file's bytes; ``missing`` when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
