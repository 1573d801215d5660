"""Resumable, shardable row output for long generation jobs (rewrites, candidates).

Each process appends finished rows to its own ``parts/part-<rank>.jsonl``: one JSON line per row, flushed and
fsynced after each batch. A run killed at any moment (``kill -9``) leaves at most one partial last line, which
the next run cuts off. On start every process reads the ids already in *all* parts, so a resumed run — even
with another number of processes — skips them. Work is shared by rank: process ``r`` of ``w`` takes items
``r, r+w, r+2w, …`` of the full list, which keeps the split deterministic without any coordination.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd


def shard_items(items: Sequence, rank: int, world_size: int) -> list:
    """Process ``rank``'s share: every ``world_size``-th item starting at ``rank`` (disjoint, covers all)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # partial last line of a killed run
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class PartWriter:
    """Append-only JSONL part for one process; ``done_ids`` covers every part in the folder."""

    def __init__(self, parts_dir: str | os.PathLike, rank: int = 0, key: str = "id"):
        self.dir = Path(parts_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.path = self.dir / f"part-{rank:03d}.jsonl"
        self._repair()
        self.done_ids = {row[key] for part in sorted(self.dir.glob("part-*.jsonl")) for row in _read_rows(part)}

    def _repair(self) -> None:
        """Cut a partial last line (kill -9 mid-write) so appends start on a clean line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = len(data)
        if data and not data.endswith(b"\n"):
            good = data.rfind(b"\n") + 1
        if good != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done_ids.update(row[self.key] for row in rows)


def merge_parts(parts_dir: str | os.PathLike, order: Sequence | None = None, key: str = "id") -> pd.DataFrame:
    """All rows of every part, each ``key`` once (first wins), in ``order`` of keys when given."""
    rows = [row for part in sorted(Path(parts_dir).glob("part-*.jsonl")) for row in _read_rows(part)]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.drop_duplicates(subset=[key], keep="first")
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        df = df.assign(_order=df[key].map(rank)).sort_values("_order", kind="stable").drop(columns="_order")
    return df.reset_index(drop=True)


def dist_info() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch``/torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def pending_indices(ids: Sequence, writer: PartWriter, rank: int, world_size: int) -> list[int]:
    """Indices (into ``ids``) of this process's share that no part holds yet."""
    return [i for i in shard_items(range(len(ids)), rank, world_size) if ids[i] not in writer.done_ids]


def wait_for_everyone() -> None:
    """Barrier across ``accelerate launch`` processes (a no-op in a single process)."""
    if dist_info()[1] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
