"""Resumable, shardable row output, and the one job skeleton of the data_generation scripts.

:func:`run_sharded` is that skeleton: this process's share → resumable parts → barrier → merge (rank 0) →
:func:`write_manifest`. The scripts (rewrite, candidates, pairs' scoring) only say what one share's work is.

Process ``r`` of ``w`` takes items ``r, r+w, r+2w, …`` (deterministic, no coordination) and appends each finished
batch to its own ``parts/part-<rank>.jsonl`` (one JSON line per row, flushed and fsynced). A run killed at any moment
(``kill -9``) leaves at most one partial last line, cut off by the next run, which skips the ids already in *all*
parts (even when it runs with another number of processes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd

from promptrec.tables import DataError, write_json

logger = logging.getLogger(__name__)


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
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
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


def run_share(ids: Sequence, parts_dir: str | os.PathLike, work: Callable[[list[int], PartWriter], None],
              desc: str) -> None:
    """Run ``work(indices, writer)`` on this process's share of ``ids`` that no part holds yet; ``work`` appends
    each finished row (with its ``id``) to ``writer``, so a killed run resumes where it stopped."""
    rank, world = dist_info()
    writer = PartWriter(parts_dir, rank)
    todo = [i for i in shard_items(range(len(ids)), rank, world) if ids[i] not in writer.done_ids]
    logger.info("%s: %d of %d rows to do in this process (rank %d/%d)", desc, len(todo), len(ids), rank, world)
    if todo:
        work(todo, writer)


def gather_parts(ids: Sequence, parts_dir: str | os.PathLike) -> pd.DataFrame | None:
    """After every process's share: the rows of ``ids`` from all parts, in ``ids`` order, on rank 0 (None on the
    others). Raises :class:`DataError` when a row is missing (a process failed: the same command finishes it)."""
    rank, world = dist_info()
    if world > 1:  # barrier across the accelerate launch processes
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    if rank != 0:
        return None
    merged = merge_parts(parts_dir, order=ids)
    wanted = set(ids)
    merged = merged[merged["id"].isin(wanted)].reset_index(drop=True) if len(merged) else merged
    if len(merged) < len(wanted):
        raise DataError(f"{parts_dir}: {len(wanted) - len(merged)} of {len(wanted)} rows are missing (a process "
                        "failed?); run the same command again to finish them")
    return merged


def run_sharded(ids: Sequence, parts_dir: str | os.PathLike, work: Callable[[list[int], PartWriter], None],
                desc: str) -> pd.DataFrame | None:
    """The job skeleton: :func:`run_share` then :func:`gather_parts`."""
    run_share(ids, parts_dir, work, desc)
    return gather_parts(ids, parts_dir)


def write_manifest(path: str | os.PathLike, start: float, **fields) -> dict:
    """``fields`` plus the process count and the seconds since ``start``, as JSON at ``path``."""
    manifest = {**fields, "processes": dist_info()[1], "seconds": round(time.time() - start, 1)}
    write_json(manifest, path)
    return manifest
