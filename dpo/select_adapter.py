"""Pick what a preference-optimisation round ships, on validation rows: SFT, the round's checkpoints, or an
interpolation of the LoRA update between SFT and the round's adapter (issue 23; the rule is fixed in
docs/po_selection.md and :mod:`promptrec.po_select`).

    python dpo/select_adapter.py --sft_adapter RUN/sft --po_run RUN/dpo --validation RUN/split/validation.parquet \\
        --mean_prompt RUN/mean_prompt/mean_prompt.json --output_dir RUN/dpo/selected

The base model is loaded once with the SFT adapter; the start adapter (``--start_adapter``, a later round's), each
``checkpoint-N`` of ``--po_run`` and the run's final adapter are loaded beside it, and each α of ``--alphas`` is built
with PEFT's ``add_weighted_adapter`` (``cat``). Every candidate decodes the validation rows greedily and is
post-processed exactly as ``inference/predict.py`` does for the test rows, then scored by SCS against the truth.
The highest mean wins; ties go to SFT, then to fewer steps and smaller α. Nothing here reads a test row.

Output ``output_dir``: the chosen adapter as a complete run folder (adapter, tokenizer, ``run_config.json`` with a
``selection`` section, ``split.parquet``), ``selection.json`` (every candidate's validation mean, its paired
difference to SFT with a prompt-cluster bootstrap interval, its opening-word drift against SFT, the pick and why,
seconds per candidate) and ``validation_predictions.parquet``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.drift import drift_summary
from promptrec.generation import SamplingParams, default_batch_size
from promptrec.model_card import write_model_card
from promptrec.models import generation_dtype
from promptrec.po_select import (
    SFT,
    Candidate,
    active_adapter,
    adapter_name,
    choose,
    describe,
    grid,
    interpolate,
    selection_table,
)
from promptrec.policy import MERGE_HELP, check_merge_choice, load_policy, resolve_policy, should_merge
from promptrec.postprocess import PostprocessConfig, resolve_mean_prompt
from promptrec.predict import predict_frame
from promptrec.prediction_cache import adapter_digest, cache_key, cached, remember
from promptrec.run_config import RUN_CONFIG, read_run_config
from promptrec.scoring import ScorerArguments
from promptrec.splits import CLUSTER_COLUMN
from promptrec.tables import TRIPLET_COLUMNS, DataError, file_digest, read_table, require_path, write_json, write_table

logger = logging.getLogger("select")
CHECKPOINT = "checkpoint-"
NOT_COPIED = ("DONE", "stage.json", "log.txt")  # the pipeline's bookkeeping when a run folder is a stage folder


@dataclass
class SelectArguments(ScorerArguments):
    sft_adapter: str = field(default="checkpoints/sft/smollm2", metadata={
        "help": "The SFT run: always a candidate, and the anchor of the interpolations."})
    po_run: str = field(default="checkpoints/dpo/smollm2", metadata={
        "help": "The preference-optimisation run (dpo/train.py output_dir): its final adapter and its checkpoint-N "
                "folders are candidates."})
    start_adapter: str | None = field(default=None, metadata={
        "help": "The adapter the round started from, when not SFT (a later DPO round): also a candidate."})
    validation: str = field(default="checkpoints/pipeline/smollm2/split/validation.parquet", metadata={
        "help": "Validation triplets (id, original_text, rewrite_prompt, rewritten_text; prompt_cluster for a "
                "cluster bootstrap). Never the test rows."})
    mean_prompt: str | None = field(default=None, metadata={
        "help": "Mean prompt (string or reward/mean_prompt.py's JSON) that stands in for unusable answers, as in "
                "predict."})
    output_dir: str = field(default="checkpoints/dpo/smollm2/selected", metadata={"help": "Where the pick goes."})
    alphas: str = field(default="0.25,0.5,0.75", metadata={
        "help": "Comma-separated interpolation weights α in (0, 1) of ΔW = (1-α)ΔW_SFT + αΔW_PO; empty: none."})
    checkpoints: bool = field(default=True, metadata={
        "help": "Score the run's checkpoint-N folders too (else only its final adapter)."})
    max_rows: int | None = field(default=None, metadata={"help": "Score only the first N validation rows."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest prediction in tokens (predict's default)."})
    batch_size: int = field(default_factory=default_batch_size, metadata={"help": "Rows per generate() call."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype, as predict's --dtype."})
    merge_adapter: str = field(default="false", metadata={"help": MERGE_HELP + (
        " Each candidate is merged for its decode, and the base restored from a copy after it. With CUDA the policy "
        "loads in 4-bit: never merged.")})
    seed: int = field(default=42, metadata={"help": "Seed of the bootstrap."})
    prediction_cache: str = field(default="auto", metadata={
        "help": "Folder of validation predictions keyed by the adapter file's digest and every setting that decides "
                "them, so SFT (and a later round's start) is decoded once per run, not once per selection; 'auto': "
                "select_cache/ beside --sft_adapter (shared by every round and the control); 'none': off."})

    def __post_init__(self):
        check_merge_choice(self.merge_adapter)

    def weights(self) -> list[float]:
        try:
            return [float(x) for x in self.alphas.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--alphas must be comma-separated numbers in (0, 1), not {self.alphas!r}") from None


def checkpoint_steps(po_run: Path) -> dict[int, Path]:
    """``{step: folder}`` of the run's ``checkpoint-N`` folders that hold an adapter."""
    found = {}
    for d in po_run.glob(f"{CHECKPOINT}*"):
        if d.name[len(CHECKPOINT):].isdigit() and (d / "adapter_model.safetensors").is_file():
            found[int(d.name[len(CHECKPOINT):])] = d
    return dict(sorted(found.items()))


def final_step(po_run: Path, steps: dict[int, Path]) -> int:
    """The step of the run's final adapter: ``global_step`` in its metrics.json (training.save_run records it; a
    time-limited run may stop between checkpoints), else the last checkpoint's."""
    metrics = po_run / "metrics.json"
    if metrics.is_file():
        step = json.loads(metrics.read_text()).get("train", {}).get("global_step")
        if step:
            return int(step)
    return max(steps, default=0)


def cache_folder(args: SelectArguments) -> Path | None:
    if args.prediction_cache == "none":
        return None
    return Path(args.sft_adapter).parent / "select_cache" if args.prediction_cache == "auto" else Path(
        args.prediction_cache)


def candidate_key(candidate: Candidate, settings: dict) -> str | None:
    """The prediction-cache key of a candidate's greedy validation predictions: its adapter file's bytes and
    ``settings`` (validation file, rows, base, dtype, batch, length, mean prompt). None for an interpolation (built
    in memory)."""
    digest = adapter_digest(candidate.path) if candidate.path else None
    return cache_key(digest, settings) if digest else None


def read_validation(args: SelectArguments) -> pd.DataFrame:
    df = read_table(args.validation, required=TRIPLET_COLUMNS, text_columns=TRIPLET_COLUMNS)
    if "id" not in df.columns:
        raise DataError(f"{args.validation}: no 'id' column")
    return df.head(args.max_rows) if args.max_rows else df


def ship(pick: Candidate, model, args: SelectArguments, summary: dict) -> Path:
    """Write the picked adapter as a complete run folder in ``output_dir``."""
    out, po = Path(args.output_dir), Path(args.po_run)
    source = {"sft": Path(args.sft_adapter), "start": Path(args.start_adapter or args.sft_adapter)}.get(pick.kind, po)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    for f in source.iterdir():  # the run's files (tokenizer, run config, split rows, metrics), not its checkpoints
        if f.is_file() and f.name not in NOT_COPIED:
            shutil.copy2(f, tmp / f.name)
    if pick.kind == "checkpoint" and pick.path:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(Path(pick.path) / name, tmp / name)
    if pick.kind == "interpolation":
        with tempfile.TemporaryDirectory() as saved:
            model.save_pretrained(saved, selected_adapters=[adapter_name(pick)])
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(Path(saved) / adapter_name(pick) / name, tmp / name)
    config = read_run_config(tmp)
    lora = model.peft_config[adapter_name(pick)]
    if pick.kind == "interpolation":
        config = replace(config, lora_r=lora.r, lora_alpha=lora.lora_alpha)
    config = replace(config, sections={**config.sections, "selection": summary})
    config.save(tmp)
    write_json(summary, tmp / "selection.json")
    if pick.kind in ("checkpoint", "interpolation") and pick.path != str(po):  # not the run's final adapter
        (tmp / "eval_predictions.jsonl").unlink(missing_ok=True)  # those were the final adapter's
        metrics = json.loads((tmp / "metrics.json").read_text()) if (tmp / "metrics.json").is_file() else {}
        metrics = {"shipped": pick.name, "note": f"the run's metrics are its final adapter's; {pick.name} ships",
                   "run": metrics}
        write_json(metrics, tmp / "metrics.json")
        write_model_card(tmp, config, metrics)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(args: SelectArguments) -> dict:
    setup_logging()
    po, sft = require_path(args.po_run, "directory"), require_path(args.sft_adapter, "directory")
    require_path(str(Path(args.po_run) / RUN_CONFIG), "file", hint="--po_run must be a finished DPO/GRPO run")
    validation = read_validation(args)
    scorer = args.build()
    post = PostprocessConfig(**({"mean_prompt": args.mean_prompt} if args.mean_prompt else {}))
    post = replace(post, mean_prompt=resolve_mean_prompt(post.mean_prompt))

    steps = checkpoint_steps(Path(po))
    last = final_step(Path(po), steps)
    steps = steps if args.checkpoints else {}
    candidates = grid([s for s in steps if s < last], last, args.weights(), start_is_sft=args.start_adapter is None)
    paths = {f"step{s}": str(d) for s, d in steps.items()} | {f"step{last}": str(po), SFT: str(sft)}
    if args.start_adapter:
        paths["start"] = args.start_adapter
    candidates = [replace(c, path=paths.get(c.name)) for c in candidates]
    logger.info("Candidates on %d validation rows: %s", len(validation), [c.name for c in candidates])

    policy = resolve_policy(adapter=str(sft))
    merge = should_merge(policy, args.merge_adapter)
    model, tokenizer = load_policy(policy, generation_dtype(args.dtype))
    final = f"step{last}"
    for c in candidates:
        if c.kind in ("start", "checkpoint"):
            model.load_adapter(c.path, adapter_name=adapter_name(c), is_trainable=False)
        elif c.kind == "interpolation":
            interpolate(model, "default", final, c.alpha, adapter_name(c))

    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed)
    folder = cache_folder(args)
    settings = {"validation": file_digest(Path(args.validation)), "rows": args.max_rows, "base": policy.model,
                "dtype": str(generation_dtype(args.dtype)), "batch": args.batch_size, "tokens": args.max_new_tokens,
                "text_tokens": policy.max_text_tokens, "mean_prompt": post.mean_prompt}
    if merge:  # merged decodes may differ by float rounding: their own cache entries (unmerged keys stay as they were)
        settings["merged"] = True
    scores, predictions, seconds, reused = {}, {}, {}, []
    for c in candidates:
        start, key = time.time(), candidate_key(c, settings)
        predictions[c.name] = cached(folder, key, len(validation))
        if predictions[c.name] is None:
            with active_adapter(model, adapter_name(c), merge):
                frame = predict_frame(validation, model, tokenizer, post, params, args.batch_size,
                                      policy.max_text_tokens, progress=True)
            predictions[c.name] = frame["rewrite_prompt"].tolist()
            remember(folder, key, c.path, predictions[c.name])
        else:
            reused.append(c.name)
        scores[c.name] = scorer.score(predictions[c.name], validation["rewrite_prompt"].tolist())
        seconds[c.name] = round(time.time() - start, 1)
        logger.info("%s: validation SCS %.4f (%d rows, %.1f s%s)", c.name, scores[c.name].mean(), len(validation),
                    seconds[c.name], ", predictions reused" if c.name in reused else "")

    order = [c.name for c in candidates]
    decoded = [t for n, t in seconds.items() if n not in reused]  # the unit cost: decoding, not a cache read
    pick = next(c for c in candidates if c.name == choose({n: float(s.mean()) for n, s in scores.items()}, order))
    groups = validation[CLUSTER_COLUMN].to_numpy() if CLUSTER_COLUMN in validation.columns else None
    table = selection_table(scores, order, groups=groups, seed=args.seed)
    for row in table:
        row |= {"seconds": seconds[row["name"]], "drift": drift_summary(predictions[row["name"]], predictions[SFT])}
    summary = {"picked": pick.name, "kind": pick.kind, "candidates": describe(candidates), "validation": table,
               "n_validation": len(validation), "validation_file": str(args.validation), "scorer": scorer.identity,
               "reason": ("no candidate beat SFT on validation: SFT shipped" if pick.kind == "sft" else
                          f"{pick.name} had the highest mean validation SCS"),
               "seconds_per_candidate": round(float(np.mean(decoded or [0])), 1), "merged": merge,
               "reused_predictions": reused}
    out = ship(pick, model, args, summary)
    write_table(validation[["id", "rewrite_prompt"]].assign(**{f"pred_{n}": p for n, p in predictions.items()}),
                out / "validation_predictions.parquet")
    logger.info("Picked %s (%s); wrote %s", pick.name, summary["reason"], out)
    for row in table:
        print(f"  {row['name']:>10}: {row['mean']:.4f}  vs SFT {row['diff_vs_sft']:+.4f} "
              f"({row['ci_low']:+.4f} … {row['ci_high']:+.4f}){'  ← picked' if row['name'] == pick.name else ''}",
              flush=True)
    return summary


if __name__ == "__main__":
    (select_args,) = parse_args(SelectArguments)
    run_main(lambda: main(select_args))
