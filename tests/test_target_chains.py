"""The GPU user's chains (Phi-2, Mistral-7B): the standalone recipes hand off to each other, and each pipeline config
runs end to end on the CPU at tiny random shapes, overriding only the model path, the size, the data and the rows a
training step sees, never the recipes' structure; the adapter it ends with loads through the notebook's code path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from stage_helpers import TINY_GRPO, recounted_fallbacks, tiny_target_checkpoint

from promptrec.predict import PredictArguments, predict_file
from promptrec.tables import DataError
from promptrec.training import check_pairs_format

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"phi2": "phi", "mistral7b": "mistral"}
# one row (pair, prompt) a micro-batch and no accumulation: the GPU recipes' 16-64 rows of ~1,000 tokens a step over
# a 49k vocabulary took 60 s a DPO step and 3 min a GRPO step of a 2-layer model on a float32 CPU
ROWS_PER_STEP = ("sft:--per_device_train_batch_size 1 --gradient_accumulation_steps 1",
                 "dpo:--per_device_train_batch_size 1 --gradient_accumulation_steps 1",
                 TINY_GRPO)


def recipe(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


@pytest.mark.parametrize("target", [*TARGETS, "smollm2_generate"])
def test_standalone_recipes_hand_off_to_each_other(target):
    """Each stage's recipe reads what the previous stage's recipe writes (the README's standalone commands)."""
    chain = {"grpo_recipe": "dpo/configs/grpo_smollm2.yaml", **recipe(f"pipeline/configs/{target}.yaml")}
    rewrite = recipe(chain["rewrite_recipe"])
    sft = recipe(chain["sft_recipe"])
    cands = recipe(chain["candidates_recipe"])
    pairs = recipe(chain["pairs_recipe"])
    dpo = recipe(chain["dpo_recipe"])
    grpo = recipe(chain["grpo_recipe"])
    assert grpo["sft_adapter"] == sft["output_dir"] and "model_name_or_path" not in grpo
    assert sft["triplets"] == rewrite["output"] == cands["triplets"]
    assert cands["policy_adapter"] == sft["output_dir"] == dpo["sft_adapter"]
    assert pairs["candidates"] == f"{cands['output_dir']}/candidates.parquet"
    pairs_dir = str(Path(pairs["candidates"]).with_name("pairs"))
    assert dpo["train_pairs"] == f"{pairs_dir}/train.jsonl" and dpo["eval_pairs"] == f"{pairs_dir}/eval.jsonl"
    # the pairs' eval split is SFT's (no eval prompt trained on), and the budget is SFT's alone
    assert (pairs["split_by"], pairs["eval_fraction"], pairs["seed"]) == (sft["split_by"], sft["eval_fraction"],
                                                                           sft["seed"])
    for later in (cands, pairs, dpo):
        assert "max_text_tokens" not in later and "tokenizer" not in later
    assert "model_name_or_path" not in dpo and sft["model_name_or_path"] == chain["model"]


def test_dpo_refuses_pairs_rendered_with_another_budget(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"max_text_tokens": 100}))
    check_pairs_format(str(tmp_path / "train.jsonl"), 100)
    with pytest.raises(DataError, match="cut texts to 100 tokens.*max_text_tokens 384"):
        check_pairs_format(str(tmp_path / "train.jsonl"), 384)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_target_pipeline_runs_end_to_end_at_tiny_shapes(tmp_path, target, embedded_model_dir):
    model = tiny_target_checkpoint(TARGETS[target], tmp_path / f"tiny-{target}")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "--config", f"pipeline/configs/{target}.yaml",
           "--model", str(model), "--triplets", "reference", "--max_triplets", "40", "--size", "tiny",
           "--run_dir", str(run_dir), "--extra", *ROWS_PER_STEP]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    budget = recipe(f"pipeline/configs/{target}.yaml")["max_text_tokens"]
    sft = json.loads((run_dir / "sft" / "run_config.json").read_text())
    dpo = json.loads((run_dir / "dpo" / "run_config.json").read_text())
    assert sft["model_name_or_path"] == dpo["model_name_or_path"] == str(model)
    assert sft["max_text_tokens"] == dpo["max_text_tokens"] == budget and sft["load_in_4bit"] and dpo["load_in_4bit"]
    cands = json.loads((run_dir / "candidates" / "candidates.manifest.json").read_text())
    assert cands["policy"]["max_text_tokens"] == budget and cands["policy"]["load_in_4bit"]
    pairs = json.loads((run_dir / "pairs" / "summary.json").read_text())
    # rendered with the SFT run's tokenizer, as the candidates kept it (candidates/policy survives a move)
    assert pairs["max_text_tokens"] == budget and pairs["tokenizer"] == str(run_dir / "candidates" / "policy")
    assert len(json.loads((run_dir / "report.json").read_text())["rows"]) == 7  # GRPO included

    # the notebook's code path (predict_file with an adapter folder and nothing else)
    test = run_dir / "split" / "test.csv"
    out = tmp_path / "submission.csv"
    predict_file(PredictArguments(input=str(test), output=str(out), adapter=str(run_dir / "dpo"), max_new_tokens=8,
                                  progress=False, raw_output=str(tmp_path / "raw.csv")))
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub["id"]) == list(pd.read_csv(test)["id"])
    # random tiny weights: no bound on the fallbacks, but each is counted as the unusable-answer rule says
    config = json.loads((tmp_path / "submission.config.json").read_text())
    assert config["rows"] == len(sub) and config["fallbacks"] == recounted_fallbacks(test, tmp_path / "raw.csv")
    resolved = json.loads((tmp_path / "submission.config.json").read_text())["resolved"]
    assert resolved == {"model": str(model), "adapter": str(run_dir / "dpo"), "max_text_tokens": budget,
                        "load_in_4bit": True}
