"""The main job: every stage in order, then a report comparing what each stage bought on held-out prompts.

    python pipeline/run.py --config pipeline/configs/smollm2.yaml                  # embedded default (make run)
    python pipeline/run.py --config pipeline/configs/smollm2_generate.yaml         # the embedded model's own rewrites
    python pipeline/run.py --config pipeline/configs/real_gemma.yaml               # external triplets
    python pipeline/run.py --config pipeline/configs/phi2.yaml                     # Phi-2 QLoRA on a GPU
    python pipeline/run.py --config pipeline/configs/smollm2.yaml --size tiny      # CI's smallest size

Stages (pipeline/stages.py; each its own entry script, run as a subprocess with its own recipe plus overrides):
rewrite (or read ``--triplets``) → split (train / validation / held-out by prompt cluster: near-duplicates of a
held-out prompt are never trained or chosen on) → mean prompt → SFT → candidates (SFT policy samples + bank negatives
+ mean + truth) → pairs → DPO, then selection on validation (SFT, checkpoints, SFT↔DPO interpolations: the round's
pick) → iterate (``dpo_rounds`` > 1: each further round samples the last pick on fresh train triplets, trains DPO
from it and selects again) → control (``--control``: SFT continued for the DPO stages' time) → GRPO (with a
``grpo_recipe``) → predictions on the held-out split → report. The model, tokenizer, chat template
and text budget are decided once, by the SFT stage, and recorded in its ``run_config.json``.

A stage records what produced it in ``<run_dir>/<stage>/stage.json`` (pipeline/cache.py). A re-run skips a stage only
when its settings and the files it reads are unchanged and nothing before it re-ran; otherwise it re-runs it and
everything after it, printing why. ``--force`` redoes stages anyway; ``--until`` stops after a stage. Outputs:
``<run_dir>/report.md``, ``report.png``, ``report.json``; ``invocations.jsonl`` keeps every invocation's arguments.
"""

from __future__ import annotations

import itertools
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from arguments import STAGES, PipelineArguments
from cache import decide, input_digests, read_record, write_record
from paths import RunPaths
from stages import REPO, STAGE_TABLE, Job, Step

from promptrec.cli import parse_args, run_main, setup_logging
from promptrec.tables import write_json

logger = logging.getLogger("pipeline")
assert tuple(s.name for s in STAGE_TABLE) == STAGES


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the message has the command, its exit code and the tail of its log."""

    def __init__(self, stage: str, cmd: list[str], returncode: int, tail: str, log: Path):
        self.stage = stage
        super().__init__(f"stage '{stage}' failed (exit {returncode}); finished stages are kept, fix it and "
                         f"re-run.\n$ {shlex.join(map(str, cmd))}\n--- last lines of {log}:\n{tail}")


def execute(stage: str, cmd: list[str], log: Path, tail_lines: int = 25) -> None:
    """Run ``cmd`` from the repository root, streaming its output (stdout and stderr) to ours and to ``log``."""
    logger.info("$ %s", shlex.join(map(str, cmd)))
    tail = deque(maxlen=64)  # recent chunks, enough for the last lines
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc, \
            log.open("ab") as f:
        for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk)
            tail.append(chunk)
    if proc.returncode != 0:
        text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
        lines = [line for line in text.splitlines() if line.strip()][-tail_lines:]
        raise StageFailed(stage, cmd, proc.returncode, "\n".join(lines), log)


class Runner:
    """Runs the stage table in order: skips a stage whose record matches, resumes an interrupted one, re-runs the
    rest from an empty folder, and prints why."""

    def __init__(self, args: PipelineArguments, paths: RunPaths):
        self.args, self.paths = args, paths
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.timings: dict[str, float] = {}
        self.ran: list[str] = []
        self.log: dict[str, str] = {}
        self.current = ""
        self.job = Job(args, paths, self._execute)

    def _execute(self, _script_stage: str, cmd: list[str]) -> None:
        # the iterate stage runs the candidates/pairs/dpo scripts: their output belongs to its own log
        execute(self.current, cmd, self.paths.stage(self.current) / "log.txt")

    def stage(self, number: int, stage) -> None:
        out = self.paths.stage(stage.name)
        steps = stage.steps(self.job)
        settings = {step.name: step.settings for step in steps}
        inputs = input_digests(stage.inputs(self.job), self.paths.root)
        upstream = tuple(s for s in self.ran if any(name.split("/")[0] == s for name in inputs))
        missing = tuple(str(p) for p in stage.outputs(self.job) if not p.exists())
        forced = stage.name in self.args.force or "all" in self.args.force
        decision = decide(read_record(out), settings, inputs, forced, upstream, legacy_done=(out / "DONE").exists(),
                          missing=missing)
        banner = f"\n=== [{number}/{len(STAGES)}] {stage.name}"
        self.log[stage.name] = decision.action
        if decision.action == "skip":
            print(f"{banner}: done before with the same settings and inputs, skipped", flush=True)
            return
        verb = {"resume": "resumes", "fresh": "runs"}[decision.action]
        print(f"{banner}: {'would ' + verb.removesuffix('s') if self.args.dry_run else verb} "
              f"({'; '.join(decision.reasons)})", flush=True)
        if self.args.dry_run:
            self.ran.append(stage.name)
            return
        if decision.action == "fresh" and (out / "DONE").exists() and read_record(out) is None:
            legacy = out.with_name(f"{out.name}.legacy")  # an older pipeline's work: kept, never silently deleted
            shutil.rmtree(legacy, ignore_errors=True)
            out.rename(legacy)
            print(f"    its folder (no record of what produced it) is kept as {legacy}", flush=True)
        elif decision.action == "fresh":  # nothing a run with other settings left may be reused
            shutil.rmtree(out, ignore_errors=True)
        before = (read_record(out) or {}).get("seconds_so_far", 0.0) if decision.action == "resume" else 0.0
        out.mkdir(parents=True, exist_ok=True)
        self.current = stage.name
        record = {"stage": stage.name, "settings": settings, "inputs": inputs, "invocation": self.started,
                  "config": asdict(self.args), "commands": {s.name: s.command for s in steps if s.command}}
        write_record(out, status="running", **record)
        start = time.time()
        for step in steps:
            self.run_step(step)
            # the seconds of finished steps survive an interruption: a resumed stage's time is all of its steps'
            write_record(out, status="running", seconds_so_far=round(before + time.time() - start, 1), **record)
        self.timings[stage.name] = round(before + time.time() - start, 1)
        self.ran.append(stage.name)
        write_record(out, status="done", seconds=self.timings[stage.name], **record)
        print(f"=== {stage.name} finished in {self.timings[stage.name]:.0f} s", flush=True)

    def run_step(self, step: Step) -> None:
        if step.out is None:
            step.run()
            return
        if (step.out / "DONE").exists():
            print(f"--- {step.name}: done before, skipped", flush=True)
            return
        step.out.mkdir(parents=True, exist_ok=True)
        step.run()
        (step.out / "DONE").write_text("done\n")


def main(args: PipelineArguments) -> dict:
    paths = RunPaths(Path(args.run_dir).resolve())  # the scripts run from the repository root, we may not
    paths.root.mkdir(parents=True, exist_ok=True)
    run = Runner(args, paths)
    try:
        for number, stage in enumerate(STAGE_TABLE, start=1):
            run.stage(number, stage)
            if stage.name == args.until:
                break
    finally:
        if not args.dry_run:
            with paths.history.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"started": run.started, "config": asdict(args), "stages": run.log}) + "\n")
    if args.dry_run:
        return {"run_dir": str(paths.root), "stages": run.log}
    timings = json.loads(paths.timings.read_text())["timings_s"] if paths.timings.exists() else {}
    timings = {**timings, **run.timings}
    write_json({"timings_s": timings}, paths.timings)
    print("\nStage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {sum(timings.values()) / 60:.1f} min", flush=True)
    if args.until == "report":
        lines = paths.report_md.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
        table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))  # the comparison only
        print(f"\nHeld-out comparison ({paths.report_md}):\n" + "\n".join(table), flush=True)
    return {"run_dir": str(paths.root), "timings": run.timings, "stages": run.log}


def cli() -> None:
    setup_logging()
    (pipeline_args,) = parse_args(PipelineArguments)
    try:
        run_main(lambda: main(pipeline_args))
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
