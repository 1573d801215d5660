"""Batch prediction for the competition's ``test.csv``: validate, load the policy, generate, post-process, write.

One code path for ``inference/predict.py`` and ``inference/kaggle_inference.ipynb`` (which builds the same
:class:`PredictArguments` and calls :func:`predict_file`); nothing here imports TRL, so the notebook needs only
transformers and peft (except to load a reward model, which imports TRL). Input: ``id, original_text,
rewritten_text``. Output: ``id, rewrite_prompt`` (every input id once, in input order, never a blank prompt), written
atomically with the resolved config in ``<stem>.config.json``.
``selection="mbr"`` (plus sentence-transformers) picks, among the cleaned greedy answer, mean prompt and sampled
answers, the one with the highest mean SCS to the others (:mod:`promptrec.selection`), then post-processes it.
``selection="reward"`` picks among the same candidates by a learned reward model (``reward_model``, a
reward/train_rm.py run, loaded by :mod:`promptrec.reward_model` only then); ``"reward_mbr"`` by reward plus
``mbr_weight`` times consensus, each z-scored within the row (:func:`promptrec.selection.rerank_scores`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from promptrec import generation, models, templates
from promptrec import policy as policy_module
from promptrec.environment import cpu_model, describe_environment, library_versions, model_dtype
from promptrec.generation import SamplingParams, default_batch_size, generate
from promptrec.models import generation_dtype
from promptrec.policy import (
    DEFAULT_MAX_TEXT_TOKENS,
    MERGE_HELP,
    Policy,
    check_merge_choice,
    load_policy,
    policy_of,
    should_merge,
)
from promptrec.postprocess import PostprocessConfig, clean_prediction, finalize, resolve_mean_prompt
from promptrec.prediction_cache import adapter_digest, cache_key, cached, model_files, remember, tokenizer_digests
from promptrec.run_config import override_field
from promptrec.scoring import Scorer, ScorerArguments
from promptrec.selection import CANDIDATE_SELECTIONS, Rewarder, SelectionRule, mbr_frame, mbr_pick_counts
from promptrec.tables import (
    SUBMISSION_COLUMNS,
    TEST_COLUMNS,
    DataError,
    file_digest,
    read_table,
    require_path,
    write_json,
    write_table,
)
from promptrec.templates import recovery_messages

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("original_text", "rewritten_text")
SELECTIONS = ("greedy", *CANDIDATE_SELECTIONS)
# What --raw_output adds, when present, for a selection among candidates (promptrec.selection.mbr_frame).
CANDIDATE_COLUMNS = ("raw_samples", "candidates", "mbr_scores", "rewards", "selected_index", "selected")


@dataclass
class PredictArguments(ScorerArguments):
    """Where the test rows come from, which policy predicts them and how it decodes. The scorer's options
    (``--scorer`` …) are used by every selection but greedy (on Kaggle: ``--scorer`` the attached sentence-t5-base)."""

    input: str = field(default="test.csv", metadata={
        "help": "Test table with columns id, original_text, rewritten_text (.csv, .jsonl, .parquet or hf:<name>)."})
    output: str = field(default="submission.csv", metadata={
        "help": "Submission to write: id,rewrite_prompt (atomically; resolved config in <stem>.config.json)."})
    model: str | None = field(default=None, metadata={
        "help": "Base model: hub id, local dir, merged model dir or 'embedded'. Default: the model_name_or_path "
                "recorded in the adapter's run_config.json (else adapter_config.json), or 'embedded' without one. "
                "With an adapter it must be that base or a local copy of it (same config)."})
    adapter: str | None = field(default=None, metadata={
        "help": "PEFT adapter dir, e.g. checkpoints/sft/<run> (its tokenizer and run_config.json are used)."})
    load_in_4bit: bool | None = field(default=None, metadata={
        "help": "true/false: load the base model in 4-bit NF4 (with the run's recorded 4-bit settings). Default: "
                "4-bit when the run trained in 4-bit or CUDA is available, else full precision."})
    dtype: str = field(default="auto", metadata={
        "help": "Compute dtype: auto (bf16/fp16 on a GPU, fp32 on a CPU), auto_bf16 (bf16 on a CPU with bf16 "
                "instructions: ~1.8x the rows/s there, -0.0065 SCS measured; docs/fast_cpu_path.md), bfloat16, "
                "float16 or float32."})
    merge_adapter: str = field(default="false", metadata={"help": MERGE_HELP})
    batch_size: int = field(default_factory=default_batch_size, metadata={
        "help": "Rows per generate() call (length-sorted batches). Default: 32 on a CPU, 8 on a GPU."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest prediction in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (default); > 0: sample at this temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (used when temperature > 0)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})
    kv_cache: Literal["auto", "static", "dynamic"] = field(default="auto", metadata={
        "help": "KV cache of generate: auto (static on a CPU, ~15% faster there; the library's default on a GPU), "
                "static (on a GPU transformers then compiles the forward of an unquantised model) or dynamic."})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "Token budget per text in the recovery prompt. Default: max_text_tokens from run_config.json, "
                f"else {DEFAULT_MAX_TEXT_TOKENS}; with an adapter it must agree with the run's."})
    allow_config_override: bool = override_field()
    nan_texts: Literal["error", "fallback"] = field(default="error", metadata={
        "help": "A row whose original_text or rewritten_text is NaN/empty: 'error' stops with the row named; "
                "'fallback' predicts the mean prompt for it without calling the model."})
    raw_output: str | None = field(default=None, metadata={
        "help": "Optional table of id, raw_prediction, rewrite_prompt, to inspect the post-processing."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    selection: Literal["greedy", "mbr", "reward", "reward_mbr"] = field(default="greedy", metadata={
        "help": "'greedy': submit the policy's answer. The others pick among the answer, the mean prompt and "
                "--num_candidates samples: 'mbr' the candidate with the highest mean SCS to the others, 'reward' the "
                "one with the highest reward (--reward_model), 'reward_mbr' the highest z(reward) + --mbr_weight * "
                "z(mbr score), z-scored within the row."})
    num_candidates: int = field(default=8, metadata={
        "help": "With a selection other than greedy: sampled answers per row, besides the greedy answer and the mean "
                "prompt (so up to num_candidates + 1 generations per row)."})
    mbr_temperature: float = field(default=0.8, metadata={
        "help": "With a selection other than greedy: sampling temperature of the extra candidates (--top_p applies "
                "to them too)."})
    concat_top_k: int = field(default=1, metadata={
        "help": "With a selection other than greedy: submit the top-k distinct candidates joined by spaces (1: the "
                "pick alone)."})
    reward_model: str | None = field(default=None, metadata={
        "help": "A reward/train_rm.py run dir: needed by --selection reward and reward_mbr; with --selection mbr the "
                "rewards are recorded in --raw_output too (the pick stays MBR's)."})
    reward_base: str | None = field(default=None, metadata={
        "help": "A local copy of the reward model's base (offline, e.g. a Kaggle dataset); default: the base its "
                "run_config.json records. Checked against the run's fingerprint of that base."})
    mbr_weight: float = field(default=1.0, metadata={
        "help": "With --selection reward_mbr: weight w of the consensus in z(reward) + w * z(mbr score) (1.0: equal "
                "weight per standard deviation within the row; choose it on validation rows)."})
    reward_batch_size: int = field(default=16, metadata={
        "help": "Candidates per reward-model forward pass."})
    prediction_cache: str | None = field(default=None, metadata={
        "help": "Folder of greedy answers keyed by the adapter's bytes, the input rows and every setting that decides "
                "the decode (promptrec/prediction_cache.py): a policy decoded before on the same rows with the same "
                "settings is neither loaded nor decoded again (post-processing still runs). Greedy selection only; "
                "default (or 'none'): off."})

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ValueError("max_text_tokens must be >= 1")
        check_merge_choice(self.merge_adapter)
        if self.kv_cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"kv_cache must be auto, static or dynamic, not {self.kv_cache!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {self.selection!r}")
        if self.num_candidates < 1 or self.concat_top_k < 1 or self.mbr_temperature <= 0:
            raise ValueError("num_candidates and concat_top_k must be >= 1 and mbr_temperature > 0")
        if self.mbr_weight < 0 or self.reward_batch_size < 1:
            raise ValueError("mbr_weight must be >= 0 and reward_batch_size >= 1")
        if self.selection in ("reward", "reward_mbr") and not self.reward_model:
            raise ValueError(f"--selection {self.selection} needs --reward_model DIR (a reward/train_rm.py run)")
        if self.reward_model and self.selection == "greedy":
            raise ValueError("--reward_model needs --selection reward, reward_mbr or mbr (greedy has no candidates)")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, seed=self.seed,
                              kv_cache=self.kv_cache)

    def candidate_params(self) -> SamplingParams | None:
        """How the extra candidates are sampled (``num_candidates`` per row); None in greedy selection."""
        if self.selection == "greedy":
            return None
        # Another seed than sampling_params', so a sampled primary answer is not also sample 1.
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.mbr_temperature, top_p=self.top_p,
                              num_return_sequences=self.num_candidates, seed=self.seed + 1, kv_cache=self.kv_cache)

    def selection_rule(self) -> SelectionRule | None:
        """How a row's pick is made among its candidates; None in greedy selection."""
        if self.selection == "greedy":
            return None
        return SelectionRule(self.selection, self.mbr_weight, self.concat_top_k, self.reward_batch_size)

    def selection_summary(self, scorer: Scorer | None) -> dict:
        """The selection settings recorded in ``<stem>.config.json`` (picks are added once predicted)."""
        summary = {"selection": self.selection}
        if self.selection != "greedy":
            summary.update(num_candidates=self.num_candidates, mbr_temperature=self.mbr_temperature, top_p=self.top_p,
                           concat_top_k=self.concat_top_k, scorer=scorer.identity, reward_model=self.reward_model)
        if self.selection == "reward_mbr":
            summary["mbr_weight"] = self.mbr_weight
        return summary


def load_rewarder(path: str, dtype: str = "auto", base: str | None = None, allow_override: bool = False) -> Rewarder:
    """The reward model of a reward/train_rm.py run dir, computing in the policy's ``--dtype`` (its 4-bit settings
    are the run's). Imported here, so that greedy and MBR prediction never need :mod:`promptrec.reward_model`; a dir
    that is no reward-model run is its one-line DataError."""
    require_path(path, "directory", hint="--reward_model: a reward/train_rm.py run")
    from promptrec.reward_model import load_reward_model

    return load_reward_model(path, str(generation_dtype(dtype)).removeprefix("torch."), base, allow_override)


def read_test_table(path: str, nan_texts: str = "error") -> pd.DataFrame:
    """The test rows, checked: required columns, at least one row, unique non-empty ids, and (with
    ``nan_texts="error"``) non-empty texts. Raises :class:`DataError` naming the file, column and row."""
    df = read_table(path, required=TEST_COLUMNS, text_columns=TEXT_COLUMNS if nan_texts == "error" else ())
    ids = df["id"]
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    if blank.any():
        raise DataError(f"{path}: column 'id' row {int(blank.to_numpy().nonzero()[0][0]) + 1} is empty")
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].tolist()[0]
        rows = [i + 1 for i in (ids == first).to_numpy().nonzero()[0]]
        raise DataError(f"{path}: duplicate id {first!r} in rows {', '.join(map(str, rows))}; "
                        f"{int(ids.duplicated().sum())} duplicate row(s) in all")
    return df


def usable_text_mask(df: pd.DataFrame) -> pd.Series:
    """True where both texts are non-empty strings (the rows the model sees)."""
    original, rewritten = (df[col].map(lambda v: isinstance(v, str) and bool(v.strip())) for col in TEXT_COLUMNS)
    return original & rewritten


def predict_frame(test: pd.DataFrame, model, tokenizer, post: PostprocessConfig, params: SamplingParams | None = None,
                  batch_size: int | None = None, max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS,
                  progress: bool = True, samples: SamplingParams | None = None, scorer: Scorer | None = None,
                  rule: SelectionRule | None = None, reward_model: Rewarder | None = None) -> pd.DataFrame:
    """Predict every row of ``test`` (``id, original_text, rewritten_text``) → ``id, rewrite_prompt, raw_prediction,
    fallback`` in the input order. Rows with a missing text get the mean prompt without a model call
    (``raw_prediction`` empty); ``fallback`` is True where the row had text but the model's answer was unusable
    (:func:`promptrec.postprocess.unusable_reason`), so the mean prompt stands in for it. ``post.mean_prompt`` must
    already be a prompt, not a path. With ``samples`` (sampling settings of the extra candidates) the prompt is
    chosen among the candidates by ``rule`` (default MBR) with ``scorer`` (and ``reward_model``, needed by reward
    selection and otherwise only recorded), and the frame has the columns of :func:`promptrec.selection.mbr_frame`.
    """
    ok = usable_text_mask(test).to_numpy()
    rows = test[ok]
    conversations = [recovery_messages(o, r, tokenizer, max_text_tokens)
                     for o, r in zip(rows["original_text"], rows["rewritten_text"])]
    outputs = iter(generate(model, tokenizer, conversations, params or SamplingParams(), batch_size=batch_size,
                            progress=progress, desc="predict") if conversations else [])
    raw = [next(outputs)[0] if good else "" for good in ok]  # the usable rows' answers, back in their places
    sources = list(zip(test["original_text"], test["rewritten_text"]))
    if samples is None:
        return greedy_frame(test, raw, post)
    if scorer is None:
        raise ValueError("predict_frame: selection among candidates (samples=...) needs a scorer")
    sampled = iter(generate(model, tokenizer, conversations, samples, batch_size=batch_size, progress=progress,
                            desc=f"sample x{samples.num_return_sequences}") if conversations else [])
    extra = [next(sampled) if good else [] for good in ok]
    return mbr_frame(test["id"].to_numpy(), raw, extra, ok, sources, post, scorer, rule, reward_model)


def greedy_frame(test: pd.DataFrame, raw: list[str], post: PostprocessConfig) -> pd.DataFrame:
    """:func:`predict_frame`'s greedy result from the model's answers ``raw`` (one per row, "" where a text is
    missing): cleaned with the row's texts, the mean prompt standing in for an unusable one."""
    ok = usable_text_mask(test).to_numpy()
    cleaned = [clean_prediction(r, post, texts) for r, texts in zip(raw, zip(test["original_text"],
                                                                             test["rewritten_text"]))]
    return pd.DataFrame({"id": test["id"].to_numpy(), "rewrite_prompt": [finalize(c, post) for c in cleaned],
                         "raw_prediction": raw, "fallback": [good and not c for good, c in zip(ok, cleaned)]})


def greedy_cache_key(args: PredictArguments, policy: Policy, merged: bool) -> str | None:
    """The :mod:`promptrec.prediction_cache` key of ``policy``'s greedy answers to ``args.input``: the adapter's
    bytes, the tokenizer it brings, the base and how it loads, the rows, and every decoding setting, plus the code
    that renders prompts and decodes. None when the answers are not greedy (sampled or chosen among candidates) or
    the rows are no local file."""
    if args.selection != "greedy" or args.temperature > 0 or not Path(args.input).is_file():
        return None  # (an hf: dataset has no file to digest)
    adapter = adapter_digest(policy.adapter) if policy.adapter else None
    if policy.adapter and adapter is None:
        return None  # no weights file: loading fails with its own error
    settings = {"input": file_digest(args.input), "nan_texts": args.nan_texts,
                "policy": {**asdict(policy), "adapter": None}, "base_files": model_files(policy.model),
                "tokenizer": tokenizer_digests(policy.tokenizer_source), "dtype": str(generation_dtype(args.dtype)),
                "batch": args.batch_size, "tokens": args.max_new_tokens, "kv_cache": args.kv_cache, "merged": merged,
                "code": {m.__name__: file_digest(m.__file__) for m in (generation, templates, models, policy_module)},
                "machine": {"cpu": cpu_model(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                            else None, **library_versions()}}
    return cache_key(adapter, settings)


def validate_submission(submission: pd.DataFrame, ids) -> None:
    """Every id once, in order, with a non-blank prompt; raises :class:`DataError` otherwise."""
    if list(submission.columns[:2]) != list(SUBMISSION_COLUMNS):
        raise DataError(f"submission columns are {list(submission.columns)}, expected {list(SUBMISSION_COLUMNS)}")
    if list(submission["id"]) != list(ids):
        raise DataError("submission ids differ from the input ids (order or membership)")
    blank = submission["rewrite_prompt"].map(lambda v: not isinstance(v, str) or not v.strip())
    if blank.any():
        raise DataError(f"submission row {int(blank.to_numpy().nonzero()[0][0]) + 1} has a blank rewrite_prompt")


def predict_file(args: PredictArguments, post: PostprocessConfig | None = None, model=None, tokenizer=None,
                 scorer: Scorer | None = None, reward_model: Rewarder | None = None) -> pd.DataFrame:
    """Read ``args.input``, predict, post-process, write ``args.output`` (+ config JSON); return the submission.

    Pass ``model``/``tokenizer`` to reuse loaded ones (benchmarks, tests); then ``args.model``/``adapter`` are only
    recorded, and the text budget comes from ``args.max_text_tokens``. ``scorer`` (every selection but greedy)
    defaults to ``args.build()``, and ``reward_model`` to :func:`load_rewarder` of ``args.reward_model``; both are
    resolved before the policy loads, so a bad scorer name or reward model dir fails at once.
    """
    start = time.time()
    post = post or PostprocessConfig()
    test = read_test_table(args.input, args.nan_texts)  # fail on bad input before loading a model
    post = replace(post, mean_prompt=resolve_mean_prompt(post.mean_prompt))
    n_bad = int((~usable_text_mask(test)).sum())
    if n_bad:
        logger.warning("%s: %d row(s) with a NaN/empty text get the mean prompt", args.input, n_bad)
    if args.selection != "greedy" and scorer is None:
        scorer = args.build()  # loads lazily; resolving the name first fails fast on a bad one
    if args.reward_model and reward_model is None:
        reward_model = load_rewarder(args.reward_model, args.dtype, args.reward_base, args.allow_config_override)
    merged, key, raw = False, None, None  # a model passed in is used as it is, and never cached
    if model is None:
        policy = policy_of(args)
        merged = should_merge(policy, args.merge_adapter)
        resolved = policy.summary()
        key = greedy_cache_key(args, policy, merged) if args.prediction_cache not in (None, "", "none") else None
        raw = cached(args.prediction_cache, key, len(test))
        if raw is None:
            model, tokenizer = load_policy(policy, generation_dtype(args.dtype), merge=merged)
    else:
        resolved = Policy(args.model, args.adapter, args.max_text_tokens or DEFAULT_MAX_TEXT_TOKENS, None).summary()
    if raw is not None:
        logger.info("Greedy answers of this policy on these rows reused from %s (key %s): no model loaded",
                    args.prediction_cache, key)
        result = greedy_frame(test, raw, post)
    else:
        torch.manual_seed(args.seed)
        result = predict_frame(test, model, tokenizer, post, args.sampling_params(), args.batch_size,
                               resolved["max_text_tokens"], args.progress, samples=args.candidate_params(),
                               scorer=scorer, rule=args.selection_rule(), reward_model=reward_model)
        remember(args.prediction_cache, key, resolved["adapter"], result["raw_prediction"].tolist())
    submission = result[list(SUBMISSION_COLUMNS)]
    validate_submission(submission, test["id"])
    output = write_table(submission, args.output)
    selection = args.selection_summary(scorer)
    if args.selection != "greedy":
        selection["picks"] = mbr_pick_counts(result, post)
    if args.raw_output:
        extra = [c for c in CANDIDATE_COLUMNS if c in result]
        write_table(result[["id", "raw_prediction", *extra, "rewrite_prompt"]], args.raw_output)
    n_fallback = int(result["fallback"].sum())  # the model's answer unusable: the mean prompt stood in
    write_json({"args": asdict(args), "postprocess": asdict(post), "resolved": resolved, "merged_adapter": merged,
                "selection": selection, "rows": len(test), "rows_without_text": n_bad, "fallbacks": n_fallback,
                "seconds": round(time.time() - start, 2),
                "prediction_cache": {"key": key, "reused": raw is not None} if key else None,
                "environment": describe_environment(generation_dtype=model_dtype(model) if model is not None else
                                                    str(generation_dtype(args.dtype)).removeprefix("torch."))},
               output.with_name(f"{output.stem}.config.json"))
    logger.info("Wrote %d predictions to %s in %.1fs; %d of %d answers unusable → mean prompt (fallbacks), %d row(s) "
                "without text", len(submission), output, time.time() - start, n_fallback, len(test) - n_bad, n_bad)
    return submission
