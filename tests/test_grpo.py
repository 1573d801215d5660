"""dpo/grpo.py and its reward (promptrec/rewards.py): the SCS reward's order and floor, one GRPO step on the embedded
SmolLM2 (LoRA moves, base and the frozen SFT reference don't), the saved adapter through inference's code path, and
a 2-process ``accelerate launch`` on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from stage_helpers import REPO, assert_same_base, load_script, make_sft_run, recounted_fallbacks

from promptrec.cli import parse_args
from promptrec.rewards import UNUSABLE_REWARD, completion_text, length_penalty, scs_reward
from promptrec.scoring import Scorer

RECIPE = str(REPO / "dpo" / "configs" / "grpo_smollm2.yaml")
MAX_TEXT_TOKENS = 16


@pytest.fixture(scope="module")
def minilm() -> Scorer:
    return Scorer("embedded")


# ── the reward ──

def test_scs_reward_ranks_guesses_and_floors_unusable_ones(minilm, tiny_triplets):
    reward = scs_reward(minilm)
    assert reward.__name__ == "scs"
    truth = "Rewrite this as a short poem."
    row = tiny_triplets[tiny_triplets.rewrite_prompt == truth].iloc[0]
    guesses = [
        truth,                                                      # exact
        "Sure! Here is the instruction: \"Turn this into a poem.\"",  # a paraphrase, cleaned as at inference
        "Convert this recipe into a numbered list of steps.",        # unrelated
        "",                                                         # blank
        "!!! ??? ...",                                              # no letters
        "I'm sorry, I cannot help with that.",                      # refusal
        "poem poem poem poem poem poem poem poem poem",             # degenerate repetition
        "after three days of rain, and farmers lost most",          # a copy of the original text
    ]
    n = len(guesses)
    kwargs = {"rewrite_prompt": [truth] * n, "original_text": [row.original_text] * n,
              "rewritten_text": [row.rewritten_text] * n}
    plain = reward(prompts=[None] * n, completions=guesses, **kwargs)
    chat = reward(prompts=[None] * n, completions=[[{"role": "assistant", "content": g}] for g in guesses], **kwargs)

    assert chat == pytest.approx(plain)  # conversational and plain completions score alike
    exact, paraphrase, unrelated, *unusable = plain
    assert exact == pytest.approx(1.0, abs=1e-5) and exact > paraphrase > unrelated > UNUSABLE_REWARD
    assert unusable == [UNUSABLE_REWARD] * len(unusable) and UNUSABLE_REWARD == -1.0  # the minimum SCS
    assert all(isinstance(r, float) for r in plain)

    logged = {}
    reward(prompts=[None], completions=["1. Make it a poem."], rewrite_prompt=[truth],
           log_extra=lambda column, values: logged.setdefault(column, values))
    assert logged == {"cleaned": ["Make it a poem."]}
    with pytest.raises(ValueError, match="rewrite_prompt"):
        reward(prompts=[None], completions=["Make it a poem."])


def test_length_penalty_and_completion_text():
    penalty = length_penalty(max_words=4)
    assert penalty.__name__ == "length"
    words = lambda k: " ".join(["word"] * k)  # noqa: E731
    assert penalty(prompts=None, completions=[words(3), words(4), words(6), words(8), words(30)]) == [
        0.0, 0.0, -0.5, -1.0, -1.0]
    assert penalty(prompts=None, completions=[[{"role": "assistant", "content": words(6)}]]) == [-0.5]
    assert completion_text(None) == "" and completion_text([{"role": "assistant", "content": None}]) == ""


# ── training ──

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, embedded_model_dir):
    """A folder laid out like an sft/train.py run on the tiny triplets: a LoRA adapter (the smollm2 recipe's shape,
    small random weights so it differs from the base), tokenizer, run_config.json and split.parquet."""
    return make_sft_run(tmp_path_factory.mktemp("sft_run"), MAX_TEXT_TOKENS, lora_init_std=0.01)


def grpo_args(sft_run: Path, out: Path, *extra) -> list[str]:
    """The smollm2 recipe cut to one step of 2 prompts x 4 answers of at most 8 tokens."""
    return ["--config", RECIPE, "--sft_adapter", str(sft_run), "--output_dir", str(out), "--max_steps", "1",
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--max_completion_length", "8", "--learning_rate", "1e-3", "--save_strategy", "no",
            "--scorer", "embedded", "--max_new_tokens", "6", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def grpo_run(sft_run, tmp_path_factory):
    """One GRPO step with a KL term (beta > 0, so TRL keeps a frozen copy of the SFT adapter as "ref"), plus the
    SCS eval on the SFT run's 2 eval triplets. Returns ``(trainer, output_dir)``."""
    from trl import GRPOConfig

    script = load_script("dpo/grpo.py")
    out = tmp_path_factory.mktemp("grpo") / "run"
    argv = grpo_args(sft_run, out, "--beta", "0.04", "--eval_scs_samples", "2", "--length_penalty_weight", "0.5")
    return script.main(*parse_args(script.GRPOScriptArguments, GRPOConfig, script.InheritedModelConfig,
                                   args=argv)), out


@pytest.mark.slow
def test_one_grpo_step_moves_the_adapter_only(grpo_run, sft_run):
    from safetensors.torch import load_file

    from promptrec.models import load_model

    trainer, out = grpo_run
    model = trainer.accelerator.unwrap_model(trainer.model)
    sft = load_file(str(sft_run / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert trained.keys() == sft.keys()
    assert any(not torch.equal(trained[k], sft[k]) for k in sft)  # the LoRA weights moved

    # The reference is the SFT adapter, frozen: TRL's "ref" copy (PEFT >= 0.20) still holds the SFT weights.
    ref = {k.replace(".ref.", "."): p for k, p in model.named_parameters() if ".ref." in k}
    assert ref and all(not p.requires_grad for p in ref.values())
    assert ref.keys() == sft.keys()
    for key, value in sft.items():
        torch.testing.assert_close(ref[key], value)
    assert_same_base(model, load_model("embedded", dtype="float32"))  # the base did not move

    logs = [row for row in trainer.state.log_history if "rewards/scs/mean" in row]
    assert logs and -1 <= logs[0]["rewards/scs/mean"] <= 1 and "rewards/length/mean" in logs[0]
    assert not (out / "ref").exists()
    config = json.loads((out / "run_config.json").read_text())
    assert config["stage"] == "grpo" and config["max_text_tokens"] == MAX_TEXT_TOKENS
    assert config["GRPOConfig"]["reward_weights"] == [1.0, 0.5]
    scs = json.loads((out / "metrics.json").read_text())["scs"]
    assert scs["n"] == 2 and all(-1 <= scs[k] <= 1 for k in ("grpo", "sft"))
    completions = pd.concat(pd.read_parquet(p) for p in (out / "completions").glob("*.parquet"))
    assert len(completions) == 8 and {"completion", "scs", "length", "cleaned", "advantage"} <= set(completions)


@pytest.mark.slow
def test_saved_adapter_predicts_through_inference(grpo_run, tiny_triplets, tmp_path):
    from promptrec.predict import PredictArguments, predict_file

    _, out = grpo_run
    test = tiny_triplets.head(3)[["id", "original_text", "rewritten_text"]]
    test.to_csv(tmp_path / "test.csv", index=False)
    args = PredictArguments(input=str(tmp_path / "test.csv"), output=str(tmp_path / "submission.csv"),
                            adapter=str(out), max_new_tokens=8, progress=False, raw_output=str(tmp_path / "raw.csv"))
    submission = predict_file(args)
    assert submission["id"].tolist() == test["id"].tolist()
    # An adapter this close to the base (one step from small random LoRA weights) is no better than the base, which
    # falls back on most rows (measured: 7 of the 8 tiny triplets at 4 tokens): no bound on their number, but each
    # is counted, and is what the unusable-answer rule says of the raw answers.
    config = json.loads((tmp_path / "submission.config.json").read_text())
    assert config["rows"] == 3 and config["fallbacks"] == recounted_fallbacks(tmp_path / "test.csv",
                                                                              tmp_path / "raw.csv")
    assert (submission["rewrite_prompt"] == config["postprocess"]["mean_prompt"]).sum() == config["fallbacks"]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(sft_run, tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "dpo/accelerate/multi_cpu.yaml", "dpo/grpo.py",
           *grpo_args(sft_run, out, "--per_device_train_batch_size", "4", "--eval_scs_samples", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    assert config["world_size"] == 2 and config["GRPOConfig"]["generation_batch_size"] == 8  # 2 prompts x 4
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["train_runtime"] > 0 and metrics["scs"]["n"] == 2  # eval sharded over 2 ranks
