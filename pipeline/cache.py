"""Stage caching that knows its inputs: a stage's record says what produced its output, and a re-run compares.

A stage writes ``<stage>/stage.json`` when it starts (``status: running``) and again when it finishes (``done``):
its **settings** (per step: the script, its recipe's values overridden by the command line, or the values an
in-process step uses), the **digests** of the files it reads, the pipeline arguments of the invocation that ran it
and how long it took. On a re-run (:func:`decide`):

* the same settings and inputs as a finished record: the stage is skipped;
* the same as an interrupted record: it resumes (its resumable steps keep what they finished);
* anything else (a changed value, a changed input file, an upstream stage that re-ran, ``--force``, no record): the
  folder is emptied and the stage runs from scratch, printing why ("sft: max_steps 2 → 3").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from promptrec.tables import file_digest, require_path, write_json

RECORD = "stage.json"
# Flags that say where finished work is kept, not what the output is: left out of a step's settings, so turning a
# cache on (or moving it) does not re-run a finished stage.
UNTRACKED = frozenset({"prediction_cache"})


def input_digests(paths, root: Path) -> dict[str, str]:
    """``{path (relative to the run folder when inside it): digest}`` of the files a stage reads."""
    def name(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            return str(p)

    return {name(p): file_digest(p) for p in paths}


def parse_flags(argv: list[str]) -> dict[str, str]:
    """``["--a", "1", "--b=x y", "--c", "p", "q"]`` → ``{"a": "1", "b": "x y", "c": "p q"}`` (a flag's values
    joined by spaces; a later flag of the same name wins, as in argparse)."""
    flags: dict[str, list[str]] = {}
    key = None
    for token in map(str, argv):
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            flags[key] = [value] if eq else []
        elif key is not None:
            flags[key].append(token)
    return {k: " ".join(v) for k, v in flags.items()}


def command_settings(script: str, argv: list[str], repo: Path, root: Path) -> dict[str, str]:
    """What decides a command's output: its script, its recipe's values (``--config`` YAML) overridden by its flags
    (TrlParser's order), as strings, with the run folder written ``<run>`` (a moved run folder is the same run)."""
    flags = parse_flags(argv)
    values: dict[str, str] = {"script": script}
    if "config" in flags:
        recipe = Path(flags["config"]) if Path(flags["config"]).is_absolute() else repo / flags["config"]
        recipe = require_path(recipe, "file", hint=f"the recipe of {script}")
        loaded = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        values.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in loaded.items()})
    values.update(flags)
    return {k: v.replace(str(root), "<run>") for k, v in values.items() if k not in UNTRACKED}


def flatten(settings: dict[str, dict[str, str]]) -> dict[str, str]:
    """``{step: {key: value}}`` → ``{"step key": value}`` (a stage's only, unnamed step gives bare keys)."""
    return {(f"{step} {key}" if step else key): value for step, values in settings.items()
            for key, value in values.items()}


def changes(old: dict, new: dict) -> list[str]:
    """``["max_steps 2 → 3", "beta unset → 0.2"]``: the settings that differ between two records."""
    old, new = flatten(old), flatten(new)
    return [f"{key} {_short(old.get(key, 'unset'))} → {_short(new.get(key, 'unset'))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _short(value: str, width: int = 60) -> str:
    return value if len(value) <= width else value[:width - 1] + "…"


@dataclass(frozen=True)
class Decision:
    action: str  # "skip", "resume" or "fresh"
    reasons: tuple[str, ...] = ()


def decide(record: dict | None, settings: dict, inputs: dict[str, str], forced: bool = False,
           upstream: tuple[str, ...] = (), legacy_done: bool = False, missing: tuple[str, ...] = ()) -> Decision:
    """Whether a stage with this ``record`` (None: none) runs again for these ``settings`` and ``inputs``.
    ``upstream``: earlier stages that ran in this invocation; ``legacy_done``: the folder has only an old ``DONE``;
    ``missing``: outputs of the stage that are gone."""
    if forced:
        return Decision("fresh", ("--force",))
    if record is None:
        return Decision("fresh", ("finished by an older pipeline that kept no record of its settings",)
                        if legacy_done else ("not run before",))  # run.py moves a legacy folder aside
    reasons = changes(record.get("settings", {}), settings)
    old_inputs = record.get("inputs", {})
    reasons += [f"input {name} changed" for name in sorted(set(old_inputs) | set(inputs))  # an upstream re-run says it
                if old_inputs.get(name) != inputs.get(name) and name.split("/")[0] not in upstream]
    reasons += [f"upstream stage {', '.join(upstream)} re-ran"] if upstream else []
    reasons += [f"output {name} is missing" for name in missing] if record.get("status") == "done" else []
    if reasons:
        return Decision("fresh", tuple(reasons))
    if record.get("status") != "done":
        return Decision("resume", ("interrupted before: resuming with the same settings",))
    return Decision("skip")


def read_record(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_record(stage_dir: Path, **record) -> None:
    write_json(record, Path(stage_dir) / RECORD)
