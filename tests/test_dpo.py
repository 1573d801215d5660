"""dpo/train.py on the embedded SmolLM2 from an SFT adapter: in-process (margins rise, base untouched, SCS beside
the SFT adapter's) and under ``accelerate launch`` with 2 CPU processes (DDP over gloo, and DeepSpeed ZeRO-2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stage_helpers import (
    REPO,
    assert_resumed_like_straight,
    assert_same_base,
    count_training_steps,
    load_script,
    make_sft_run,
    run_killed_at_step,
)

from promptrec.cli import parse_args
from promptrec.models import load_tokenizer
from promptrec.templates import recovery_answer, recovery_messages

RECIPE = str(REPO / "dpo" / "configs" / "smollm2.yaml")
MAX_TEXT_TOKENS = 16


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, embedded_model_dir):
    """A folder laid out like an sft/train.py run (stage_helpers.make_sft_run), and pairs over its triplets."""
    import pandas as pd

    root = tmp_path_factory.mktemp("sft_run")
    run = make_sft_run(root, MAX_TEXT_TOKENS)
    triplets = pd.read_json(root / "triplets.jsonl", lines=True)

    # Pairs in TRL's conversational preference format, as data_generation/build_pairs.py writes them.
    pairs = [{"id": row.id, "prompt": recovery_messages(row.original_text, row.rewritten_text, None, MAX_TEXT_TOKENS),
              "chosen": recovery_answer(row.rewrite_prompt),
              "rejected": recovery_answer(triplets.rewrite_prompt[(i + 3) % len(triplets)]),
              "score_chosen": 1.0, "score_rejected": 0.05, "source_chosen": "truth", "source_rejected": "bank"}
             for i, row in enumerate(triplets.itertuples())]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return run


def dpo_args(sft_run: Path, out: Path, *extra) -> list[str]:
    """The smollm2 recipe cut to a few steps on 4 pairs (every step sees all of them)."""
    pairs = str(sft_run.parent / "pairs.jsonl")
    return ["--config", RECIPE, "--sft_adapter", str(sft_run), "--train_pairs", pairs, "--max_train_pairs", "4",
            "--output_dir", str(out), "--max_length", "160", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no", "--scorer", "embedded",
            "--max_new_tokens", "6", "--seed", "0", *extra]


@pytest.mark.slow
def test_dpo_raises_margins_keeps_base_and_scores_beside_sft(sft_run, tmp_path):
    from trl import DPOConfig

    from promptrec.models import load_model
    from promptrec.run_config import split_rows

    script = load_script("dpo/train.py")
    out = tmp_path / "dpo"
    argv = dpo_args(sft_run, out, "--max_steps", "3", "--eval_pairs", str(sft_run.parent / "pairs.jsonl"),
                    "--max_eval_pairs", "4", "--eval_on_start", "true", "--eval_strategy", "steps",
                    "--eval_steps", "100", "--eval_scs_samples", "2")
    parsed = parse_args(script.DPOScriptArguments, DPOConfig, script.InheritedModelConfig, args=argv)
    trainer = script.main(*parsed)

    # On the pairs it trained on: margins start at 0 (policy = reference = SFT adapter) and rise, and the
    # chosen prompt gains log-probability over the rejected one.
    evals = [row for row in trainer.state.log_history if "eval_rewards/margins" in row]
    first, last = evals[0], evals[-1]
    assert abs(first["eval_rewards/margins"]) < 1e-4
    assert last["eval_rewards/margins"] > 0.05 and last["eval_rewards/accuracies"] >= 0.75
    gap = lambda row: row["eval_logps/chosen"] - row["eval_logps/rejected"]  # noqa: E731
    assert gap(last) > gap(first)

    # Only the adapter trained: every base weight equals a fresh load.
    assert_same_base(trainer.model, load_model("embedded", dtype="float32"))

    # One adapter saved (not TRL's frozen "ref" copy), the SFT run's settings inherited, SCS beside SFT's.
    assert (out / "adapter_model.safetensors").exists() and not (out / "ref").exists()
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_name_or_path"] == "embedded" and config["max_text_tokens"] == MAX_TEXT_TOKENS
    scs = json.loads((out / "metrics.json").read_text())["scs"]
    assert scs["n"] == 2 and set(scs) >= {"dpo", "sft"} and all(-1 <= scs[k] <= 1 for k in ("dpo", "sft"))
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == split_rows(sft_run, "eval")["id"].tolist()[:2]
    assert split_rows(out, "eval").equals(split_rows(sft_run, "eval"))  # carried on for a next round
    assert (out / "README.md").read_text().count("DPO") >= 2  # our model card, not TRL's


@pytest.mark.slow
def test_killed_dpo_run_resumes_to_the_same_adapter(sft_run, tmp_path, monkeypatch):
    """kill -9 after the step-2 checkpoint, then ``--resume_from_checkpoint last``: the resumed run logs the same
    losses and saves the same adapter as one never killed (the reference log-probs are precomputed again)."""
    from trl import DPOConfig, DPOTrainer

    script = load_script("dpo/train.py")

    def argv(out, *extra):
        return dpo_args(sft_run, out, "--max_steps", "4", "--per_device_train_batch_size", "2", "--eval_pairs",
                        "none", "--eval_scs_samples", "0", "--save_strategy", "steps", "--save_steps", "2", *extra)

    def run(out, *extra):
        return script.main(*parse_args(script.DPOScriptArguments, DPOConfig, script.InheritedModelConfig,
                                       args=argv(out, *extra)))

    straight = run(tmp_path / "straight")
    killed = run_killed_at_step("dpo/train.py", "DPOTrainer", argv(tmp_path / "killed"), step=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "run_config.json").exists()
    steps = count_training_steps(monkeypatch, DPOTrainer)
    resumed = run(tmp_path / "killed", "--resume_from_checkpoint", "last")
    assert steps == [2, 3]  # only the steps after the checkpoint were trained again

    assert_resumed_like_straight(resumed, straight, tmp_path / "killed", tmp_path / "straight", steps=4)


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory, embedded_model_dir) -> Path:
    """A bare PEFT adapter (no run_config.json) of another rank and targets than the SFT run's, with non-zero
    ``lora_B``, so it is neither the start adapter nor the base."""
    from peft import LoraConfig, get_peft_model

    from promptrec.models import load_model

    path = tmp_path_factory.mktemp("other") / "adapter"
    model = get_peft_model(load_model("embedded", dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


def assert_ref_is(model, adapter: Path) -> None:
    """Adapter "ref" of ``model`` holds exactly ``adapter``'s saved weights and is frozen; "default" is the active,
    trainable one."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    want = load_file(str(adapter / "adapter_model.safetensors"))
    got = get_peft_model_state_dict(model, adapter_name="ref")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert model.active_adapter == "default"
    lora = {name: param.requires_grad for name, param in model.named_parameters() if "lora_" in name}
    assert not any(grad for name, grad in lora.items() if ".ref." in name)
    assert all(grad for name, grad in lora.items() if ".default." in name)


@pytest.mark.slow
def test_ref_adapter_is_the_reference_and_the_start_adapter_stays_the_sft_baseline(sft_run, other_adapter, tmp_path):
    """``--ref_adapter``: adapter "ref" is that adapter (another rank: not the start adapter), the precomputed
    reference log-probs come from it (margins at step 0 are not 0, as they are when the reference is the start
    adapter), a step trains, and the SCS eval still compares with the start adapter."""
    from trl import DPOConfig

    script = load_script("dpo/train.py")
    out = tmp_path / "dpo"
    argv = dpo_args(sft_run, out, "--max_steps", "1", "--ref_adapter", str(other_adapter), "--eval_pairs",
                    str(sft_run.parent / "pairs.jsonl"), "--max_eval_pairs", "4", "--eval_on_start", "true",
                    "--eval_strategy", "steps", "--eval_steps", "100", "--eval_scs_samples", "1")
    trainer = script.main(*parse_args(script.DPOScriptArguments, DPOConfig, script.InheritedModelConfig, args=argv))

    model = trainer.accelerator.unwrap_model(trainer.model)
    assert_ref_is(model, other_adapter)
    assert "start" not in model.peft_config  # the start adapter was loaded for the SCS eval only
    first = next(row for row in trainer.state.log_history if "eval_rewards/margins" in row)
    assert abs(first["eval_rewards/margins"]) > 1e-3
    assert trainer.state.global_step == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference_adapter"] == str(other_adapter) and metrics["scs"]["n"] == 1
    assert set(metrics["scs"]) >= {"dpo", "sft"}
    config = json.loads((out / "run_config.json").read_text())
    assert config["DPOScriptArguments"]["ref_adapter"] == str(other_adapter)
    assert (out / "adapter_model.safetensors").exists() and not (out / "ref").exists() and not (out / "start").exists()


def test_ref_adapter_swaps_at_init_without_precompute(sft_run, other_adapter, tmp_path):
    """Without precompute_ref_log_probs the reference runs online: "ref" is swapped by the end of ``__init__``."""
    from trl import DPOConfig

    from promptrec.models import load_model
    from promptrec.training import read_pairs

    script = load_script("dpo/train.py")
    args = DPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=False, use_cpu=True, report_to="none",
                     max_length=160)
    model = load_model("embedded", adapter=str(sft_run), dtype="float32", is_trainable=True)
    trainer = script.RefAdapterDPOTrainer(model=model, args=args, processing_class=load_tokenizer(sft_run),
                                          train_dataset=read_pairs(str(sft_run.parent / "pairs.jsonl"), 2),
                                          ref_adapter=str(other_adapter))
    assert_ref_is(trainer.model, other_adapter)


def test_bad_ref_adapter_is_a_one_line_error(sft_run, tmp_path):
    from promptrec.models import ModelNotFoundError
    from promptrec.run_config import read_run_config
    from promptrec.tables import DataError

    script = load_script("dpo/train.py")
    sft = read_run_config(sft_run)
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=rf"^{re.escape(str(missing))}: no such directory \(--ref_adapter\)$"):
        script.check_ref_adapter(str(missing), sft)
    with pytest.raises(ModelNotFoundError, match=rf"^{re.escape(str(tmp_path))}: no adapter_config.json"):
        script.check_ref_adapter(str(tmp_path), sft)
    script.check_ref_adapter(str(sft_run), sft)  # a run folder on the same base is fine
    (parsed, *_) = parse_args(script.DPOScriptArguments, args=["--ref_adapter", "none"])
    assert parsed.ref_adapter is None


LAUNCHERS = {
    # accelerate's MULTI_GPU launcher + the recipe's use_cpu=True: 2 processes over gloo (see multi_cpu.yaml).
    "ddp": ["--config_file", "dpo/accelerate/multi_cpu.yaml"],
    # DeepSpeed ZeRO-2 on the CPU works only with use_cpu=True (the recipe's); the first run on a machine compiles
    # DeepSpeed's shared-memory allreduce op (~1 min, cached in ~/.cache/torch_extensions).
    "zero2": ["--config_file", "dpo/accelerate/zero2.yaml", "--num_processes", "2", "--mixed_precision", "no"],
}

# DDP keeps the recipe's precompute_ref_log_probs (rank 0 caches the reference log-probs, rank 1 reads them: it
# failed with in-memory pairs, see promptrec.training.share_across_ranks); ZeRO-2 runs the reference online.
PRECOMPUTE = {"ddp": [], "zero2": ["--precompute_ref_log_probs", "false"]}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_accelerate_launch_two_cpu_processes_trains_one_adapter(sft_run, tmp_path, launcher):
    out = tmp_path / launcher
    accelerate = Path(sys.executable).with_name("accelerate")
    scs = ["--eval_scs_samples", "2"] if launcher == "ddp" else ["--eval_scs_samples", "0"]
    cmd = [str(accelerate), "launch", *LAUNCHERS[launcher], "dpo/train.py",
           *dpo_args(sft_run, out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_pairs", "none",
                     *PRECOMPUTE[launcher], *scs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    assert config["world_size"] == 2
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] > 0
    if launcher == "ddp":  # the SCS eval is sharded over the 2 ranks and gathered
        assert metrics["scs"]["n"] == 2


def test_merge_writes_one_model_with_the_adapters_logits(sft_run, tmp_path):
    import shutil

    from promptrec.models import load_model

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    model = load_model("embedded", adapter=str(run), dtype="float32")
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so merging has something to fold in
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(run)
    merge = load_script("dpo/merge.py")
    out = merge.main(*parse_args(merge.MergeArguments, args=["--adapter", str(run), "--output_dir",
                                                              str(tmp_path / "merged")]))
    assert not (out / "adapter_config.json").exists()
    merged = load_model(str(out), dtype="float32")
    ids = torch.tensor([[1, 504, 3249, 314, 260, 1345, 30]])
    with torch.no_grad():
        base = load_model("embedded", dtype="float32")(ids).logits
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base, merged(ids).logits, atol=1e-3)
    config = json.loads((out / "run_config.json").read_text())
    assert config["merged"] and config["max_text_tokens"] == MAX_TEXT_TOKENS and config["base_model"] == "embedded"
