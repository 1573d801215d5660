"""Choosing what a preference-optimisation round ships, on validation rows only (issue 23, docs/po_selection.md).

The candidates of a round are the SFT adapter, the adapter the round started from (a later round's), the round's
checkpoints and interpolations of the LoRA *update* between SFT and the round's last adapter,
``ΔW(α) = (1 − α)·ΔW_SFT + α·ΔW_PO``. :func:`interpolate` builds one with PEFT's ``add_weighted_adapter``
(``combination_type="cat"``: the A matrices, scaled by weight × scaling, are stacked over the B matrices, so the sum
of the ``B·A`` products is exact; ``linear`` would mix A and B separately, which is not an interpolation of ΔW).

:func:`choose` is the rule fixed before any result: the highest mean validation SCS; ties (to 1e-9) go to the
candidate listed first, and :func:`grid` lists SFT first, then the start adapter, then fewer steps, then smaller α.
:func:`selection_table` pairs every candidate with SFT on the same rows (prompt-cluster bootstrap).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from promptrec.evaluation import bootstrap_ci

TIE_DECIMALS = 9
SFT = "sft"


@dataclass(frozen=True)
class Candidate:
    """One adapter the round could ship. ``kind``: ``sft``, ``start`` (the adapter the round began from),
    ``checkpoint`` (``step`` of the round; the last is the round's own adapter) or ``interpolation`` (``alpha``)."""

    name: str
    kind: str
    step: int | None = None
    alpha: float | None = None
    path: str | None = None  # the adapter folder (None: built in memory, an interpolation)


def grid(steps: Sequence[int], last_step: int, alphas: Sequence[float], start_is_sft: bool = True
         ) -> list[Candidate]:
    """The candidates in tie-break order: SFT, the start adapter (when not SFT), the checkpoints by step (the last
    step is the round's final adapter), the interpolations by α. α must lie strictly between 0 and 1 (the endpoints
    are SFT and the final adapter)."""
    for a in alphas:
        if not 0.0 < a < 1.0:
            raise ValueError(f"interpolation alpha must be in (0, 1), not {a} (0 is SFT, 1 the round's adapter)")
    out = [Candidate(SFT, "sft")] + ([] if start_is_sft else [Candidate("start", "start")])
    out += [Candidate(f"step{s}", "checkpoint", step=s) for s in sorted(set(steps) | {last_step})]
    out += [Candidate(f"alpha{a:g}", "interpolation", alpha=float(a)) for a in sorted(set(alphas))]
    return out


def choose(means: Mapping[str, float], order: Sequence[str]) -> str:
    """The name in ``order`` with the highest mean (rounded to 1e-9); ties → the earliest in ``order``."""
    missing = [n for n in order if n not in means]
    if missing or not order:
        raise ValueError(f"choose: no score for {missing or 'any candidate'}")
    best = max(round(float(means[n]), TIE_DECIMALS) for n in order)
    return next(n for n in order if round(float(means[n]), TIE_DECIMALS) == best)


def selection_table(scores: Mapping[str, np.ndarray], order: Sequence[str], groups=None, seed: int = 0,
                    n_resamples: int = 1000) -> list[dict]:
    """Per candidate (in ``order``): its mean validation SCS and its paired difference to SFT on the same rows with a
    95% bootstrap interval (whole ``groups``, e.g. prompt clusters, resampled when given)."""
    base = np.asarray(scores[SFT], dtype=np.float64)
    rows = []
    for name in order:
        values = np.asarray(scores[name], dtype=np.float64)
        if values.shape != base.shape:
            raise ValueError(f"selection_table: {name} has {values.shape} scores, SFT {base.shape}")
        diff = values - base
        low, high = bootstrap_ci(diff, n_resamples, seed=seed, groups=groups)
        rows.append({"name": name, "mean": float(values.mean()), "diff_vs_sft": float(diff.mean()),
                     "ci_low": low, "ci_high": high})
    return rows


def adapter_name(candidate: Candidate) -> str:
    """The PEFT adapter name of a candidate (PEFT names may not hold a dot): ``alpha0.25`` → ``alpha0_25``; SFT is
    the model's ``default`` adapter."""
    return "default" if candidate.kind == "sft" else candidate.name.replace(".", "_")


def describe(candidates: Sequence[Candidate]) -> list[dict]:
    return [{k: v for k, v in asdict(c).items() if v is not None} for c in candidates]


def interpolate(model, anchor: str, target: str, alpha: float, name: str) -> str:
    """Add adapter ``name`` to the PEFT ``model`` whose update is ``(1 − alpha)·ΔW_anchor + alpha·ΔW_target``
    (``add_weighted_adapter``, ``cat``: rank = the two ranks summed, exact). Returns ``name``. Only for plain LoRA:
    PEFT's ``cat`` gives the new adapter ``lora_alpha = r`` (scaling 1), which rsLoRA would rescale; DoRA magnitudes,
    LoRA biases and ``modules_to_save`` are not combined; so those stop here rather than build a wrong update."""
    for adapter in (anchor, target):
        config = model.peft_config[adapter]
        unsupported = [f for f in ("use_rslora", "use_dora", "lora_bias", "modules_to_save")
                       if getattr(config, f, None)]
        if unsupported:
            raise ValueError(f"cannot interpolate adapter {adapter!r}: {', '.join(unsupported)} set (the LoRA update "
                             "of such an adapter is not B·A alone); select without interpolations (--alphas '')")
    model.add_weighted_adapter([anchor, target], [1.0 - alpha, alpha], name, combination_type="cat")
    return name


@contextmanager
def active_adapter(model, name: str, merge: bool = False) -> Iterator[None]:
    """Make ``name`` the PEFT ``model``'s active adapter for the block; with ``merge``, also fold its update into the
    base weights (``merge_adapter``: the forward pass skips the LoRA matmuls, which a CPU decode pays for, twice over
    for an interpolation's rank-2r adapter). Afterwards it is folded out (``unmerge_adapter``) and the base weights
    are put back from a copy taken before, bit for bit: ``W + ΔW − ΔW`` is not ``W`` in floating point, and a later
    candidate's answers must not depend on which ones were decoded before it. The copy costs the adapted layers'
    weights once more in memory. Only for an unquantised base (:func:`promptrec.policy.should_merge`)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    model.set_adapter(name)
    if not merge:
        yield
        return
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [{k: t.detach().clone() for k, t in base.named_parameters(recurse=False)} for base in bases]
    model.merge_adapter([name])
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for base, tensors in zip(bases, saved):
                for k, t in tensors.items():
                    getattr(base, k).copy_(t)
