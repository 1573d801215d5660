"""The main job: every stage in order, then a report comparing what each stage bought on held-out prompts.

    python pipeline/run.py --config pipeline/configs/smollm2.yaml                  # embedded default (make run)
    python pipeline/run.py --config pipeline/configs/smollm2_generate.yaml         # the embedded model's own rewrites
    python pipeline/run.py --config pipeline/configs/real_gemma.yaml               # external triplets
    python pipeline/run.py --config pipeline/configs/phi2.yaml                     # Phi-2 QLoRA on a GPU
    python pipeline/run.py --config pipeline/configs/smollm2.yaml --size tiny      # CI's smallest size

Stages (each its own entry script, run as a subprocess with its own recipe plus overrides): rewrite (or read
``--triplets``) → split (by prompt cluster: near-duplicates of a held-out prompt are never trained on) → mean prompt
→ SFT → candidates (SFT policy samples + bank negatives + mean + truth) → pairs → DPO → iterate (``dpo_rounds`` > 1:
each further round samples the last DPO adapter on fresh train triplets and trains DPO from it, through the same
candidates/pairs/DPO steps) → GRPO (with a ``grpo_recipe``) → predictions on the held-out split (base zero-shot, SFT,
DPO, iterative DPO, GRPO; with ``mbr_candidates`` also MBR decoding of the last DPO adapter) → report. The model,
tokenizer, chat template and text budget are decided once, by the SFT stage (``--model``,
``--max_text_tokens``), and recorded in its ``run_config.json``: candidates, pairs, DPO, GRPO and predict read them
back from there. A stage that finished leaves ``<run_dir>/<stage>/DONE``; a re-run skips it (``--force`` names
stages to redo). ``--until`` stops after a stage. Outputs: ``<run_dir>/report.md``, ``report.png``, ``report.json``.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comparison import SIZES, build_report  # pipeline/comparison.py, beside this script

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.tables import DataError, write_json, write_table
from promptrec.triplets import read_triplets

logger = logging.getLogger("pipeline")
REPO = Path(__file__).resolve().parents[1]
STAGES = ("rewrite", "split", "mean_prompt", "sft", "candidates", "pairs", "dpo", "iterate", "grpo", "predict",
          "report")


@dataclass
class PipelineArguments:
    run_dir: str = field(default="checkpoints/pipeline/smollm2", metadata={"help": "Where every stage writes."})
    size: str = field(default="small", metadata={"help": f"Preset of data sizes and steps: {', '.join(SIZES)}."})
    triplets: str | None = field(default=None, metadata={
        "help": "Triplets to train on instead of generating rewrites: 'reference' (the bundled reference rewrites) "
                "or a file, e.g. ../shared/data/triplets.csv."})
    generate: bool = field(default=False, metadata={
        "help": "Generate rewrites with the rewrite recipe and --generator even when triplets is set."})
    generator: str = field(default="embedded", metadata={"help": "Rewrite generator (e.g. google/gemma-7b-it)."})
    producers: list[str] = field(default_factory=list, metadata={
        "help": "With --triplets: keep rows whose 'producer' starts with one of these (e.g. 'gemma')."})
    model: str = field(default="embedded", metadata={"help": "Base policy model: hub id, local dir or 'embedded'."})
    scorer: str = field(default="embedded", metadata={"help": "SCS scorer for pairs and the report: auto, embedded…"})
    rewrite_recipe: str = field(default="data_generation/configs/smollm2.yaml", metadata={"help": "Rewrite recipe."})
    sft_recipe: str = field(default="sft/configs/smollm2.yaml", metadata={"help": "SFT recipe."})
    candidates_recipe: str = field(default="data_generation/configs/candidates_smollm2.yaml", metadata={
        "help": "Candidates recipe."})
    pairs_recipe: str = field(default="data_generation/configs/pairs_smollm2.yaml", metadata={"help": "Pairs recipe."})
    dpo_recipe: str = field(default="dpo/configs/smollm2.yaml", metadata={"help": "DPO recipe."})
    grpo_recipe: str | None = field(default=None, metadata={
        "help": "GRPO recipe (online RL on the SCS reward from the SFT adapter, dpo/grpo.py); unset: the stage is "
                "skipped (on 2 CPU cores a GRPO step takes minutes)."})
    dpo_rounds: int = field(default=1, metadata={
        "help": "Rounds of on-policy DPO. Round 1 is the dpo stage (from SFT); each further round (the iterate stage) "
                "samples the previous round's adapter on fresh train triplets, pairs its samples by SCS against the "
                "truth and trains DPO from that adapter (its reference)."})
    mbr_candidates: int = field(default=0, metadata={
        "help": "N > 0: the predict stage also decodes the last DPO adapter (the iterate stage's, else dpo's) by MBR "
                "over N samples, its greedy answer and the mean prompt (inference/predict.py --selection mbr)."})
    max_text_tokens: int = field(default=100, metadata={"help": "Token budget of each text in the recovery prompt."})
    heldout_fraction: float = field(default=0.2, metadata={"help": "Share of prompts held out for the report."})
    split_by: str = field(default="cluster", metadata={
        "help": "Held-out groups: 'cluster' (near-duplicate prompts by scorer embedding stay together) or 'prompt'."})
    cluster_threshold: float = field(default=0.8, metadata={
        "help": "split_by cluster: prompts with scorer cosine >= this (transitively) are one group."})
    max_triplets: int | None = field(default=None, metadata={"help": "Override the size's number of triplets."})
    sft_steps: int | None = field(default=None, metadata={"help": "Override the size's SFT steps."})
    dpo_steps: int | None = field(default=None, metadata={"help": "Override the size's DPO steps."})
    grpo_steps: int | None = field(default=None, metadata={"help": "Override the size's GRPO steps."})
    max_heldout: int | None = field(default=None, metadata={"help": "Override the size's held-out rows scored."})
    candidate_triplets: int | None = field(default=None, metadata={
        "help": "Override the size's number of train triplets that get candidates (and so DPO pairs)."})
    bf16: str = field(default="auto", metadata={
        "help": "bf16 autocast for SFT, DPO and GRPO: true, false, or auto (on when training on a CPU with bf16 "
                "instructions, faster there; otherwise the recipe decides). A bf16 base on top gave only 1.05-1.11x "
                "and is not used (bench/README.md)."})
    extra: list[str] = field(default_factory=list, metadata={
        "help": "Per-stage overrides 'stage:--key value…', e.g. dpo:--beta=0.2 'dpo:--loss_type ipo hinge'."})
    force: list[str] = field(default_factory=list, metadata={"help": f"Stages to redo: any of {', '.join(STAGES)}."})
    until: str = field(default="report", metadata={"help": "Stop after this stage (e.g. sft), leaving the rest."})
    seed: int = field(default=42, metadata={"help": "Seed passed to every stage."})

    def __post_init__(self):
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16 must be auto, true or false, not {self.bf16!r}")
        if self.split_by not in ("cluster", "prompt"):
            raise ValueError(f"split_by must be cluster or prompt, not {self.split_by!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, not {self.size!r}")
        unknown = set(self.force) - set(STAGES) - {"all"}
        if unknown:
            raise ValueError(f"unknown stage(s) in --force: {sorted(unknown)}")
        if self.dpo_rounds < 1 or self.mbr_candidates < 0:
            raise ValueError("dpo_rounds must be >= 1 and mbr_candidates >= 0")
        if self.until not in STAGES:
            raise ValueError(f"until must be one of {', '.join(STAGES)}, not {self.until!r}")

    def training_cli(self) -> list[str]:
        """Overrides every trainer gets: the CPU when there is no GPU (GPU recipes included: TrainingArguments
        refuses bf16 without one), and --bf16 (none on auto with a GPU: the recipe's own setting)."""
        import torch

        from promptrec.models import cpu_has_bf16

        device = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
        if self.bf16 == "auto":
            if not device:
                return []
            return device + ["--bf16", str(cpu_has_bf16()).lower()]
        return device + ["--bf16", self.bf16]

    def knob(self, name: str):
        override = getattr(self, name, None)
        return override if override is not None else SIZES[self.size][name]


class Runner:
    """Runs stages in order, skipping finished ones, streaming their output with a banner each."""

    def __init__(self, args: PipelineArguments):
        self.args, self.dir = args, Path(args.run_dir)
        self.timings: dict[str, float] = {}

    def forced(self, stage: str) -> bool:
        return stage in self.args.force or "all" in self.args.force

    def done(self, stage: str) -> bool:
        return (self.dir / stage / "DONE").exists() and not self.forced(stage)

    def stage(self, stage: str, fn) -> None:
        number = STAGES.index(stage) + 1
        if self.done(stage):
            print(f"\n=== [{number}/{len(STAGES)}] {stage}: done before, skipped", flush=True)
            return
        print(f"\n=== [{number}/{len(STAGES)}] {stage}", flush=True)
        if self.forced(stage):  # redo from scratch: resumable parts of the last run must not be reused
            shutil.rmtree(self.dir / stage, ignore_errors=True)
        (self.dir / stage).mkdir(parents=True, exist_ok=True)
        start = time.time()
        fn(self.dir / stage)
        self.timings[stage] = round(time.time() - start, 1)
        (self.dir / stage / "DONE").write_text(f"{self.timings[stage]} s\n")
        print(f"=== {stage} finished in {self.timings[stage]:.0f} s", flush=True)

    def step(self, out: Path, fn) -> None:
        """A step inside a stage (one round of the iterate stage): skipped when it finished before."""
        if (out / "DONE").exists():
            print(f"--- {out.relative_to(self.dir)}: done before, skipped", flush=True)
            return
        out.mkdir(parents=True, exist_ok=True)
        fn(out)
        (out / "DONE").write_text("done\n")

    def script(self, stage: str, script: str, *cli) -> None:
        extra = [arg for e in self.args.extra if e.startswith(f"{stage}:") for arg in shlex.split(e.split(":", 1)[1])]
        cmd = [sys.executable, str(REPO / script), *map(str, cli), *extra]
        logger.info("$ %s", shlex.join(cmd))
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            raise DataError(f"stage '{stage}' failed (command above); fix it and re-run: finished stages are kept")


def main(args: PipelineArguments) -> dict:
    run, d = Runner(args), Path(args.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_json(asdict(args), d / "pipeline_config.json")
    seed = ["--seed", args.seed]
    n = args.knob("max_triplets")

    def rewrite(out):
        if args.triplets and not args.generate:
            df, counts = read_triplets(args.triplets, args.producers, limit=n, seed=args.seed)
            logger.info("Triplets %s: %s", args.triplets, counts)
            write_table(df, out / "triplets.parquet")
        else:
            run.script("rewrite", "data_generation/rewrite.py", "--config", args.rewrite_recipe, "--generator",
                       args.generator, "--max_pairs", n, "--max_new_tokens", args.knob("rewrite_new_tokens"),
                       "--output", out / "triplets.parquet", *seed)

    def split(out):
        from promptrec.scoring import Scorer
        from promptrec.splits import split_frame, with_prompt_clusters

        df, _ = read_triplets(str(d / "rewrite" / "triplets.parquet"))
        if args.split_by == "cluster":
            df = with_prompt_clusters(df, Scorer(args.scorer).encode, args.cluster_threshold)
        # salted: the stages split this train side again (by prompt, same seed) for their own eval rows
        train, heldout = split_frame(df, args.heldout_fraction, by=args.split_by, seed=args.seed, salt="heldout")
        heldout = heldout.sample(frac=1.0, random_state=args.seed).head(args.knob("max_heldout"))
        write_table(train, out / "train.parquet")
        write_table(heldout, out / "heldout.parquet")
        write_table(heldout[["id", "original_text", "rewritten_text"]], out / "test.csv")
        write_table(heldout[["id", "rewrite_prompt"]], out / "truth.csv")
        logger.info("Split by %s: %d train rows, %d held-out rows (%d held-out prompts)", args.split_by, len(train),
                    len(heldout), heldout.rewrite_prompt.nunique())

    def mean_prompt(out):
        train = d / "split" / "train.parquet"
        # train prompts only: the bank holds the held-out prompts too (the bundled rewrites use bank prompts)
        run.script("mean_prompt", "reward/mean_prompt.py", "--prompts", train, "--max_steps",
                   args.knob("mean_prompt_steps"), "--scorer", args.scorer, "--output", out / "mean_prompt.json",
                   *seed)

    def sft(out):
        run.script("sft", "sft/train.py", "--config", args.sft_recipe, "--model_name_or_path", args.model,
                   "--triplets", d / "split" / "train.parquet", "--max_text_tokens", args.max_text_tokens,
                   "--max_steps", args.knob("sft_steps"), "--scorer", args.scorer, "--output_dir", out,
                   "--max_eval_samples", args.knob("eval_samples"), "--eval_scs_samples", args.knob("eval_samples"),
                   *args.training_cli(), *seed)

    def candidates(out, policy=d / "sft", triplets=d / "split" / "train.parquet"):
        run.script("candidates", "data_generation/candidates.py", "--config", args.candidates_recipe,
                   "--triplets", triplets, "--policy_adapter", policy,
                   "--bank", d / "split" / "train.parquet",  # negatives from train prompts: none held out
                   "--num_samples", args.knob("policy_samples"),
                   "--mean_prompt", d / "mean_prompt" / "mean_prompt.json", "--scorer", args.scorer,
                   *(["--limit", limit] if (limit := args.knob("candidate_triplets")) else []), "--output_dir", out,
                   *seed)

    def pairs(out, candidates_dir=d / "candidates"):
        # tokenizer and text budget: the sampled policy's, as candidates.manifest.json records it
        run.script("pairs", "data_generation/build_pairs.py", "--config", args.pairs_recipe, "--candidates",
                   candidates_dir / "candidates.parquet", "--scorer", args.scorer, "--output_dir", out, *seed)

    def dpo(out, start=d / "sft", pairs_dir=d / "pairs"):
        run.script("dpo", "dpo/train.py", "--config", args.dpo_recipe, "--sft_adapter", start, "--train_pairs",
                   pairs_dir / "train.jsonl", "--eval_pairs", pairs_dir / "eval.jsonl", "--max_steps",
                   args.knob("dpo_steps"), "--scorer", args.scorer, "--output_dir", out, "--max_eval_pairs",
                   args.knob("eval_samples"), "--eval_scs_samples", args.knob("eval_samples"), *args.training_cli(),
                   *seed)

    def iterate(out):
        """Rounds 2..dpo_rounds of on-policy DPO through the candidates/pairs/DPO steps above. Each round samples the
        last round's adapter on train triplets no earlier round used, and starts DPO from that adapter."""
        if args.dpo_rounds < 2:
            print("dpo_rounds 1: no further DPO round", flush=True)
            return
        import pandas as pd

        train = pd.read_parquet(d / "split" / "train.parquet")
        used = set(pd.read_parquet(d / "candidates" / "triplets.parquet")["id"])
        previous = d / "dpo"
        for r in range(2, args.dpo_rounds + 1):
            rd = out / f"round{r}"
            rd.mkdir(parents=True, exist_ok=True)
            fresh = train[~train["id"].isin(used)]
            if fresh.empty:
                raise DataError(f"round {r}: every train triplet was used by an earlier round; lower dpo_rounds")
            write_table(fresh, rd / "triplets.parquet")
            run.step(rd / "candidates", lambda o, p=previous, t=rd / "triplets.parquet": candidates(o, p, t))
            run.step(rd / "pairs", lambda o, c=rd / "candidates": pairs(o, c))
            run.step(rd / "dpo", lambda o, p=previous, q=rd / "pairs": dpo(o, p, q))
            used |= set(pd.read_parquet(rd / "candidates" / "triplets.parquet")["id"])
            previous = rd / "dpo"

    def grpo(out):
        if not args.grpo_recipe:
            print("no grpo_recipe: GRPO skipped", flush=True)
            return
        run.script("grpo", "dpo/grpo.py", "--config", args.grpo_recipe, "--sft_adapter", d / "sft", "--max_steps",
                   args.knob("grpo_steps"), "--scorer", args.scorer, "--output_dir", out, "--eval_scs_samples",
                   args.knob("eval_samples"), *args.training_cli(), *seed)

    def predict(out):
        test = d / "split" / "test.csv"
        mean = ["--mean_prompt", d / "mean_prompt" / "mean_prompt.json"]
        adapters = [("base", None), ("sft", d / "sft"), ("dpo", d / "dpo")]
        adapters += [("iterate", last_dpo())] if args.dpo_rounds > 1 else []
        adapters += [("grpo", d / "grpo")] if (d / "grpo" / "adapter_config.json").exists() else []
        for name, adapter in adapters:
            # an adapter brings its base model and text budget (run_config.json); the base alone is told them
            policy = ["--adapter", adapter] if adapter else ["--model", args.model, "--max_text_tokens",
                                                             args.max_text_tokens]
            run.step(out / name, lambda o, p=policy, n=name: run.script(
                "predict", "inference/predict.py", *p, "--input", test, "--output", out / f"{n}.csv", *mean))
        if args.mbr_candidates:
            run.step(out / "mbr", lambda o: run.script(
                "predict", "inference/predict.py", "--adapter", last_dpo(), "--input", test, "--output",
                out / "mbr.csv", *mean, "--selection", "mbr", "--num_candidates", args.mbr_candidates,
                "--scorer", args.scorer, "--seed", args.seed))
            write_json({"adapter": str(last_dpo()), "greedy": "iterate" if args.dpo_rounds > 1 else "dpo",
                        "num_candidates": args.mbr_candidates}, out / "mbr.json")

    def last_dpo() -> Path:
        """The adapter of the last DPO round: the iterate stage's last, or the dpo stage's."""
        return d / "iterate" / f"round{args.dpo_rounds}" / "dpo" if args.dpo_rounds > 1 else d / "dpo"

    def report(out):
        build_report(d, args.scorer, out_dir=d)

    stages = (rewrite, split, mean_prompt, sft, candidates, pairs, dpo, iterate, grpo, predict, report)
    for stage, fn in zip(STAGES, stages):
        run.stage(stage, fn)
        if stage == args.until:
            break
    timings_file = d / "timings.json"
    timings = json.loads(timings_file.read_text())["timings_s"] if timings_file.exists() else {}
    timings = {**timings, **run.timings}
    write_json({"timings_s": timings}, timings_file)
    print("\nStage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {sum(timings.values()) / 60:.1f} min", flush=True)
    if args.until != "report":
        return {"run_dir": str(d), "timings": run.timings}
    table = [line for line in (d / "report.md").read_text().splitlines() if line.startswith("|")]
    print(f"\nHeld-out comparison ({d / 'report.md'}):\n" + "\n".join(table), flush=True)
    return {"run_dir": str(d), "timings": run.timings}


if __name__ == "__main__":
    setup_logging()
    (pipeline_args,) = parse_args(PipelineArguments)
    run_main(lambda: main(pipeline_args))
