"""sft/train.py end to end on the embedded SmolLM2 in 4-bit: what SFT must do, and what its run folder holds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
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

from promptrec.cli import parse_args, run_main
from promptrec.models import EMBEDDED_HUB_ID

RECIPE = str(REPO / "sft" / "configs" / "smollm2.yaml")


def sft_args(triplets, out, *extra):
    """The smollm2 recipe cut to a few seconds of 4-bit training on a tiny set (every step sees every row)."""
    return ["--config", RECIPE, "--triplets", str(triplets), "--output_dir", str(out), "--load_in_4bit", "true",
            "--max_text_tokens", "16", "--max_length", "192", "--eval_fraction", "0.25", "--split_by", "id",
            "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--eval_scs_samples", "0", "--seed", "0",
            "--use_bnb_nested_quant", "true", *extra]


def parse(argv):
    from trl import ModelConfig, SFTConfig

    return parse_args(load_script("sft/train.py").SFTScriptArguments, SFTConfig, ModelConfig, args=argv)


@pytest.mark.slow
def test_sft_qlora_trains_saves_and_reloads(tmp_path, tiny_triplets):
    from promptrec.models import load_model, load_tokenizer

    triplets = tmp_path / "triplets.jsonl"
    tiny_triplets.to_json(triplets, orient="records", lines=True)
    out = tmp_path / "run"
    trainer = load_script("sft/train.py").main(*parse(sft_args(triplets, out)))
    model = trainer.model

    # The loss on the (fixed) training batch went down.
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and losses[-1] < losses[0]

    # LoRA B starts at zero, so non-zero B means the adapter trained; the frozen 4-bit base is bit-identical.
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert_same_base(model, load_model("embedded", load_in_4bit=True, dtype="float32"))

    # The saved adapter reloads (as inference loads it) and gives the same logits. TRL trains QLoRA adapters in
    # bf16; PEFT reloads them in fp32 (same values), so the trained copy is upcast to compare like with like.
    tokenizer = load_tokenizer(str(out))
    batch = tokenizer(["Recover the instruction: Arr matey!", "Make it formal."], return_tensors="pt", padding=True)
    model.eval()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    with torch.no_grad():
        before = model(**batch).logits
        reloaded = load_model("embedded", adapter=str(out), load_in_4bit=True, dtype="float32")
        after = reloaded(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)

    # The run folder is self-contained.
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_name_or_path"] == "embedded" and config["max_text_tokens"] == 16 and config["load_in_4bit"]
    assert set(config["lora_target_modules"]) == set(config["ModelConfig"]["lora_target_modules"])
    assert config["data"]["source"] == str(triplets) and config["base_model_id"] == EMBEDDED_HUB_ID
    split = pd.read_parquet(out / "split.parquet")  # the rows DPO and GRPO read back, whatever becomes of the source
    assert sorted(split["id"]) == sorted(tiny_triplets.id) and set(split["split"]) == {"train", "eval"}
    assert (config["data"]["train_rows"], config["data"]["eval_rows"]) == tuple(split["split"].value_counts()[
        ["train", "eval"]])
    assert EMBEDDED_HUB_ID in (out / "README.md").read_text()  # our card, not TRL's
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["eval_loss"] > 0 and metrics["train"]["train_loss"] > 0
    assert (out / "curves.png").stat().st_size > 1000 and (out / "adapter_model.safetensors").exists()


def test_bad_triplets_give_one_line_error(tmp_path, tiny_triplets, capsys):
    bad = tmp_path / "bad.csv"
    tiny_triplets.drop(columns="rewritten_text").to_csv(bad, index=False)
    main = load_script("sft/train.py").main
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(*parse(sft_args(bad, tmp_path / "run"))))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "bad.csv" in err and "rewritten_text" in err


@pytest.mark.slow
def test_killed_sft_run_resumes_to_the_same_adapter(tmp_path, tiny_triplets, monkeypatch):
    """kill -9 after the step-2 checkpoint, then ``--resume_from_checkpoint last``: the same losses step by step and
    the same adapter as a run that was never killed (5 train rows at batch 2: the resume lands mid-epoch)."""
    triplets = tmp_path / "triplets.jsonl"
    tiny_triplets.to_json(triplets, orient="records", lines=True)

    def argv(out, *extra):
        return sft_args(triplets, out, "--load_in_4bit", "false", "--max_steps", "4", "--save_strategy", "steps",
                        "--save_steps", "2", "--per_device_train_batch_size", "2", *extra)

    main = load_script("sft/train.py").main
    straight = main(*parse(argv(tmp_path / "straight")))

    killed = run_killed_at_step("sft/train.py", "SFTTrainer", argv(tmp_path / "killed"), step=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "run_config.json").exists()
    from trl import SFTTrainer

    steps = count_training_steps(monkeypatch, SFTTrainer)
    resumed = main(*parse(argv(tmp_path / "killed", "--resume_from_checkpoint", "last")))
    assert steps == [2, 3]  # only the steps after the checkpoint were trained again

    assert_resumed_like_straight(resumed, straight, tmp_path / "killed", tmp_path / "straight", steps=4)


def test_time_limit_stops_training_at_the_limit():
    """TimeLimit asks the trainer to stop at the first step end at or past the limit, timed from the train start."""
    from transformers import TrainerControl, TrainerState

    from promptrec.training import TimeLimit

    now = [100.0]
    limit = TimeLimit(10, clock=lambda: now[0])
    args, state, control = SimpleNamespace(), TrainerState(), TrainerControl()
    limit.on_train_begin(args, state, control)
    for step, at in enumerate([103.0, 106.0, 109.9], start=1):
        now[0], state.global_step = at, step
        limit.on_step_end(args, state, control)
        assert not control.should_training_stop
    now[0], state.global_step = 110.0, 4
    assert limit.on_step_end(args, state, control).should_training_stop
    assert limit.summary() == {"max_train_seconds": 10, "seconds": 10.0, "steps": 4, "stopped": True}


def test_time_limit_resumed_from_a_checkpoint_gets_what_is_left_of_its_budget():
    """A checkpoint records the seconds trained to it; a run resumed from it stops when the total reaches the limit."""
    from transformers import TrainerControl, TrainerState

    from promptrec.training import TimeLimit

    now = [0.0]
    first = TimeLimit(10, clock=lambda: now[0])
    args, state, control = SimpleNamespace(), TrainerState(), TrainerControl()
    first.on_train_begin(args, state, control)
    now[0], state.global_step = 6.0, 3
    first.on_step_end(args, state, control)
    saved = TrainerState(global_step=3, stateful_callbacks=[first])  # what a checkpoint at step 3 stores
    assert saved.stateful_callbacks["TimeLimit"]["attributes"] == {"elapsed": 6.0}

    now[0] = 1000.0  # a later process, a new callback
    resumed, control = TimeLimit(10, clock=lambda: now[0]), TrainerControl()
    resumed.on_train_begin(args, saved, control)
    now[0], saved.global_step = 1003.0, 4
    assert not resumed.on_step_end(args, saved, control).should_training_stop
    now[0], saved.global_step = 1004.0, 5
    assert resumed.on_step_end(args, saved, control).should_training_stop
    assert resumed.summary() == {"max_train_seconds": 10, "seconds": 10.0, "steps": 5, "stopped": True}
    fresh = TimeLimit(10, clock=lambda: now[0])  # a run that starts at step 0 ignores any stored state
    fresh.on_train_begin(args, TrainerState(stateful_callbacks=[first]), TrainerControl())
    assert fresh.before == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("restore", ["false", "true"])
def test_time_limit_state_rides_a_real_checkpoint_into_the_resumed_run(tmp_path, tiny_triplets, restore):
    """sft/train.py --max_train_seconds: the checkpoint's trainer_state.json holds the seconds trained to it, and a
    run resumed from it with a budget of exactly those seconds stops at its first step (a fresh clock would run on
    to max_steps). With --restore_callback_states_from_checkpoint transformers rebuilds the callback as saved, budget
    included, and metrics.json reports that live callback, not the one the script built."""
    triplets = tmp_path / "triplets.jsonl"
    tiny_triplets.to_json(triplets, orient="records", lines=True)
    out = tmp_path / "run"
    main = load_script("sft/train.py").main
    plain = ["--load_in_4bit", "false", "--use_bnb_nested_quant", "false", "--save_strategy", "steps",
             "--save_steps", "1"]
    main(*parse(sft_args(triplets, out, *plain, "--max_steps", "1", "--max_train_seconds", "1000")))
    saved = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["stateful_callbacks"]["TimeLimit"]
    spent = saved["attributes"]["elapsed"]
    assert saved["args"] == {"seconds": 1000.0} and spent > 0

    trainer = main(*parse(sft_args(triplets, out, *plain, "--max_steps", "6", "--max_train_seconds", str(spent),
                                   "--resume_from_checkpoint", str(out / "checkpoint-1"),
                                   "--restore_callback_states_from_checkpoint", restore)))
    summary = json.loads((out / "metrics.json").read_text())["time_limit"]
    assert summary["seconds"] > spent and summary["steps"] == trainer.state.global_step
    if restore == "false":  # the budget given now, less what the checkpoint had spent
        assert trainer.state.global_step == 2 and summary["stopped"] and summary["max_train_seconds"] == spent
    else:  # transformers rebuilds the callback as saved: the saved budget (1000 s) rules, the clock still resumes
        assert trainer.state.global_step == 6 and not summary["stopped"] and summary["max_train_seconds"] == 1000


@pytest.fixture(scope="module")
def continued_run(tmp_path_factory, embedded_model_dir):
    """An SFT run (make_sft_run: non-zero lora_B) continued by sft/train.py --init_adapter for what 1e-3 s allows
    (one step of max_steps 3), without the triplets t0 and t1. Returns (init run, continued run, its trainer)."""
    root = tmp_path_factory.mktemp("continued")
    init = make_sft_run(root, max_text_tokens=16, lora_init_std=0.01)
    pd.DataFrame({"id": ["t0", "t1"], "why": "used by the PO round"}).to_csv(root / "used.csv", index=False)
    out = root / "continued"
    argv = sft_args(root / "triplets.jsonl", out, "--load_in_4bit", "false", "--use_bnb_nested_quant", "false",
                    "--init_adapter", str(init), "--exclude_ids", str(root / "used.csv"),
                    "--max_train_seconds", "0.001")
    trainer = load_script("sft/train.py").main(*parse(argv))
    return init, out, trainer


@pytest.mark.slow
def test_continued_sft_starts_from_the_init_adapter(continued_run):
    """One Adam step moves each weight by at most the learning rate: the saved adapter is the init adapter moved by
    <= 1e-3 (a fresh LoRA would differ by far more), and moved; the frozen base is unchanged; no new LoRA."""
    from safetensors.torch import load_file

    from promptrec.models import load_model

    init, out, trainer = continued_run
    before, after = (load_file(str(run / "adapter_model.safetensors")) for run in (init, out))
    assert before.keys() == after.keys() and set(trainer.model.peft_config) == {"default"}
    moved = {name: (after[name].float() - before[name].float()).abs().max().item() for name in before}
    assert max(moved.values()) <= 1e-3 * 1.01 and all(m > 0 for m in moved.values())
    assert_same_base(trainer.model, load_model("embedded", dtype="float32"))


@pytest.mark.slow
def test_continued_sft_records_its_init_run_time_limit_and_fresh_rows(continued_run):
    init, out, trainer = continued_run
    config = json.loads((out / "run_config.json").read_text())
    assert config["stage"] == "sft_continued" and config["init_adapter"] == str(init)
    assert config["sft_run"]["stage"] == "sft" and config["max_text_tokens"] == 16  # inherited and agreed
    assert config["load_in_4bit"] is False and config["use_bnb_nested_quant"] is True  # the init run's, not given
    init_config = json.loads((init / "run_config.json").read_text())
    assert config["lora_target_modules"] == init_config["lora_target_modules"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["time_limit"]["stopped"] and metrics["time_limit"]["steps"] == trainer.state.global_step == 1
    assert metrics["time_limit"]["seconds"] > 0
    split = pd.read_parquet(out / "split.parquet")
    assert sorted(split["id"]) == [f"t{i}" for i in range(2, 8)]  # t0 and t1 excluded before the split
    assert (config["data"]["train_rows"], config["data"]["eval_rows"]) == tuple(split["split"].value_counts()[
        ["train", "eval"]])
    assert "SFT, continued" in (out / "README.md").read_text()


def test_continued_sft_stops_in_one_line_on_a_contradiction_or_an_id_less_exclude_file(tmp_path, capsys,
                                                                                        embedded_model_dir):
    init = make_sft_run(tmp_path, max_text_tokens=16)
    (tmp_path / "no_ids.csv").write_text("name\nt0\n")
    main = load_script("sft/train.py").main

    def error(*extra):
        argv = sft_args(tmp_path / "triplets.jsonl", tmp_path / "out", "--init_adapter", str(init), "--load_in_4bit",
                        "false", *extra)
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: main(*parse(argv)))
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    err = error("--max_text_tokens", "32")
    assert err.startswith("error: max_text_tokens: 32 given, 16 in ") and "run_config.json" in err
    err = error("--exclude_ids", str(tmp_path / "no_ids.csv"))
    assert err.startswith("error: ") and "no_ids.csv" in err and "id" in err
