"""Score candidate prompts against the true prompt (SCS) and build DPO preference pairs with a leak-free split.

    python data_generation/build_pairs.py --config data_generation/configs/pairs_smollm2.yaml
    python data_generation/build_pairs.py --config data_generation/configs/pairs_gemma_triplets.yaml
    accelerate launch --multi_gpu --num_processes 2 data_generation/build_pairs.py --config ...  # 2 scoring shards

Reads ``candidates.parquet`` (``id, candidate, source``) and the ``triplets.parquet`` beside it (both written by
``candidates.py``), scores each example's candidates with :class:`promptrec.scoring.Scorer` into
``<output_dir>/scores.parts/`` (a killed run resumes), and writes the pairs of :func:`promptrec.pairs.build_pairs`
in TRL's conversational preference format (``prompt``, ``chosen``, ``rejected`` plus ``id, score_chosen,
score_rejected, source_chosen, source_rejected``) to ``train.jsonl`` and ``eval.jsonl``, split by example id,
prompt or prompt cluster (one prompt never on both sides). Also ``scores.parquet``, ``summary.json``, ``margins.png``.

Drift controls (issue 23; both off by default), applied to each side's pairs by :func:`promptrec.drift.drift_controls`:

* ``--drop_shared_prefix_tokens k``: drop pairs whose chosen and rejected answers start with the same ``k`` tokens
  of the tokenizer the prompts are rendered with (0: off);
* ``--max_opening_share s``: no opening word (:func:`promptrec.drift.opening_word`) may start more than a share ``s``
  of a side's chosen answers; pairs of a word above it are dropped, smallest margin first (1: off).

``summary.json`` records what each dropped per side and the chosen answers' opening words (``drift_controls``).

Reward-labelled pairs (West-of-N, issue 24): ``--reward_model DIR`` (a reward/train_rm.py run) labels each candidate
with the reward model's score instead of its SCS against the true prompt, so pairs need no known prompt: the
triplets may lack ``rewrite_prompt`` (then ``--split_by id``), and ``--min_margin`` is in reward units. E.g. the
policy's own samples only, best against worst of N:

    python data_generation/build_pairs.py --candidates DIR/candidates.parquet --reward_model checkpoints/reward/RUN \
        --strategy best_vs_worst --min_margin 0 --max_pairs_per_example 1
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from promptrec import drift as D
from promptrec import pairs as P
from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.plots import figure
from promptrec.policy import DEFAULT_MAX_TEXT_TOKENS, resolve_policy
from promptrec.resumable import dist_info, run_sharded, write_manifest
from promptrec.run_config import RUN_CONFIG, override_field
from promptrec.scoring import ScorerArguments
from promptrec.splits import SPLIT_BY, eval_mask, with_prompt_clusters
from promptrec.tables import PAIR_COLUMNS, DataError, read_table, write_json, write_table
from promptrec.templates import preference_example, recovery_answer

logger = logging.getLogger("build_pairs")


@dataclass
class PairArguments(ScorerArguments):
    """How candidates are scored (the scorer's options: ``--scorer``, ``--scs_exponent`` …), paired and split."""

    candidates: str = field(default="checkpoints/data/smollm2/candidates.parquet", metadata={
        "help": "Candidates from candidates.py (id, candidate, source)."})
    triplets: str | None = field(default=None, metadata={
        "help": "Triplets with ids (default: triplets.parquet beside the candidates)."})
    output_dir: str | None = field(default=None, metadata={"help": "Output folder (default: pairs/ beside them)."})
    strategy: str = field(default="best_vs_worst", metadata={"help": f"One of {', '.join(P.STRATEGIES)}."})
    min_margin: float = field(default=0.1, metadata={
        "help": "Smallest score_chosen - score_rejected kept (SCS units; reward units with --reward_model)."})
    k: int = field(default=2, metadata={"help": "k of topk_bottomk."})
    max_pairs_per_example: int | None = field(default=4, metadata={"help": "Cap per example (largest margins)."})
    allow_true_chosen: bool = field(default=True, metadata={"help": "May the true prompt be the chosen side?"})
    rejected_sources: list[str] = field(default_factory=list, metadata={
        "help": "Only these candidate sources may be rejected, e.g. policy (on-policy pairs); empty: any."})
    chosen_sources: list[str] = field(default_factory=list, metadata={
        "help": "Only these candidate sources may be chosen; with --rejected_sources policy too: self-play pairs "
                "(the policy's best sample against its worst); empty: any."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer of the model DPO will train (texts are cut to max_text_tokens of its tokens). Default: "
                "that of the policy candidates.manifest.json names (the SFT run), else embedded."})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "Each text is cut to this many tokens in the prompt. Default: the run_config.json of the SFT run "
                "candidates.manifest.json names (a value given must agree with it), else 256."})
    allow_config_override: bool = override_field()
    reward_model: str | None = field(default=None, metadata={
        "help": "Label candidates by this reward model (a reward/train_rm.py run) instead of SCS against the true "
                "prompt: West-of-N pairs, for texts without a known prompt."})
    reward_base: str | None = field(default=None, metadata={
        "help": "With --reward_model: a local copy of its base (offline); default: the base its run recorded."})
    split_by: str = field(default="prompt", metadata={"help": f"Group kept on one side: {', '.join(SPLIT_BY)}."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of groups in eval."})
    cluster_threshold: float = field(default=0.85, metadata={
        "help": "split_by=cluster: prompts with cosine ≥ this (transitively) form one group."})
    seed: int = field(default=42, metadata={"help": "Split seed."})
    drop_shared_prefix_tokens: int = field(default=0, metadata={
        "help": "Drift control: drop pairs whose chosen and rejected answers start with the same this many tokens "
                "(of the tokenizer the prompts are rendered with); 0: off."})
    max_opening_share: float = field(default=1.0, metadata={
        "help": "Drift control: no opening word may start more than this share of a side's chosen answers; pairs "
                "of a word above it are dropped, smallest margin first; 1: off."})

    def __post_init__(self):
        for name, choices in (("strategy", P.STRATEGIES), ("split_by", SPLIT_BY)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, not {getattr(self, name)!r}")
        if self.min_margin < 0 or self.k < 1 or not 0 <= self.eval_fraction < 1:
            raise ValueError("min_margin must be >= 0, k >= 1 and eval_fraction in [0, 1)")
        if self.drop_shared_prefix_tokens < 0:
            raise ValueError(f"drop_shared_prefix_tokens must be >= 0 (0 = off), not {self.drop_shared_prefix_tokens}")
        if not 0 < self.max_opening_share <= 1:
            raise ValueError(f"max_opening_share must be in (0, 1] (1 = off), not {self.max_opening_share}")
        cand = Path(self.candidates)
        self.triplets = self.triplets or str(cand.with_name("triplets.parquet"))
        self.output_dir = self.output_dir or str(cand.with_name("pairs"))


def load_examples(args: PairArguments) -> pd.DataFrame:
    """One row per triplet with its candidate and source lists (triplets without candidates are dropped); the
    ``--rejected_sources`` and ``--chosen_sources`` must be among the candidates' sources. With ``--reward_model``
    the triplets need no ``rewrite_prompt`` (then they are split by id)."""
    cands = read_table(args.candidates, required=("id", "candidate", "source"), text_columns=("candidate", "source"))
    triplets = read_table(args.triplets, required=("id", "original_text", "rewritten_text"))
    if "rewrite_prompt" not in triplets.columns:
        triplets["rewrite_prompt"] = None
    unknown_prompt = triplets["rewrite_prompt"].isna()
    if unknown_prompt.any() and (not args.reward_model or args.split_by != "id"):
        raise DataError(f"{args.triplets}: row {int(unknown_prompt.to_numpy().nonzero()[0][0]) + 1} has no "
                        "rewrite_prompt: SCS labels and a split by prompt need the true prompt (texts without one: "
                        "--reward_model DIR --split_by id)")
    cands["id"], triplets["id"] = cands["id"].astype(str), triplets["id"].astype(str)
    unknown = set(cands["id"]) - set(triplets["id"])
    if unknown:
        raise DataError(f"{args.candidates}: {len(unknown)} id(s) not in {args.triplets}, e.g. {min(unknown)}")
    present = set(cands["source"])
    for flag in ("rejected_sources", "chosen_sources"):
        wanted = getattr(args, flag)
        if wanted and not present & set(wanted):
            raise DataError(f"{args.candidates}: no candidate has source {wanted} (--{flag}); "
                            f"sources there: {sorted(present)}")
    grouped = cands.groupby("id", sort=False).agg(candidates=("candidate", list), sources=("source", list))
    return triplets.merge(grouped, left_on="id", right_index=True, how="inner").reset_index(drop=True)


def labeller(args: PairArguments, scorer) -> tuple[dict, Callable[[pd.DataFrame], list]]:
    """(identity, label): what labels the candidates and the function giving a block of examples' label arrays,
    one score per candidate: SCS against the true prompt, or with ``--reward_model`` the reward model's score."""
    if not args.reward_model:
        return scorer.identity, lambda rows: scorer.score_candidates(rows["candidates"].tolist(),
                                                                     rows["rewrite_prompt"].tolist())
    from promptrec.predict import load_rewarder

    rm = load_rewarder(args.reward_model, base=args.reward_base, allow_override=args.allow_config_override)
    identity = {"model": "reward_model", "reward_model": str(Path(args.reward_model).resolve()),
                "base": rm.run.model_name_or_path if rm.run else None}
    return identity, lambda rows: rm.score(rows["original_text"].tolist(), rows["rewritten_text"].tolist(),
                                           rows["candidates"].tolist())


def score_examples(args: PairArguments, labels: tuple[dict, Callable], examples: pd.DataFrame, parts_dir: Path,
                   chunk: int = 256) -> pd.DataFrame | None:
    """Label every example's candidates (``labels``: :func:`labeller`'s), ``chunk`` examples at a time, resumably
    and sharded over processes; the scored rows (``id, candidates, sources, scores``) on rank 0."""
    who, label = labels
    identity = parts_dir / "scorer.json"
    if identity.exists() and json.loads(identity.read_text(encoding="utf-8")) != who:
        raise DataError(f"{parts_dir} holds scores from another scorer ({identity.read_text().strip()}); "
                        "use a new --output_dir")
    if dist_info()[0] == 0:
        write_json(who, identity)

    def work(todo, writer):
        for start in tqdm(range(0, len(todo), chunk), desc="score", unit="chunk"):
            rows = examples.iloc[todo[start:start + chunk]]
            scores = label(rows)
            writer.append({"id": i, "candidates": c, "sources": s, "scores": sc.tolist()}
                          for i, c, s, sc in zip(rows["id"], rows["candidates"], rows["sources"], scores))

    return run_sharded(examples["id"].tolist(), parts_dir, work, "score")


def prompt_format(args: PairArguments) -> tuple[str, int | None]:
    """(tokenizer, text budget) to render the pairs' prompts in: those of the policy the candidates sampled, which
    ``candidates.manifest.json`` names. An SFT run (the one DPO starts from) is read through
    :func:`promptrec.policy.resolve_policy` (``--max_text_tokens`` must agree with its RunConfig); a base policy
    alone gives the flags, else its name and 256. A ``--tokenizer`` other than the sampled run's base stops."""
    manifest = Path(args.candidates).with_name("candidates.manifest.json")
    recorded = (json.loads(manifest.read_text(encoding="utf-8")).get("policy") if manifest.is_file() else None) or {}
    kept = manifest.with_name("policy")  # candidates.py's copy of the policy's run config and tokenizer
    if recorded.get("adapter"):
        source = str(kept) if (kept / RUN_CONFIG).is_file() else recorded["adapter"]  # older candidate folders
        policy = resolve_policy(adapter=source, max_text_tokens=args.max_text_tokens, load_in_4bit=False,
                                allow_override=args.allow_config_override)
        if args.tokenizer not in (None, policy.model, policy.tokenizer_source) and not args.allow_config_override:
            raise DataError(f"--tokenizer {args.tokenizer!r} given, but {args.candidates} was sampled from "
                            f"{policy.model!r} ({manifest}): pairs are rendered in the policy's format (drop "
                            "--tokenizer, or pass --allow_config_override true)")
        return args.tokenizer or policy.tokenizer_source, policy.max_text_tokens
    budget = args.max_text_tokens if args.max_text_tokens is not None else recorded.get(
        "max_text_tokens", DEFAULT_MAX_TEXT_TOKENS)
    return args.tokenizer or recorded.get("model") or "embedded", budget


def example_pairs(args: PairArguments, example: dict, strategy: str | None = None) -> list[dict]:
    """:func:`promptrec.pairs.build_pairs` of one scored example with the flags' settings (``strategy``: another)."""
    return P.build_pairs(example["candidates"], example["scores"], strategy or args.strategy, args.min_margin,
                         sources=example["sources"], k=args.k, max_pairs=args.max_pairs_per_example,
                         allow_true_chosen=args.allow_true_chosen, true_prompt=example["rewrite_prompt"],
                         rejected_sources=args.rejected_sources, chosen_sources=args.chosen_sources)


def pair_row(args: PairArguments, example: dict, pair: dict, tokenizer) -> dict:
    """One pair of ``example`` as a TRL conversational preference row plus its id, scores and sources."""
    rendered = preference_example(example["original_text"], example["rewritten_text"], pair["chosen"],
                                  pair["rejected"], tokenizer, args.max_text_tokens)
    return {"id": example["id"], **rendered,
            **{k: pair[k] for k in ("score_chosen", "score_rejected", "source_chosen", "source_rejected")}}


def side_pairs(args: PairArguments, examples: pd.DataFrame, tokenizer) -> tuple[pd.DataFrame, dict]:
    """The pairs of one split side's scored ``examples`` as :data:`PAIR_COLUMNS` rows, after the drift controls
    (:func:`promptrec.drift.drift_controls` with the flags' settings; tokens are ``tokenizer``'s of the answers as
    rendered), and what those dropped."""
    pairs = [{**p, "example": ex} for ex in examples.to_dict(orient="records") for p in example_pairs(args, ex)]

    def tokenize(texts: list[str]) -> list[list[int]]:
        answers = [recovery_answer(t)[0]["content"] for t in texts]
        return tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []

    kept, dropped = D.drift_controls(pairs, tokenize, args.drop_shared_prefix_tokens, args.max_opening_share)
    rows = [pair_row(args, p["example"], p, tokenizer) for p in kept]
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS)), dropped


def summarize(args: PairArguments, scored: pd.DataFrame, train: pd.DataFrame, evals: pd.DataFrame,
              labelled_by: dict, dropped: dict) -> dict:
    """Counts, margins and sources of the pairs, mean score per candidate source, what each strategy gives, and the
    drift controls: their settings, what they dropped per side (``dropped``) and the chosen answers' opening words
    (:func:`promptrec.drift.drift_summary`) per side."""
    both = pd.concat([train, evals])  # both have every PAIR_COLUMNS column, rows or not
    examples = scored.to_dict(orient="records")
    per_strategy = {s: sum(len(example_pairs(args, ex, s)) for ex in examples) for s in P.STRATEGIES}
    long = scored[["sources", "scores"]].explode(["sources", "scores"]).astype({"scores": float})
    return {"pairs": len(both), "train_pairs": len(train), "eval_pairs": len(evals), "examples": len(scored),
            "examples_with_pairs": int(both["id"].nunique()), "train_examples": int(train["id"].nunique()),
            "eval_examples": int(evals["id"].nunique()), "strategy": args.strategy, "pairs_per_strategy": per_strategy,
            "margin": P.margin_stats(both["score_chosen"] - both["score_rejected"]),
            "sources": P.source_counts(both.to_dict(orient="records")),
            "mean_score_per_source": long.groupby("sources")["scores"].mean().round(4).to_dict(),
            "scorer": labelled_by, "split": {"by": args.split_by, "eval_fraction": args.eval_fraction,
                                                 "seed": args.seed},
            "drift_controls": {"drop_shared_prefix_tokens": args.drop_shared_prefix_tokens,
                               "max_opening_share": args.max_opening_share, "dropped": dropped,
                               "chosen_openings": {side: D.drift_summary([m[0]["content"] for m in df["chosen"]])
                                                   for side, df in (("train", train), ("eval", evals))}}}


def plot_margins(train: pd.DataFrame, evals: pd.DataFrame, path: Path, title: str) -> None:
    with figure(path) as (ax,):
        for df, name in ((train, "train"), (evals, "eval")):
            if len(df):
                margins = df["score_chosen"] - df["score_rejected"]
                ax.hist(margins, bins=40, range=(0, max(1.0, float(margins.max()))), alpha=0.6,
                        label=f"{name} ({len(df)})")
        ax.set(xlabel="margin = score_chosen − score_rejected (SCS)", ylabel="pairs", title=title)
        ax.legend()


def main(args: PairArguments) -> dict | None:
    from promptrec.models import load_tokenizer

    out = Path(args.output_dir)
    start = time.time()
    examples = load_examples(args)
    scorer = args.build()
    labels = labeller(args, scorer)
    parts = score_examples(args, labels, examples, out / "scores.parts")
    if parts is None:  # not rank 0
        return None

    scored = examples.drop(columns=["candidates", "sources"]).merge(parts, on="id", how="inner")
    scored_at = time.time()
    tokenizer_name, args.max_text_tokens = prompt_format(args)
    tokenizer = load_tokenizer(tokenizer_name)
    logger.info("Pair prompts rendered with %s's tokenizer, texts cut to %s tokens", tokenizer_name,
                args.max_text_tokens)
    clustered = args.split_by == "cluster"  # near-identical prompts (by embedding) form one group, on one side
    groups = with_prompt_clusters(scored, scorer.encode, args.cluster_threshold) if clustered else scored
    is_eval = eval_mask(groups, args.eval_fraction, args.split_by, args.seed)
    (train, train_dropped), (evals, eval_dropped) = (side_pairs(args, scored[mask], tokenizer)
                                                     for mask in (~is_eval, is_eval))
    dropped = {"train": train_dropped, "eval": eval_dropped}
    if args.drop_shared_prefix_tokens or args.max_opening_share < 1:
        logger.info("Drift controls dropped %s", dropped)
    write_table(train, out / "train.jsonl")
    write_table(evals, out / "eval.jsonl")
    write_table(scored[["id", "candidates", "sources", "scores"]].explode(["candidates", "sources", "scores"])
                .rename(columns={"candidates": "candidate", "sources": "source", "scores": "score"}),
                out / "scores.parquet")
    summary = write_manifest(out / "summary.json", start, **summarize(args, scored, train, evals, labels[0], dropped),
                             seconds_pairs=round(time.time() - scored_at, 1), tokenizer=tokenizer_name,
                             max_text_tokens=args.max_text_tokens, config=asdict(args))
    plot_margins(train, evals, out / "margins.png", f"{args.strategy}, min_margin {args.min_margin}, "
                 f"labels {labels[0]['model']}")
    if len(train):
        logger.info("Sample pair:\n%s", train.iloc[0].to_dict())
    logger.info("%d pairs (%d train, %d eval) from %d examples; margin %s; chosen %s → %s", summary["pairs"],
                len(train), len(evals), len(scored), summary["margin"], summary["sources"]["chosen"], out)
    return summary


if __name__ == "__main__":
    setup_logging()
    (script_args,) = parse_args(PairArguments)
    run_main(lambda: main(script_args))
