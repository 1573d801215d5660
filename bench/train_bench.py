"""What the SFT/DPO benchmarks share: timing trained tokens per second, peak memory, one process per variant.

Peak CPU memory (``ru_maxrss``) only grows within a process, so each variant runs in a fresh child process
(``python <bench script> --variant NAME ...``) that prints one JSON line; the parent collects and compares.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time

from transformers import TrainerCallback

RESULT_TAG = "BENCH_RESULT "


class StepTimer(TrainerCallback):
    """Wall time and trained tokens of the steps after ``warmup`` (the first steps pay one-off costs)."""

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.seconds = 0.0
        self._start = None
        self._tokens_at_warmup = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.warmup:
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs and state.global_step == self.warmup:
            self._tokens_at_warmup = logs["num_tokens"]

    def result(self, state) -> dict:
        """``{"steps", "seconds", "tokens", "tokens_per_s"}`` over the timed steps (log every step for tokens)."""
        tokens = [row["num_tokens"] for row in state.log_history if "num_tokens" in row]
        trained = tokens[-1] - (self._tokens_at_warmup or 0) if tokens else 0
        steps = state.global_step - self.warmup
        return {"steps": steps, "seconds": round(self.seconds, 2), "tokens": int(trained),
                "tokens_per_s": round(trained / self.seconds, 1) if self.seconds else None}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (Linux reports KB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict) -> None:
    """Child side: print the variant's result for the parent."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_variant(script: str, variant: str, argv: list[str]) -> dict:
    """Parent side: run ``script --variant variant *argv`` in a fresh process and return its result."""
    proc = subprocess.run([sys.executable, script, "--variant", variant, *argv], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def to_argv(args) -> list[str]:
    """A bench's dataclass back to command-line flags for its child processes (variant selection left out)."""
    argv = []
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name in ("variant", "variants") or value is None or value == []:
            continue
        argv += [f"--{f.name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def run_variants(script: str, args, known) -> dict[str, dict]:
    """Run each of ``args.variants`` (checked against ``known``) in its own process; results by name."""
    unknown = set(args.variants) - set(known)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {list(known)}")
    results = {}
    for name in args.variants:
        print(f"running {name} ...", flush=True)
        results[name] = run_variant(script, name, to_argv(args))
    return results


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def print_table(results: dict[str, dict], columns: list[str]) -> None:
    width = max(len(name) for name in results) + 2
    print("variant".ljust(width) + "".join(c.rjust(16) for c in columns))
    for name, row in results.items():
        print(name.ljust(width) + "".join(str(row.get(c, "")).rjust(16) for c in columns))
