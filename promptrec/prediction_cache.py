"""Greedy predictions kept by what decides them, so an unchanged policy is decoded once, not once per use.

A key is the digest of the adapter's bytes (its weights and PEFT config) plus every setting that decides the decode
(the rows, the base, dtype, batch, lengths …): a retrained or re-selected adapter, other rows or other settings get
another key, and nothing stale is read. An entry is ``<folder>/<key>.json`` with the predictions, one per row, in
the rows' order. Two users: the PO selection (dpo/select_adapter.py: SFT's validation predictions, shared by every
round, the control and every seed of an experiment) and ``inference/predict.py --prediction_cache`` (the pipeline's
predict stage: the base and SFT rows are not re-decoded when only DPO re-ran).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from promptrec.models import EMBEDDED_ALIASES, embedded_model_dir
from promptrec.tables import file_digest

ADAPTER_KEY_FILES = ("adapter_model.safetensors", "adapter_config.json")


def adapter_digest(adapter: str | Path) -> list[str] | None:
    """Digests of an adapter folder's weights and PEFT config; None when it has no weights file."""
    if not (Path(adapter) / ADAPTER_KEY_FILES[0]).is_file():
        return None
    return [file_digest(Path(adapter) / name) for name in ADAPTER_KEY_FILES]


def model_files(model: str) -> dict[str, list[int]]:
    """``{file: [size, mtime_ns]}`` of a local model folder's files (the embedded model's materialised one), so a base
    replaced in place gets other keys; ``{}`` for a hub id (its name and revision identify it)."""
    path = embedded_model_dir() if str(model).lower() in EMBEDDED_ALIASES else Path(model).expanduser()
    if not path.is_dir():
        return {}
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()}


def tokenizer_digests(source: str | Path) -> dict[str, str]:
    """Digests of the tokenizer files in ``source`` (an adapter's saved tokenizer: its chat template, special and
    added tokens); ``{}`` for a hub id (the base's identity covers it)."""
    folder = Path(source)
    if not folder.is_dir():
        return {}
    names = [f for f in sorted(folder.iterdir()) if f.is_file() and (
        f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "added_tokens.json",
                                                     "chat_template.jinja", "chat_template.json"))]
    return {f.name: file_digest(f) for f in names}


def cache_key(adapter: list[str] | None, settings: dict) -> str:
    """The entry's name: a digest of the adapter's digests (None: a base model alone) and ``settings``."""
    text = json.dumps({"adapter": adapter, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached(folder: Path | None, key: str | None, n_rows: int) -> list[str] | None:
    """The predictions stored under ``key``, or None (no folder or key, no entry, or not ``n_rows`` of them)."""
    path = Path(folder) / f"{key}.json" if folder and key else None
    if path is None or not path.is_file():
        return None
    try:
        predictions = json.loads(path.read_text(encoding="utf-8")).get("predictions")
    except (OSError, ValueError, AttributeError):  # unreadable: decoded again, and rewritten
        return None
    return predictions if isinstance(predictions, list) and len(predictions) == n_rows else None


def remember(folder: Path | None, key: str | None, source: str | None, predictions: list[str]) -> None:
    """Store ``predictions`` under ``key`` (``source`` names the adapter, for a reader): written to a temporary file
    of its own and renamed, so a reader never sees half an entry and two writers of one key do not collide."""
    if not (folder and key):
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"adapter": source, "predictions": predictions}, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, Path(folder) / f"{key}.json")
