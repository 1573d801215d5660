"""The main job as a table of stages: what each reads, what decides its output, and the steps that make it.

A stage is a name, the files it reads (:attr:`Stage.inputs`) and its steps (:attr:`Stage.steps`): commands of other
entry scripts (each with its recipe and overrides) or functions run here. Steps are built before anything runs, so
their settings can be compared with the stage's record (pipeline/cache.py) to decide whether the stage runs again.
A step with its own output folder (a round of the iterate stage, a DPO run, a selection, one adapter's predictions)
leaves ``DONE`` there, so a stage interrupted half-way resumes at the step it was on.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from arguments import PipelineArguments  # pipeline/arguments.py, beside this script
from cache import command_settings, read_record
from comparison import build_report
from paths import ADAPTER_FILES, RunPaths

from promptrec.corpus import REFERENCE, reference_triplets_path
from promptrec.postprocess import PostprocessConfig
from promptrec.rerank import ROWS as REWARD_ROWS
from promptrec.rerank import rerank_rows as picked
from promptrec.rerank import validation_choice
from promptrec.run_config import SPLIT_ROWS, data_licence
from promptrec.scoring import Scorer
from promptrec.splits import three_way_split, with_prompt_clusters
from promptrec.tables import DataError, read_table, write_json, write_table
from promptrec.triplets import read_triplets

logger = logging.getLogger("pipeline")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    """One unit of a stage: ``run()`` does it; ``settings`` decide its output; ``out`` (its output folder: a
    sub-folder, or the stage folder itself when that is the step's run folder, as DPO's) gets ``DONE`` when it
    finishes, so a resumed stage skips it (None: the step runs again on a resume)."""

    name: str
    settings: dict[str, str]
    run: Callable[[], None]
    out: Path | None = None
    command: str = ""  # the command line, for the record (settings are what is compared)


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[Job], list[Path]]
    steps: Callable[[Job], list[Step]]
    outputs: Callable[[Job], list[Path]] = lambda job: []  # a finished stage missing one of them runs again


@dataclass
class Job:
    """What every stage is built from: the arguments, the run folder's paths and the command runner."""

    args: PipelineArguments
    paths: RunPaths
    execute: Callable[[str, list[str]], None]  # (stage, command) → runs it, raises StageFailed on failure

    def knob(self, name: str):
        return self.args.knob(name)

    def script(self, stage: str, script: str, *cli, name: str = "", out: Path | None = None,
               also: tuple[str, ...] = (), key: str | None = None) -> Step:
        """A step that runs ``script`` with ``cli`` plus the ``--extra`` overrides given for ``key`` (default: the
        stage's name; a stage with two scripts gives each its own), after those given for the keys in ``also`` (the
        control takes SFT's)."""
        extra = [a for s in (*also, key or stage) for e in self.args.extra if e.startswith(f"{s}:")
                 for a in shlex.split(e.split(":", 1)[1])]
        argv = [*map(str, cli), *extra]
        settings = command_settings(script, argv, REPO, self.paths.root)
        cmd = [sys.executable, str(REPO / script), *argv]
        return Step(name, settings, lambda: self.execute(stage, cmd), out, shlex.join(cmd))

    @property
    def seed(self) -> list:
        return ["--seed", self.args.seed]


# ---------------------------------------------------------------------------------------------------- the stages
def rewrite(job: Job) -> list[Step]:
    a, n = job.args, job.knob("max_triplets")
    if a.triplets and not a.generate:
        def read():
            df, counts = read_triplets(a.triplets, a.producers, limit=n, seed=a.seed)
            logger.info("Triplets %s: %s", a.triplets, counts)
            write_table(df, job.paths.triplets)

        settings = {"triplets": a.triplets, "producers": " ".join(a.producers), "max_triplets": str(n),
                    "seed": str(a.seed)}
        return [Step("", settings, read)]
    return [job.script("rewrite", "data_generation/rewrite.py", "--config", a.rewrite_recipe, "--generator",
                       a.generator, "--max_pairs", n, "--max_new_tokens", job.knob("rewrite_new_tokens"),
                       "--output", job.paths.triplets, *job.seed)]


def rewrite_inputs(job: Job) -> list[Path]:
    a = job.args
    if not a.triplets or a.generate or a.triplets.startswith("hf:"):
        return []
    return [Path(reference_triplets_path() if a.triplets == REFERENCE else a.triplets)]


def split(job: Job) -> list[Step]:
    a, p = job.args, job.paths

    def run():
        df, _ = read_triplets(str(p.triplets))
        if a.split_by == "cluster":
            df = with_prompt_clusters(df, Scorer(a.scorer).encode, a.cluster_threshold)
        # salted: the stages split this train side again (by prompt, same seed) for their own eval rows
        train, validation, heldout = three_way_split(df, a.heldout_fraction, a.validation_fraction, a.split_by,
                                                     a.seed)
        heldout = heldout.sample(frac=1.0, random_state=a.seed).head(job.knob("max_heldout"))
        write_table(train, p.train)
        cap = job.knob("max_validation")  # a seeded sample of the validation rows (tiny runs); None: all of them
        validation = validation.sample(frac=1.0, random_state=a.seed).head(cap) if cap else validation
        write_table(validation, p.validation)
        write_table(heldout, p.heldout)
        write_table(heldout[["id", "original_text", "rewritten_text"]], p.test_csv)
        write_table(heldout[["id", "rewrite_prompt"]], p.truth_csv)
        logger.info("Split by %s: %d train rows, %d validation rows (%d prompts), %d held-out rows (%d prompts)",
                    a.split_by, len(train), len(validation), validation.rewrite_prompt.nunique(), len(heldout),
                    heldout.rewrite_prompt.nunique())

    settings = {"split_by": a.split_by, "cluster_threshold": str(a.cluster_threshold), "scorer": a.scorer,
                "heldout_fraction": str(a.heldout_fraction), "max_heldout": str(job.knob("max_heldout")),
                "validation_fraction": str(a.validation_fraction), "max_validation": str(job.knob("max_validation")),
                "seed": str(a.seed)}
    return [Step("", settings, run)]


def mean_prompt(job: Job) -> list[Step]:
    # train prompts only: the bank holds the held-out prompts too (the bundled rewrites use bank prompts)
    return [job.script("mean_prompt", "reward/mean_prompt.py", "--prompts", job.paths.train, "--max_steps",
                       job.knob("mean_prompt_steps"), "--scorer", job.args.scorer, "--output", job.paths.mean_prompt,
                       *job.seed)]


def sft(job: Job) -> list[Step]:
    a, p = job.args, job.paths
    return [job.script("sft", "sft/train.py", "--config", a.sft_recipe, "--model_name_or_path", a.model,
                       "--triplets", p.train, "--max_text_tokens", a.max_text_tokens, "--max_steps",
                       job.knob("sft_steps"), "--scorer", a.scorer, "--output_dir", p.sft, "--max_eval_samples",
                       job.knob("eval_samples"), "--eval_scs_samples", job.knob("eval_samples"), "--data_licence",
                       data_licence(a.triplets if a.triplets and not a.generate else str(p.triplets)),
                       *a.training_cli(), *job.seed)]


def candidates_step(job: Job, out: Path, policy: Path, triplets: Path, name: str = "") -> Step:
    a, p, limit = job.args, job.paths, job.knob("candidate_triplets")
    return job.script("candidates", "data_generation/candidates.py", "--config", a.candidates_recipe, "--triplets",
                      triplets, "--policy_adapter", policy, "--bank", p.train,  # negatives: train prompts only
                      "--num_samples", job.knob("policy_samples"), "--mean_prompt", p.mean_prompt, "--scorer",
                      a.scorer, *(["--limit", limit] if limit else []), "--output_dir", out, *job.seed, name=name,
                      out=out if name else None)


def pairs_step(job: Job, out: Path, candidates_dir: Path, name: str = "", stage: str = "pairs",
               recipe: str | None = None, key: str | None = None) -> Step:
    # tokenizer and text budget: the sampled policy's, as its run_config.json records it
    return job.script(stage, "data_generation/build_pairs.py", "--config", recipe or job.args.pairs_recipe,
                      "--candidates", candidates_dir / "candidates.parquet", "--scorer", job.args.scorer,
                      "--output_dir", out, *job.seed, name=name, out=out if name else None, key=key)


def dpo_step(job: Job, out: Path, start: Path, pairs_dir: Path, name: str, reference: Path | None = None) -> Step:
    a, steps = job.args, job.knob("dpo_steps")
    keep = evenly(steps, a.select_checkpoints)
    return job.script("dpo", "dpo/train.py", "--config", a.dpo_recipe, "--sft_adapter", start, "--train_pairs",
                      pairs_dir / "train.jsonl", "--eval_pairs", pairs_dir / "eval.jsonl", "--max_steps", steps,
                      "--scorer", a.scorer, "--output_dir", out, "--max_eval_pairs", job.knob("eval_samples"),
                      "--eval_scs_samples", job.knob("eval_samples"), *(keep if a.select_checkpoints > 1 else []),
                      *(["--ref_adapter", reference] if reference else []), *a.training_cli(), *job.seed,
                      name=name, out=out)


def select_step(job: Job, po_run: Path, start: Path, name: str, interpolate: bool = True) -> Step:
    """Score SFT, the start adapter, the run's checkpoints and (``interpolate``) SFT↔run interpolations on
    validation; ship the best (dpo/select_adapter.py) into ``<po_run>/selected``."""
    a, p = job.args, job.paths
    alphas = ",".join(f"{x:g}" for x in a.select_alphas) if interpolate else ""
    return job.script("select", "dpo/select_adapter.py", "--sft_adapter", p.sft, "--po_run", po_run,
                      *(["--start_adapter", start] if start != p.sft else []), "--validation", p.validation,
                      "--mean_prompt", p.mean_prompt, "--scorer", a.scorer, "--alphas", alphas, "--checkpoints",
                      str(a.select_checkpoints > 1).lower(), "--output_dir", p.selected(po_run), *job.seed, name=name,
                      out=p.selected(po_run))


def reward(job: Job) -> list[Step]:
    """The reward model (issue 24): pairs of round 1's SCS-scored candidates without the true prompt
    (``reward_pairs_recipe``), then reward/train_rm.py on their train side."""
    a, p = job.args, job.paths
    if not a.reward_recipe:
        return [Step("", {"reward": "off (no reward_recipe)"}, lambda: print("no reward_recipe: no reward model",
                                                                            flush=True))]
    pairs = pairs_step(job, p.reward_pairs, p.candidates, "pairs", "reward", a.reward_pairs_recipe, "reward_pairs")
    train = job.script("reward", "reward/train_rm.py", "--config", a.reward_recipe, "--model_name_or_path", a.model,
                       "--train_pairs", p.reward_pairs / "train.jsonl", "--eval_pairs", p.reward_pairs / "eval.jsonl",
                       "--max_steps", job.knob("reward_steps"), "--output_dir", p.reward_model, *a.training_cli(),
                       *job.seed, name="model", out=p.reward_model)
    return [pairs, train]


def evenly(steps: int, n: int = 4, limit: int | None = None) -> list:
    """Trainer flags that keep ``n`` checkpoints evenly over ``steps`` (every quarter for 4; the select step scores
    each)."""
    return ["--save_strategy", "steps", "--save_steps", max(1, -(-steps // n)), "--save_total_limit", limit or n]


def dpo(job: Job) -> list[Step]:
    p = job.paths
    return [dpo_step(job, p.dpo, p.sft, p.pairs, "dpo"), select_step(job, p.dpo, p.sft, "select")]


def iterate(job: Job) -> list[Step]:
    """Rounds 2..dpo_rounds of on-policy DPO through the candidates/pairs/DPO steps. Each round samples the last
    round's adapter on train triplets no earlier round used, and starts DPO from that adapter."""
    if job.args.dpo_rounds < 2:
        return [Step("", {"dpo_rounds": "1"}, lambda: print("dpo_rounds 1: no further DPO round", flush=True))]
    p, steps, previous = job.paths, [], job.paths.selected(job.paths.dpo)
    reference = p.sft if job.args.dpo_reference == "sft" else None
    for r in range(2, job.args.dpo_rounds + 1):
        rd = p.round(r)
        steps += [Step(f"round{r}/triplets", {"round": str(r)}, lambda r=r: fresh_triplets(job, r), rd / "triplets"),
                  candidates_step(job, rd / "candidates", previous, rd / "triplets.parquet", f"round{r}/candidates"),
                  pairs_step(job, rd / "pairs", rd / "candidates", f"round{r}/pairs"),
                  dpo_step(job, rd / "dpo", previous, rd / "pairs", f"round{r}/dpo", reference),
                  select_step(job, rd / "dpo", previous, f"round{r}/select")]
        previous = p.selected(rd / "dpo")
    return steps


def fresh_triplets(job: Job, r: int) -> None:
    """Round ``r``'s triplets: the train triplets that no earlier round's candidates used."""
    p = job.paths
    train = pd.read_parquet(p.train)
    used_by = [p.candidates, *(p.round(k) / "candidates" for k in range(2, r))]
    used = set().union(*(set(pd.read_parquet(d / "triplets.parquet")["id"]) for d in used_by))
    fresh = train[~train["id"].isin(used)]
    if fresh.empty:
        raise DataError(f"round {r}: every train triplet was used by an earlier round; lower dpo_rounds")
    write_table(fresh, p.round(r) / "triplets.parquet")


PO_STAGES = ("candidates", "pairs", "dpo", "iterate")  # the preference-optimisation arm the control is matched to


def po_seconds(job: Job) -> float | None:
    """Wall time of the DPO arm (sampling, pairing, training and selection of every round), from the stage records;
    None while one of them has not finished."""
    total = 0.0
    for name in PO_STAGES:
        data = read_record(job.paths.stage(name)) or {}
        if data.get("status") != "done" or data.get("seconds") is None:
            return None
        total += float(data["seconds"])
    return total


def po_rows(job: Job) -> list[Path]:
    """The train triplets the DPO rounds sampled (round 1's candidates and each later round's)."""
    p = job.paths
    return [p.candidates / "triplets.parquet", *(p.round(r) / "candidates" / "triplets.parquet" for r in
                                                  range(2, job.args.dpo_rounds + 1))]


def control(job: Job) -> list[Step]:
    """'SFT, continued' (docs/po_selection.md): the SFT adapter trained further with the SFT recipe on train rows no
    DPO round sampled, for as long as the DPO arm took (``po_seconds``), a checkpoint every quarter of the steps that
    time allows at SFT's pace, then the same validation selection as DPO's (checkpoints, no interpolation)."""
    a, p = job.args, job.paths
    if not a.control:
        return [Step("", {"control": "off"}, lambda: print("control off: no compute-matched SFT", flush=True))]
    seconds, pace = a.control_seconds or po_seconds(job), sft_seconds_per_step(job)
    if seconds is None or pace is None:  # a dry run before SFT and the DPO arm ran
        return [Step("", {"control": "after the DPO stages"}, lambda: None)]
    exclude = p.control / "po_rows.parquet"

    def used():
        write_table(pd.concat([pd.read_parquet(f)[["id"]] for f in po_rows(job)]), exclude)

    expected = max(1, int(seconds / pace))  # steps the time allows at SFT's pace; max_steps (10x) only bounds it
    train = job.script("control", "sft/train.py", "--config", a.sft_recipe, "--model_name_or_path", a.model,
                       "--init_adapter", p.sft, "--triplets", p.train, "--max_text_tokens", a.max_text_tokens,
                       "--exclude_ids", exclude, "--max_train_seconds", round(seconds, 1), "--max_steps",
                       10 * expected + 10, "--lr_scheduler_type", "constant", "--warmup_steps", 0, "--scorer",
                       a.scorer, "--output_dir", p.control, "--max_eval_samples", job.knob("eval_samples"),
                       "--eval_scs_samples", job.knob("eval_samples"), "--data_licence",
                       data_licence(a.triplets if a.triplets and not a.generate else str(p.triplets)),
                       *evenly(expected, 4, limit=12), *a.training_cli(), *job.seed, name="sft_continued",
                       out=p.control, also=("sft",))
    return [Step("po_rows", {"dpo_rounds": str(a.dpo_rounds)}, used), train,
            select_step(job, p.control, p.sft, "select", interpolate=False)]


def sft_seconds_per_step(job: Job) -> float | None:
    """SFT's training seconds per optimizer step (its metrics.json): the pace the control's checkpoints follow;
    None before SFT ran."""
    metrics = job.paths.sft / "metrics.json"
    if not metrics.is_file():
        return None
    train = json.loads(metrics.read_text()).get("train", {})
    return float(train["train_runtime"]) / int(train.get("global_step") or job.knob("sft_steps"))


def grpo(job: Job) -> list[Step]:
    a = job.args
    if not a.grpo_recipe:
        return [Step("", {"grpo": "off (no grpo_recipe)"}, lambda: print("no grpo_recipe: GRPO skipped", flush=True))]
    return [job.script("grpo", "dpo/grpo.py", "--config", a.grpo_recipe, "--sft_adapter", job.paths.sft,
                       "--max_steps", job.knob("grpo_steps"), "--scorer", a.scorer, "--output_dir", job.paths.grpo,
                       "--eval_scs_samples", job.knob("eval_samples"), *a.training_cli(), *job.seed)]


def predicted_adapters(job: Job) -> dict[str, Path | None]:
    """Report row id → the adapter the predict stage decodes greedily (None: the base model zero-shot)."""
    a, p = job.args, job.paths
    rows = {"base": None, "sft": p.sft, "dpo": p.selected(p.dpo)}  # each DPO row: the round's validation pick
    rows |= {"iterate": p.last_dpo(a.dpo_rounds)} if a.dpo_rounds > 1 else {}
    rows |= {"control": p.selected(p.control)} if a.control else {}
    return rows | ({"grpo": p.grpo} if a.grpo_recipe else {})


def predict(job: Job) -> list[Step]:
    a, p = job.args, job.paths
    mean = ["--mean_prompt", p.mean_prompt]
    forced = "predict" in a.force or "all" in a.force  # --force predict decodes afresh, the cache unread
    cache = [] if forced else ["--prediction_cache", p.predict_cache]  # (not a setting: pipeline/cache.UNTRACKED)
    steps, rows = [], {}
    for row, adapter in predicted_adapters(job).items():
        # an adapter brings its base model and text budget (run_config.json); the base alone is told them
        policy = ["--adapter", adapter] if adapter else ["--model", a.model, "--max_text_tokens", a.max_text_tokens]
        steps.append(job.script("predict", "inference/predict.py", *policy, "--input", p.test_csv, "--output",
                                p.prediction(row), *mean, *cache, name=row, out=p.predict / row))
        rows[row] = {"adapter": str(adapter) if adapter else None, "selection": "greedy"}
    if a.mbr_candidates:
        last, greedy = p.last_dpo(a.dpo_rounds), "iterate" if a.dpo_rounds > 1 else "dpo"
        sides = {"test": p.test_csv} | ({"validation": p.validation} if a.reward_recipe else {})
        for side, rows_file in sides.items():  # one sampled decode per side; with a reward model, rewards recorded
            rm = ["--reward_model", p.reward_model, "--raw_output", p.raw_prediction("mbr", side)] if a.reward_recipe \
                else []
            steps.append(job.script("predict", "inference/predict.py", "--adapter", last, "--input", rows_file,
                                    "--output", p.prediction("mbr", side), *mean, "--selection", "mbr",
                                    "--num_candidates", a.mbr_candidates, "--scorer", a.scorer, *rm, "--seed", a.seed,
                                    name="mbr" if side == "test" else f"mbr_{side}", out=p.predict / f"mbr_{side}"))
        info = {"adapter": str(last), "greedy": greedy, "num_candidates": a.mbr_candidates}
        rows["mbr"] = {**info, "selection": "mbr"}
        if a.reward_recipe:
            steps.append(Step("rerank", {"rows": "rm rm_mbr oracle"}, lambda: rerank_rows(job)))
            rows |= {row: {**info, "selection": row, "reward_model": str(p.reward_model)} for row in REWARD_ROWS}
    rows = {row: {**info, "dpo_rounds": a.dpo_rounds} if row == "iterate" else info for row, info in rows.items()}
    steps.append(Step("rows", {"rows": " ".join(rows)}, lambda: write_json(rows, p.predicted_rows)))
    return steps


def rerank_rows(job: Job) -> None:
    """The rows RM rerank, RM + MBR and oracle, picked from the MBR decode's recorded scores (promptrec/rerank.py):
    the hybrid's weight is chosen on the validation decode, then every rule picks among the test rows' candidates,
    post-processed as the MBR row was (its ``predict/mbr.config.json``)."""
    p, scorer = job.paths, Scorer(job.args.scorer)
    recorded = json.loads(p.prediction("mbr").with_suffix(".config.json").read_text())
    post = PostprocessConfig(**recorded["postprocess"])  # as the MBR row was finalised (--extra 'predict:…' too)
    if recorded["args"].get("concat_top_k", 1) != 1:
        raise DataError("the reward rows pick one candidate a row: drop --concat_top_k from the predict stage")
    val_path, test_path = p.raw_prediction("mbr", "validation"), p.raw_prediction("mbr")
    val_raw, raw = read_table(val_path), read_table(test_path)
    val_truth = read_table(p.validation).set_index("id").loc[val_raw["id"], "rewrite_prompt"].tolist()
    validation = validation_choice(val_raw, val_truth, scorer, post.mean_prompt, str(val_path))
    truth = read_table(p.truth_csv).set_index("id").loc[raw["id"], "rewrite_prompt"].tolist()  # the oracle's only
    for row, prompts in picked(raw, truth, scorer, validation["mbr_weight"], post, str(test_path)).items():
        write_table(pd.DataFrame({"id": raw["id"], "rewrite_prompt": prompts}), p.prediction(row))
    write_json({"validation": validation, "rule": "docs/reward_model.md"}, p.rerank)
    logger.info("Rerank: MBR weight %s chosen on %d validation rows (%s)", validation["mbr_weight"],
                validation["rows"], validation["hybrid_means"])


def report(job: Job) -> list[Step]:
    return [Step("", {"scorer": job.args.scorer}, lambda: build_report(job.paths.root, job.args.scorer,
                                                                       out_dir=job.paths.root))]


# ------------------------------------------------------------------------------------------------- what they read
def _adapter(run: Path) -> list[Path]:
    return [Path(run) / name for name in ADAPTER_FILES]


def _predictions(job: Job) -> list[Path]:
    a = job.args
    rows = (*predicted_adapters(job), *(["mbr"] if a.mbr_candidates else []),
            *(REWARD_ROWS if a.reward_recipe else []))
    return [job.paths.prediction(r) for r in rows]


def _reward_model(job: Job) -> list[Path]:
    rm = job.paths.reward_model  # a reward model has no SFT rows (split.parquet) to carry on
    return [rm / n for n in ADAPTER_FILES if n != SPLIT_ROWS] if job.args.reward_recipe else []


STAGE_TABLE = (
    Stage("rewrite", rewrite_inputs, rewrite, lambda j: [j.paths.triplets]),
    Stage("split", lambda j: [j.paths.triplets], split,
          lambda j: [j.paths.train, j.paths.validation, j.paths.heldout, j.paths.test_csv]),
    Stage("mean_prompt", lambda j: [j.paths.train], mean_prompt, lambda j: [j.paths.mean_prompt]),
    Stage("sft", lambda j: [j.paths.train], sft, lambda j: _adapter(j.paths.sft)),
    Stage("candidates", lambda j: [j.paths.train, j.paths.mean_prompt, *_adapter(j.paths.sft)],
          lambda j: [candidates_step(j, j.paths.candidates, j.paths.sft, j.paths.train)],
          lambda j: [j.paths.candidates / "candidates.parquet", j.paths.candidates / "triplets.parquet"]),
    Stage("pairs", lambda j: [j.paths.candidates / "candidates.parquet"],
          lambda j: [pairs_step(j, j.paths.pairs, j.paths.candidates)],
          lambda j: [j.paths.pairs / "train.jsonl", j.paths.pairs / "eval.jsonl"]),
    Stage("reward", lambda j: [j.paths.candidates / "candidates.parquet"] if j.args.reward_recipe else [], reward,
          _reward_model),
    Stage("dpo", lambda j: [*_adapter(j.paths.sft), j.paths.pairs / "train.jsonl", j.paths.pairs / "eval.jsonl",
                            j.paths.validation, j.paths.mean_prompt], dpo,
          lambda j: _adapter(j.paths.selected(j.paths.dpo))),
    Stage("iterate", lambda j: [j.paths.train, j.paths.validation, j.paths.mean_prompt,
                                j.paths.candidates / "triplets.parquet",
                                *_adapter(j.paths.selected(j.paths.dpo))] if j.args.dpo_rounds > 1 else [], iterate,
          lambda j: _adapter(j.paths.last_dpo(j.args.dpo_rounds)) if j.args.dpo_rounds > 1 else []),
    Stage("control", lambda j: [j.paths.train, j.paths.validation, j.paths.mean_prompt, *_adapter(j.paths.sft),
                                *po_rows(j)] if j.args.control else [], control,
          lambda j: _adapter(j.paths.selected(j.paths.control)) if j.args.control else []),
    Stage("grpo", lambda j: _adapter(j.paths.sft) if j.args.grpo_recipe else [], grpo,
          lambda j: _adapter(j.paths.grpo) if j.args.grpo_recipe else []),
    Stage("predict", lambda j: [j.paths.test_csv, j.paths.mean_prompt, *(
        f for a in predicted_adapters(j).values() if a for f in _adapter(a)), *_reward_model(j),
        *([j.paths.validation, j.paths.truth_csv] if j.args.reward_recipe else [])], predict,
        lambda j: [*_predictions(j), j.paths.predicted_rows, *([j.paths.rerank] if j.args.reward_recipe else [])]),
    Stage("report", lambda j: [j.paths.heldout, j.paths.mean_prompt, j.paths.predicted_rows, *_predictions(j),
                               *([j.paths.rerank] if j.args.reward_recipe else [])], report,
          lambda j: [j.paths.report_md, j.paths.report_json]),
)
