"""Scoring a submission against the truth: id matching, bootstrap intervals, per-category summaries, reports.

Pure functions over DataFrames and arrays; ``reward/evaluate.py`` reads the files, scores and writes the outputs.
Submission columns: ``id, rewrite_prompt``; truth: ``id, rewrite_prompt[, category or prompt_category]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from promptrec.plots import figure
from promptrec.tables import DataError

CATEGORY_COLUMNS = ("category", "prompt_category")


def _few(values, k: int = 5) -> str:
    values = list(values)
    head = ", ".join(repr(v) for v in values[:k])
    return head + (f", … ({len(values)} in all)" if len(values) > k else "")


def _ids(df: pd.DataFrame, name: str) -> pd.Series:
    ids = df["id"]
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    if blank.any():
        raise DataError(f"{name}: column 'id' row {int(blank.to_numpy().nonzero()[0][0]) + 1} is empty")
    ids = ids.astype(str).str.strip()
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise DataError(f"{name}: duplicate id(s) {_few(dup)}")
    return ids


def is_blank(values: pd.Series) -> np.ndarray:
    """True where a prediction is missing, NaN or only whitespace."""
    return values.map(lambda v: not isinstance(v, str) or not v.strip()).to_numpy(dtype=bool)


def align_predictions(predictions: pd.DataFrame, truth: pd.DataFrame, allow_blank: bool = False,
                      category_column: str | None = None, pred_name: str = "predictions",
                      truth_name: str = "truth") -> pd.DataFrame:
    """Match predictions to truth rows by ``id`` (any order) → one row per truth row, in the truth's order.

    Columns out: ``id, prediction, truth, category, blank``. Duplicate ids in either table, and prediction ids that
    are not in the truth, raise :class:`DataError` listing a few. Truth ids without a prediction, and blank
    predictions, raise too unless ``allow_blank`` (they become ``blank=True`` rows, scored 0 by the caller).
    ``category_column`` ``None`` picks ``category`` or ``prompt_category`` when the truth has one.
    """
    pred_ids, truth_ids = _ids(predictions, pred_name), _ids(truth, truth_name)
    unknown = pred_ids[~pred_ids.isin(set(truth_ids))]
    if len(unknown):
        raise DataError(f"{pred_name}: {len(unknown)} id(s) not in {truth_name}: {_few(unknown)}")
    by_id = dict(zip(pred_ids, predictions["rewrite_prompt"]))
    missing = truth_ids[~truth_ids.isin(by_id.keys())]
    if len(missing) and not allow_blank:
        raise DataError(f"{pred_name}: no prediction for {len(missing)} id(s) of {truth_name}: {_few(missing)} "
                        f"(pass --allow_blank to score them 0)")
    out = pd.DataFrame({"id": truth_ids.to_numpy(), "prediction": [by_id.get(i) for i in truth_ids],
                        "truth": truth["rewrite_prompt"].to_numpy()})
    out["blank"] = is_blank(out["prediction"])
    if out["blank"].any() and not allow_blank:
        bad = out.loc[out["blank"] & out["id"].isin(by_id.keys()), "id"]
        raise DataError(f"{pred_name}: column 'rewrite_prompt' is blank for {len(bad)} id(s): {_few(bad)} "
                        f"(the competition rejects blanks; pass --allow_blank to score them 0)")
    if category_column is None:
        category_column = next((c for c in CATEGORY_COLUMNS if c in truth.columns), None)
    elif category_column not in truth.columns:
        raise DataError(f"{truth_name}: no column '{category_column}' (found: {', '.join(map(str, truth.columns))})")
    out["category"] = truth[category_column].fillna("(none)").astype(str).to_numpy() if category_column else None
    out["prediction"] = out["prediction"].where(~out["blank"], "")
    return out


def _grouped(values: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """Per resampling unit (a row, or with ``groups`` a whole group): the sum of ``values`` (shape (n,) or (n, m)
    for m statistics at once) and the row count."""
    if groups is None:
        return values, np.ones(len(values))
    _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if values.ndim == 1:
        return np.bincount(index, weights=values), np.bincount(index).astype(np.float64)
    sums = np.stack([np.bincount(index, weights=values[:, j]) for j in range(values.shape[1])], axis=1)
    return sums, np.bincount(index).astype(np.float64)


def _resampled_sums(sums: np.ndarray, counts: np.ndarray, n_resamples: int, seed: int):
    """Yield (summed values, summed counts) of ``n_resamples`` bootstrap resamples of the units, in blocks that keep
    the (resamples × units) index matrix near 10M entries for large submissions."""
    rng = np.random.default_rng(seed)
    block = max(1, 10_000_000 // len(sums))
    for start in range(0, n_resamples, block):
        pick = rng.integers(0, len(sums), size=(min(n_resamples, start + block) - start, len(sums)))
        yield sums[pick].sum(axis=1), counts[pick].sum(axis=1)


def bootstrap_ci(values: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (shape (n,)): resample rows with replacement.

    With ``groups`` (shape (n,), e.g. each row's prompt cluster), whole groups are resampled instead: rows that share
    a prompt are not independent evidence, and a row bootstrap would give too narrow an interval for them."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (math.nan, math.nan)
    sums, counts = _grouped(values, groups)
    means = np.concatenate([s / c for s, c in _resampled_sums(sums, counts, n_resamples, seed)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def ratio_ci(numerator: np.ndarray, denominator: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95,
             seed: int = 0, groups=None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(numerator) / mean(denominator)`` over paired rows (shape (n,)),
    resampling rows or whole ``groups`` as :func:`bootstrap_ci` does (same seed, same resamples). NaN when the
    ratio is undefined in more than the interval's tail share of resamples (a denominator <= 0: e.g. no headroom),
    rather than an interval conditional on the resamples where it happens to exist."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape:
        raise ValueError(f"ratio_ci: numerator shape {num.shape} vs denominator {den.shape}")
    if len(num) == 0:
        return (math.nan, math.nan)
    sums, counts = _grouped(np.stack([num, den], axis=1), groups)
    both = np.concatenate([s for s, _ in _resampled_sums(sums, counts, n_resamples, seed)])
    defined = both[:, 1] > 0
    tail = (1 - confidence) / 2
    if (~defined).mean() > tail:
        return (math.nan, math.nan)
    ratios = np.where(defined, both[:, 0] / np.where(defined, both[:, 1], 1.0), np.inf)  # undefined: off the top
    low, high = np.percentile(ratios, [tail * 100, 100 - tail * 100])
    return float(low), float(high)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy's; ties get their average rank); nan with fewer than 2 values or a constant
    side."""
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size != b.size:
        raise ValueError(f"{a.size} vs {b.size} values")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def within_group_spearman(groups: Iterable[tuple[Sequence[float], Sequence[float]]], min_size: int = 3
                          ) -> tuple[float, int]:
    """Mean :func:`spearman` over the groups (each an (x, y) pair, e.g. one prompt's rewards and true scores) with
    at least ``min_size`` values that vary on both sides, and how many such groups there were (nan, 0 without)."""
    rhos = [spearman(x, y) for x, y in groups if len(x) >= min_size]
    rhos = [r for r in rhos if not np.isnan(r)]
    return (float(np.mean(rhos)) if rhos else float("nan")), len(rhos)


def summarise(rows: pd.DataFrame, scores: np.ndarray, scorer_identity: dict, n_resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> dict:
    """Report dict: mean SCS, bootstrap interval, counts, quantiles and per-category means (when categories exist).

    ``rows`` is :func:`align_predictions`' output and ``scores`` its per-row SCS (blank rows already 0).
    """
    scores = np.asarray(scores, dtype=np.float64)
    low, high = bootstrap_ci(scores, n_resamples, confidence, seed)
    report = {
        "scorer": scorer_identity,
        "n": len(scores),
        "n_blank": int(rows["blank"].sum()),
        "mean_scs": float(scores.mean()),
        "ci": {"low": low, "high": high, "confidence": confidence, "n_resamples": n_resamples, "seed": seed},
        "quantiles": {f"p{q}": float(np.percentile(scores, q)) for q in (10, 25, 50, 75, 90)},
    }
    if rows["category"].notna().all():
        frame = pd.DataFrame({"category": rows["category"].to_numpy(), "scs": scores})
        grouped = frame.groupby("category")["scs"].agg(["count", "mean"]).sort_values("mean", ascending=False)
        report["per_category"] = {str(c): {"n": int(r["count"]), "mean_scs": float(r["mean"])}
                                  for c, r in grouped.iterrows()}
    return report


def _cell(text, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def report_markdown(report: dict, rows: pd.DataFrame, scores: np.ndarray, plot_name: str | None = None,
                    n_examples: int = 5) -> str:
    """The Markdown report: headline table, per-category table, histogram link, the lowest- and highest-scored rows."""
    ci = report["ci"]
    lines = [
        f"# SCS evaluation: {report.get('predictions', 'predictions')}", "",
        "| metric | value |", "|---|---|",
        f"| mean SCS | **{report['mean_scs']:.4f}** |",
        f"| {ci['confidence']:.0%} bootstrap CI | {ci['low']:.4f} – {ci['high']:.4f} ({ci['n_resamples']} draws) |",
        f"| rows | {report['n']} |",
        f"| blank predictions (scored 0) | {report['n_blank']} |",
        "| median / p10 / p90 | {p50:.4f} / {p10:.4f} / {p90:.4f} |".format(**report["quantiles"]),
        f"| scorer | {report['scorer']['model']}, exponent {report['scorer']['exponent']:g} |", "",
    ]
    if "per_category" in report:
        lines += ["## Per category", "", "| category | n | mean SCS |", "|---|---:|---:|"]
        lines += [f"| {_cell(c, 40)} | {v['n']} | {v['mean_scs']:.4f} |" for c, v in report["per_category"].items()]
        lines.append("")
    if plot_name:
        lines += [f"![SCS histogram]({plot_name})", ""]
    order = np.argsort(scores, kind="stable")
    for title, idx in (("Lowest-scored rows", order[:n_examples]), ("Highest-scored rows", order[::-1][:n_examples])):
        lines += [f"## {title}", "", "| id | SCS | prediction | truth |", "|---|---:|---|---|"]
        lines += [f"| {_cell(rows['id'].iloc[i], 20)} | {scores[i]:.3f} | {_cell(rows['prediction'].iloc[i])} | "
                  f"{_cell(rows['truth'].iloc[i])} |" for i in idx]
        lines.append("")
    return "\n".join(lines)


def plot_histogram(scores: np.ndarray, path: str | Path, title: str = "SCS per row") -> Path:
    """Histogram of per-row SCS with the mean marked, saved as PNG (matplotlib's Agg backend; no display needed)."""
    scores = np.asarray(scores, dtype=np.float64)
    low = min(0.0, float(scores.min())) if len(scores) else 0.0
    with figure(path, dpi=100) as (ax,):
        ax.hist(scores, bins=40, range=(low, 1.0), color="#4C72B0", edgecolor="white")
        if len(scores):
            ax.axvline(scores.mean(), color="#C44E52", linestyle="--", label=f"mean {scores.mean():.4f}")
            ax.legend()
        ax.set(xlabel="sharpened cosine similarity", ylabel="rows", title=title)
    return Path(path)
