"""Quality parity of the fast CPU generation path: one adapter's held-out predictions, fast path minus old path.

    python bench/parity.py --run_dir checkpoints/pipeline/real_gemma --stages sft
    python bench/parity.py --run_dir checkpoints/pipeline/smollm2 --stages sft dpo
    python bench/parity.py --run_dir checkpoints/pipeline/real_gemma_p2 --stages sft \
        --flags merge_adapter=true --flags_are new            # a candidate fast path against today's predict

With ``--flags`` (predict.py's flags as ``name=value``; default: the old path's, below) and ``--flags_are new``,
the re-predicted rows are the fast side and the pipeline's own predictions the old side: how a setting that is not
the default yet is checked before it becomes one.

For each stage named, the pipeline's predict stage wrote ``<run_dir>/predict/<stage>.csv`` with today's defaults
(``--dtype auto``: bf16 on a CPU with bf16 instructions, batch 32, static KV cache). This script predicts the same
held-out rows with the same adapter the way the pipeline did before the fast path (``--dtype float32 --batch_size 8
--kv_cache dynamic``) into ``<run_dir>/parity/<stage>_float32.csv`` (kept: a re-run only rescores), scores both
against the truth with the run's scorer, and prints the paired difference fast − old with its 95% bootstrap interval
over prompt clusters (the report's method, :func:`comparison.paired`), the share of identical answers and both
predict times. The acceptance rule of issue 21 (docs/fast_cpu_path.md): |mean| <= 0.005 and the interval covers 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))
from comparison import latest_invocation, paired, row_groups  # noqa: E402  (pipeline/comparison.py)

from promptrec.cli import parse_args, run_main, setup_logging  # noqa: E402
from promptrec.environment import describe_environment, environment_line  # noqa: E402
from promptrec.scoring import Scorer  # noqa: E402
from promptrec.tables import DataError, write_json  # noqa: E402

OLD_PATH = ["--dtype", "float32", "--batch_size", "8", "--kv_cache", "dynamic"]
TOLERANCE = 0.005


@dataclass
class ParityArguments:
    run_dir: str = field(metadata={"help": "A finished pipeline run (split/, predict/, the adapters)."})
    stages: list[str] = field(default_factory=lambda: ["sft"], metadata={
        "help": "Adapters to compare: sft, dpo, or iterate (the last DPO round)."})
    scorer: str | None = field(default=None, metadata={"help": "Scorer; default: the run's (its last invocation)."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the figures (default run_dir/parity)."})
    flags: list[str] = field(default_factory=lambda: ["dtype=float32", "batch_size=8", "kv_cache=dynamic"], metadata={
        "help": "predict.py flags of the re-predicted side as name=value (default: the old path's)."})
    flags_are: str = field(default="old", metadata={
        "help": "old: the re-predicted side is the old path, the pipeline's predictions the fast one (the check of "
                "today's defaults); new: the other way round (the check of a candidate default)."})

    def __post_init__(self):
        if self.flags_are not in ("old", "new"):
            raise ValueError(f"--flags_are must be old or new, not {self.flags_are!r}")
        if any("=" not in f for f in self.flags):
            raise ValueError(f"--flags are name=value pairs of predict.py's flags, not {self.flags}")

    def cli(self) -> list[str]:
        return [part for f in self.flags for part in (f"--{f.split('=', 1)[0]}", f.split("=", 1)[1])]

    def label(self) -> str:
        """The re-predicted side's file label: ``float32`` for the old path (as before), else the flags."""
        return "float32" if self.cli() == OLD_PATH else "_".join(self.flags).replace("=", "-").replace("/", "_")


def adapter_of(run_dir: Path, stage: str) -> Path:
    """The adapter the pipeline's predict stage used for ``stage``."""
    if stage == "iterate":
        rounds = sorted((run_dir / "iterate").glob("round*/dpo"))
        if not rounds:
            raise DataError(f"{run_dir}/iterate has no round*/dpo adapter")
        return rounds[-1]
    return run_dir / stage


def predict_old_path(run_dir: Path, stage: str, out: Path, flags: list[str] = OLD_PATH) -> float:
    """Predict the held-out rows with ``flags`` (the old way by default), once; returns the predict step's seconds."""
    config = out.with_name(f"{out.stem}.config.json")
    if not out.exists():
        cmd = [sys.executable, str(REPO / "inference" / "predict.py"), "--adapter", str(adapter_of(run_dir, stage)),
               "--input", str(run_dir / "split" / "test.csv"), "--output", str(out), "--mean_prompt",
               str(run_dir / "mean_prompt" / "mean_prompt.json"), *flags]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            raise RuntimeError(f"predict failed: {' '.join(cmd)}")
    return json.loads(config.read_text())["seconds"]


def compare(args: ParityArguments) -> dict:
    run_dir = Path(args.run_dir)
    truth = pd.read_parquet(run_dir / "split" / "heldout.parquet")
    scorer_name = args.scorer or latest_invocation(run_dir).get("scorer", "auto")
    scorer, groups = Scorer(scorer_name), row_groups(truth)
    results = {}
    for stage in args.stages:
        new_file = run_dir / "predict" / f"{stage}.csv"
        if not new_file.exists():
            raise DataError(f"{new_file} not found: run the pipeline's predict stage first")
        old_file = run_dir / "parity" / f"{stage}_{args.label()}.csv"
        old_file.parent.mkdir(parents=True, exist_ok=True)
        old_s = predict_old_path(run_dir, stage, old_file, args.cli())
        new_s = json.loads(new_file.with_name(f"{stage}.config.json").read_text())["seconds"]
        if args.flags_are == "new":  # the re-predicted side is the candidate: it plays "fast"
            new_file, old_file, new_s, old_s = old_file, new_file, old_s, new_s
        by_id = {name: pd.read_csv(f).set_index("id")["rewrite_prompt"] for name, f in (("new", new_file),
                                                                                        ("old", old_file))}
        new, old = ([str(by_id[name].loc[i]) for i in truth["id"]] for name in ("new", "old"))
        new_scores = scorer.score(new, list(truth["rewrite_prompt"]))
        old_scores = scorer.score(old, list(truth["rewrite_prompt"]))
        mean, low, high = paired(new_scores, old_scores, groups)
        results[stage] = {"rows": len(truth), "new_mean": float(np.mean(new_scores)),
                          "old_mean": float(np.mean(old_scores)), "diff": mean, "low": low, "high": high,
                          "identical": int(sum(a == b for a, b in zip(new, old))), "new_predict_s": new_s,
                          "old_predict_s": old_s,
                          "passes": abs(mean) <= TOLERANCE and low <= 0 <= high}
        r = results[stage]
        sides = ("today's", " ".join(args.cli())) if args.flags_are == "old" else (" ".join(args.cli()), "today's")
        print(f"{stage}: {sides[0]} {r['new_mean']:.4f} − {sides[1]} {r['old_mean']:.4f} = {mean:+.4f} "
              f"(95% CI {low:+.4f} … {high:+.4f}, {'prompt clusters' if groups is not None else 'rows'}); "
              f"{r['identical']}/{len(truth)} identical answers; predict {new_s:.0f} s vs {old_s:.0f} s "
              f"({old_s / new_s:.2f}x); {'within' if r['passes'] else 'OUTSIDE'} ±{TOLERANCE} with 0 in the CI",
              flush=True)
    return results


def main(args: ParityArguments) -> dict:
    setup_logging()
    environment = describe_environment(generation_dtype=f"auto vs {' '.join(args.cli())}")
    print(environment_line(environment), flush=True)
    results = compare(args)
    output = Path(args.output) if args.output else Path(args.run_dir) / "parity" / "parity.json"
    output = output if args.label() == "float32" or args.output else output.with_name(f"parity_{args.label()}.json")
    write_json({"results": results, "environment": environment, "flags": args.cli(), "flags_are": args.flags_are},
               output)
    return results


if __name__ == "__main__":
    (parity_args,) = parse_args(ParityArguments)
    run_main(lambda: main(parity_args))
