"""The main job at its smallest size: every stage runs, the report has every row; a re-run skips what is unchanged
and re-runs what changed, from the changed stage on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stage_helpers import TINY_GRPO

REPO = Path(__file__).resolve().parents[1]
# Every optional stage at its smallest: a second DPO round (6 fresh triplets a round), GRPO with 2 answers of 8
# tokens per prompt for one step, MBR decoding over 2 samples, a reward model (2 steps) reranking those samples.
# Each training step sees 2 rows (pairs), not the recipes' 8: a step of 8 took 40-70 s on a float32 CPU, and the
# steps' size is no part of the hand-offs under test. Selection scores one interpolation (α 0.5), not three.
EXTRA = (TINY_GRPO, "sft:--per_device_train_batch_size 2", "dpo:--per_device_train_batch_size 1",
         "reward:--per_device_train_batch_size 2")
PIPELINE = [sys.executable, str(REPO / "pipeline" / "run.py"), "--config", "pipeline/configs/smollm2.yaml",
            "--size", "tiny", "--dpo_rounds", "2", "--candidate_triplets", "6", "--mbr_candidates", "2",
            "--grpo_recipe", "dpo/configs/grpo_smollm2.yaml", "--control", "true", "--control_seconds", "10",
            "--reward_recipe", "reward/configs/rm_smollm2.yaml", "--select_alphas", "0.5"]
SKIPPED = "done before with the same settings and inputs, skipped"
# constant, mean prompt, base zero-shot, SFT, DPO, DPO + mean prompt, iterative DPO, SFT continued, GRPO, MBR,
# RM rerank, RM + MBR, oracle
METHODS = 13


def assert_round_two_is_on_policy(run_dir: Path) -> None:
    """Round 2 of on-policy DPO: its candidates are the round-1 DPO adapter's own samples, of train triplets round 1
    never used; its pairs reject only those samples; its DPO starts from the round-1 adapter."""
    round2 = run_dir / "iterate" / "round2"
    manifest = json.loads((round2 / "candidates" / "candidates.manifest.json").read_text())
    assert Path(manifest["policy"]["adapter"]).resolve() == (run_dir / "dpo" / "selected").resolve()  # round 1's pick
    first = set(pd.read_parquet(run_dir / "candidates" / "triplets.parquet").id)
    second = set(pd.read_parquet(round2 / "candidates" / "triplets.parquet").id)
    train = set(pd.read_parquet(run_dir / "split" / "train.parquet").id)
    assert second and second <= train and not first & second
    pairs = pd.read_json(round2 / "pairs" / "train.jsonl", lines=True)
    assert len(pairs) and set(pairs.source_rejected) == {"policy"}
    config = json.loads((round2 / "dpo" / "run_config.json").read_text())
    assert config["DPOScriptArguments"]["sft_adapter"] == str(run_dir / "dpo" / "selected")  # from round 1's pick
    assert (round2 / "dpo" / "split.parquet").exists()  # the SFT run's rows travel along the chain


def assert_choices_made_on_validation(run_dir: Path, md: str) -> None:
    """Three sides disjoint by prompt cluster; each DPO round scored SFT, its checkpoints and interpolations on the
    validation rows and shipped the best; the predict stage decoded those picks; the report lists the choices."""
    sides = {s: pd.read_parquet(run_dir / "split" / f"{s}.parquet") for s in ("train", "validation", "heldout")}
    clusters = {s: set(df.prompt_cluster) for s, df in sides.items()}
    assert all(clusters.values()) and not clusters["train"] & clusters["validation"]
    assert not clusters["heldout"] & (clusters["train"] | clusters["validation"])
    rows = json.loads((run_dir / "predict" / "rows.json").read_text())
    for po, row in ((run_dir / "dpo", "dpo"), (run_dir / "iterate" / "round2" / "dpo", "iterate")):
        selection = json.loads((po / "selected" / "selection.json").read_text())
        names = [r["name"] for r in selection["validation"]]
        assert names[0] == "sft" and "step1" in names and "step2" in names and "alpha0.5" in names
        means = {r["name"]: r["mean"] for r in selection["validation"]}
        assert means[selection["picked"]] == max(means.values())
        assert selection["n_validation"] == len(sides["validation"])
        assert (po / "checkpoint-1" / "adapter_model.safetensors").exists()
        assert Path(rows[row]["adapter"]) == po / "selected"
    assert "Choices made on validation rows" in md and "**picked**" in md and "Opening words" in md
    control = json.loads((run_dir / "control" / "run_config.json").read_text())  # SFT, continued
    assert control["stage"] == "sft_continued" and Path(control["init_adapter"]) == run_dir / "sft"
    sampled = set(pd.concat([pd.read_parquet(f) for f in run_dir.glob("**/candidates/triplets.parquet")]).id)
    assert not sampled & set(pd.read_parquet(run_dir / "control" / "split.parquet").id)  # rows no DPO round used
    assert json.loads((run_dir / "control" / "metrics.json").read_text())["time_limit"]["max_train_seconds"] == 10
    assert (run_dir / "control" / "selected" / "selection.json").exists()


def assert_reward_rows(run_dir: Path, report: dict, md: str) -> None:
    """The reward stage trained on pairs whose chosen side is never the true prompt; the RM rows are picks among
    the MBR decode's own candidates, the hybrid weight was chosen on the validation decode; the oracle bounds them."""
    pairs = pd.read_json(run_dir / "reward" / "pairs" / "train.jsonl", lines=True)
    assert len(pairs) and "true" not in set(pairs.source_chosen)
    metrics = json.loads((run_dir / "reward" / "model" / "metrics.json").read_text())
    assert json.loads((run_dir / "reward" / "model" / "run_config.json").read_text())["stage"] == "reward_model"
    assert "train" in metrics
    rerank = json.loads((run_dir / "predict" / "rerank.json").read_text())["validation"]
    assert rerank["mbr_weight"] in (0.25, 0.5, 1.0, 2.0) and rerank["rows"] == 8  # tiny: 8 validation rows
    assert (run_dir / "predict" / "validation" / "mbr.raw.parquet").is_file()  # the weight's own decode
    raw = pd.read_parquet(run_dir / "predict" / "mbr.raw.parquet")
    from promptrec.rerank import recorded, rule_picks

    _, mbr, rewards = recorded(raw)
    assert rule_picks("mbr", mbr, rewards) == raw.selected_index.tolist()  # the file re-picks what predict picked
    rm = pd.read_csv(run_dir / "predict" / "rm.csv")
    assert rm.id.tolist() == raw.id.tolist() and rm.rewrite_prompt.str.strip().astype(bool).all()
    for prompt, candidates, r in zip(rm.rewrite_prompt, raw.candidates, rewards):
        if len(r):  # the highest reward (the first of equals), not the MBR pick
            assert prompt == json.loads(candidates)[int(np.argmax(np.round(r, 9)))]
    assert {"rm − iterate", "rm_mbr − iterate", "rm − mbr", "oracle − iterate"} <= set(report["paired"])
    assert "of the oracle's headroom" in md and "Chosen on 8 validation rows" in md


@pytest.mark.slow
def test_pipeline_tiny_end_to_end_then_rerun_skips(tmp_path, embedded_model_dir):
    run_dir = tmp_path / "run"
    first = subprocess.run([*PIPELINE, "--extra", *EXTRA, "--run_dir", str(run_dir)], cwd=REPO, capture_output=True,
                           text=True, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["rows"]) == METHODS
    assert all(math.isfinite(r["mean_scs"]) and r["example"].strip() for r in report["rows"])
    assert (run_dir / "report.png").stat().st_size > 0
    md = (run_dir / "report.md").read_text()
    assert md.count("\n| ") >= METHODS + 1
    for stage in ("sft", "dpo", "grpo", "iterate/round2/dpo"):
        assert (run_dir / stage / "adapter_config.json").exists()
    assert {"mbr − iterate", "iterate − control"} <= set(report["paired"]) and [r["id"] for r in report["rows"]] == [
        "constant", "mean_prompt", "base", "sft", "dpo", "dpo_mean", "iterate", "control", "grpo", "mbr", "rm",
        "rm_mbr", "oracle"]
    assert "MBR decoding (iterate, N=2) − iterative DPO adapter (2 rounds), paired" in md
    assert "prompt clusters" in md  # the intervals resample clusters, not rows
    assert_round_two_is_on_policy(run_dir)
    assert_choices_made_on_validation(run_dir, md)
    assert_reward_rows(run_dir, report, md)
    recorded = {r["id"]: r["fallbacks"] for r in report["rows"]}  # answers the mean prompt stood in for
    assert recorded["constant"] is None and "| mean-prompt fallbacks |" in md
    keys = {}  # greedy rows go through the run's prediction cache: an adapter decoded before is reused
    for name in ("base", "sft", "dpo", "iterate", "control", "grpo", "mbr"):
        config = json.loads((run_dir / "predict" / f"{name}.config.json").read_text())
        assert recorded[name] == config["fallbacks"] and 0 <= config["fallbacks"] <= config["rows"] == 6
        if name != "mbr":  # (sampled: never cached)
            cache = config["prediction_cache"]
            assert cache["reused"] == (cache["key"] in keys.values())  # the same bytes twice (SFT shipped): reused
            keys[name] = cache["key"]
    assert sorted(p.stem for p in (run_dir / "predict_cache").glob("*.json")) == sorted(set(keys.values()))

    def again(*argv, extra=EXTRA):
        proc = subprocess.run([*PIPELINE, "--extra", *extra, "--run_dir", str(run_dir), *argv], cwd=REPO,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {line.split("] ", 1)[1].split(":")[0]: line.split(": ", 1)[1] for line in proc.stdout.splitlines()
                if line.startswith("=== [")}, proc

    plan, second = again()  # unchanged: every stage skipped, no command started
    assert list(plan.values()) == [SKIPPED] * 13 and "$ " not in second.stderr
    plan, _ = again("--size", "small", "--dry_run", "true")  # another size: every stage that depends on it
    assert plan["rewrite"] == SKIPPED  # the same 504 bundled rows at every size
    assert "max_heldout 6 → 120" in plan["split"] and "max_steps 2 → 40" in plan["sft"]
    assert all(plan[s].startswith("would run") for s in list(plan)[1:])
    changed = (*EXTRA, "dpo:--beta 0.2")
    plan, _ = again("--dry_run", "true", extra=changed)  # a changed DPO override: DPO onward, not SFT or GRPO
    assert [s for s, p in plan.items() if p != SKIPPED] == ["dpo", "iterate", "control", "predict", "report"]
    assert "beta 0.1 → 0.2" in plan["dpo"] and "round2/dpo beta 0.1 → 0.2" in plan["iterate"]
    sft_record = (run_dir / "sft" / "stage.json").read_text()
    plan, _ = again("--until", "dpo", extra=changed)  # and it does what it said
    assert plan["dpo"].startswith("runs (dpo beta 0.1 → 0.2") and plan["sft"] == SKIPPED
    assert (run_dir / "sft" / "stage.json").read_text() == sft_record
    assert json.loads((run_dir / "dpo" / "run_config.json").read_text())["DPOConfig"]["beta"] == 0.2
    # every real invocation is appended, none rewritten (dry runs record nothing): the first still names its own
    history = [json.loads(line) for line in (run_dir / "invocations.jsonl").read_text().splitlines()]
    assert len(history) == 3 and history[0]["config"]["until"] == "report" and history[2]["config"]["until"] == "dpo"
    assert "dpo:--beta 0.2" in history[2]["config"]["extra"] and "dpo:--beta 0.2" not in history[0]["config"]["extra"]
    assert not (run_dir / "pipeline_config.json").exists()  # no "latest arguments" file to contradict the rows


def test_readme_pipeline_commands_and_configs_parse():
    """Every `pipeline/run.py` command in README.md and every pipeline config parses with the pipeline's parser."""
    import shlex

    from promptrec.cli import parse_args

    sys.path.insert(0, str(REPO / "pipeline"))
    from stage_helpers import load_script

    cls = load_script("pipeline/run.py").PipelineArguments
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line.split("pipeline/run.py", 1)[1].split("#")[0]) for line in text.splitlines()
                if "pipeline/run.py --config" in line and line.lstrip().startswith(".venv/bin/python")]
    commands += [["--config", str(p)] for p in sorted((REPO / "pipeline" / "configs").glob("*.yaml"))]
    assert len(commands) >= 7
    for argv in commands:
        (args,) = parse_args(cls, args=argv)
        for recipe in (args.sft_recipe, args.candidates_recipe, args.pairs_recipe, args.dpo_recipe,
                       args.grpo_recipe or args.dpo_recipe, args.reward_recipe or args.dpo_recipe,
                       args.reward_pairs_recipe):
            assert (REPO / recipe).is_file(), recipe
    (real,) = parse_args(cls, args=["--config", str(REPO / "pipeline/configs/real_gemma.yaml")])
    assert real.reward_recipe == "reward/configs/rm_smollm2.yaml" and real.mbr_candidates == 4  # on there


@pytest.mark.slow
def test_generation_path_feeds_the_pipeline(tmp_path, embedded_model_dir):
    """pipeline/configs/smollm2_generate.yaml: the embedded model writes the rewrites the later stages split."""
    run_dir = tmp_path / "gen"
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), "--config",
                           "pipeline/configs/smollm2_generate.yaml", "--size", "tiny", "--until", "split",
                           "--run_dir", str(run_dir)], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rewrites = pd.read_parquet(run_dir / "rewrite" / "triplets.parquet")
    manifest = json.loads((run_dir / "rewrite" / "triplets.parquet.manifest.json").read_text())
    assert manifest["generator"] == "embedded" and len(rewrites) == manifest["rows"] > 0
    split = pd.concat([pd.read_parquet(run_dir / "split" / f"{s}.parquet") for s in ("train", "heldout")])
    assert set(split["id"]) <= set(rewrites["id"]) and not (run_dir / "mean_prompt").exists()
    assert "Stage times (s): rewrite" in proc.stdout


def test_a_forced_stage_starts_from_an_empty_folder(tmp_path, embedded_model_dir):
    """--force redoes a stage from scratch: nothing a resumable step left there (old parts) is reused."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "--config", "pipeline/configs/smollm2.yaml", "--size",
           "tiny", "--until", "split", "--run_dir", str(run_dir)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, check=False).returncode == 0
    stale = run_dir / "split" / "stale.parts"
    stale.mkdir()
    again = subprocess.run([*cmd, "--force", "split"], cwd=REPO, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and not stale.exists()
    assert json.loads((run_dir / "split" / "stage.json").read_text())["status"] == "done"


@pytest.mark.parametrize(("bf16", "cpu_bf16", "expected"), [
    ("auto", True, ["--use_cpu", "true", "--bf16", "true"]),
    ("auto", False, ["--use_cpu", "true", "--bf16", "false"]),
    ("false", True, ["--use_cpu", "true", "--bf16", "false"]),  # forced: the recipe's weights, no autocast
])
def test_training_cli_turns_bf16_autocast_on_only_on_a_bf16_cpu(monkeypatch, bf16, cpu_bf16, expected):
    import torch

    import promptrec.models
    from promptrec.cli import parse_args

    sys.path.insert(0, str(REPO / "pipeline"))
    from stage_helpers import load_script

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(promptrec.models, "cpu_has_bf16", lambda cpuinfo=None: cpu_bf16)
    (args,) = parse_args(load_script("pipeline/run.py").PipelineArguments, args=["--bf16", bf16])
    assert args.training_cli() == expected
