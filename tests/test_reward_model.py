"""reward/train_rm.py (TRL RewardTrainer) and promptrec/reward_model.py: what training must change and leave alone, a
fit that ranks the truth above garbage, the run folder, one-line errors, resume, the GPU recipes' architectures, one
rendering for training and scoring, and the pure ranking metrics. Most runs use a tiny 2-layer model of SmolLM2's
shape (seconds); the ranking fit uses the embedded SmolLM2 itself."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRIPLETS
from stage_helpers import (
    REPO,
    assert_resumed_like_straight,
    count_training_steps,
    load_script,
    run_killed_at_step,
    tiny_target_checkpoint,
)

from promptrec.cli import parse_args, run_main
from promptrec.evaluation import spearman
from promptrec.reward_model import (
    RewardModel,
    eval_candidates,
    load_reward_model,
    pairwise_accuracy,
    preference_ids,
    ranking_metrics,
    reward_input_ids,
)
from promptrec.tables import DataError
from promptrec.templates import preference_example, recovery_messages

RECIPES = REPO / "reward" / "configs"
MAX_TEXT_TOKENS = 16
GARBAGE = ["qx zvorp klee blattum wrzz", "fnord gleep 77 ## snarf", "zzk plo vvv trunkle mip"]
N_TRAIN = 6  # TINY_TRIPLETS[:6] train; the last 2 are held out


def parse(argv):
    from trl import ModelConfig, RewardConfig

    return parse_args(load_script("reward/train_rm.py").RMScriptArguments, RewardConfig, ModelConfig, args=argv)


def train(argv):
    return load_script("reward/train_rm.py").main(*parse(argv))


def write_pairs(path: Path, rows: list[tuple[int, str, float, str, float]], tokenizer) -> Path:
    """Pairs as build_pairs writes them: ``(triplet index, chosen, score_chosen, rejected, score_rejected)`` rendered
    with ``tokenizer`` and :data:`MAX_TEXT_TOKENS`, and a summary.json recording that budget."""
    lines = []
    for i, chosen, s_c, rejected, s_r in rows:
        original, _, rewritten = TINY_TRIPLETS[i]
        lines.append({"id": f"t{i}", **preference_example(original, rewritten, chosen, rejected, tokenizer,
                                                          MAX_TEXT_TOKENS),
                      "score_chosen": s_c, "score_rejected": s_r, "source_chosen": "true", "source_rejected": "bank"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    path.with_name("summary.json").write_text(json.dumps({"max_text_tokens": MAX_TEXT_TOKENS}))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, embedded_tokenizer) -> dict[str, Path]:
    """Train pairs: each of 6 triplets' true prompt over garbage. Eval pairs, on the 2 held-out triplets: the truth
    (SCS 1) over another row's prompt (0.3) and over garbage (0), so each has 3 candidates of distinct scores."""
    root = tmp_path_factory.mktemp("pairs")
    train_rows = [(i, TINY_TRIPLETS[i][1], 1.0, GARBAGE[i % 3], 0.0) for i in range(N_TRAIN)]
    eval_rows = [(i, TINY_TRIPLETS[i][1], 1.0, other, score) for i in range(N_TRAIN, len(TINY_TRIPLETS))
                 for other, score in ((TINY_TRIPLETS[i - 3][1], 0.3), (GARBAGE[i % 3], 0.0))]
    (root / "train").mkdir()
    (root / "eval").mkdir()
    return {"train": write_pairs(root / "train" / "train.jsonl", train_rows, embedded_tokenizer),
            "eval": write_pairs(root / "eval" / "eval.jsonl", eval_rows, embedded_tokenizer)}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, embedded_model_dir) -> Path:
    """A 2-layer random model of SmolLM2's architecture and tokenizer (a local model directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny") / "smollm2_tiny"
    config = AutoConfig.from_pretrained(embedded_model_dir)
    config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(path)
    return path


def rm_args(pairs, out, *extra, base: str | Path = "embedded"):
    """The smollm2 recipe cut to a few steps on the tiny pairs (eval and checkpoints off unless asked)."""
    return ["--config", str(RECIPES / "rm_smollm2.yaml"), "--train_pairs", str(pairs["train"]), "--eval_pairs", "none",
            "--model_name_or_path", str(base), "--output_dir", str(out), "--max_length", "256",
            "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1", "--eval_strategy", "no",
            "--save_strategy", "no", "--seed", "0", *extra]


def weights(model) -> tuple[dict, dict, dict]:
    """(LoRA, trained score head, frozen rest) parameters of a PEFT reward model; the frozen ones under the plain
    model's names (``score.weight`` for the head's frozen original)."""
    lora, head, base = {}, {}, {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            lora[name] = param
        elif "modules_to_save" in name:
            head[name] = param
        else:
            plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", "")
            base[plain] = param
    return lora, head, base


def test_one_step_trains_lora_and_head_and_leaves_the_base(pairs, tiny_base, tmp_path):
    """One RewardTrainer step (with the margin column): every LoRA B and the score head moved, every other weight
    (the frozen original head included) equals a fresh load with the same seed; only LoRA and the head train."""
    from transformers import set_seed

    from promptrec.models import load_model

    trainer = train(rm_args(pairs, tmp_path / "run", "--max_steps", "1", "--margin", "true", base=tiny_base))
    assert trainer.state.global_step == 1 and trainer.state.log_history[0]["loss"] > 0
    lora, head, base = weights(trainer.model)
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {*lora, *head}
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero
    set_seed(0)
    fresh = dict(load_model(str(tiny_base), num_labels=1, dtype="float32").named_parameters())
    assert base.keys() == fresh.keys()
    assert [n for n in fresh if not torch.equal(base[n], fresh[n])] == []
    (trained_head,) = head.values()
    assert not torch.equal(trained_head, fresh["score.weight"])


def test_rendering_is_the_one_of_training_and_scoring_is_padding_free(pairs, tiny_base, embedded_tokenizer):
    """A pairs row's ``chosen_ids`` are what ``RewardModel.score`` feeds for the same texts; rewards do not depend on
    the batch (right padding is masked, read at the last real token)."""
    from transformers import set_seed

    from promptrec.models import load_model

    row = json.loads(pairs["eval"].read_text().splitlines()[0])
    original, prompt, rewritten = TINY_TRIPLETS[N_TRAIN]
    prompt_turns = recovery_messages(original, rewritten, embedded_tokenizer, MAX_TEXT_TOKENS)
    assert preference_ids(row, embedded_tokenizer)["chosen_ids"] == reward_input_ids(embedded_tokenizer, prompt_turns,
                                                                                     prompt)
    assert preference_ids(row, embedded_tokenizer, margin=True)["margin"] == pytest.approx(0.7)

    set_seed(0)
    model = load_model(str(tiny_base), num_labels=1, dtype="float32").eval()
    model.config.pad_token_id = embedded_tokenizer.pad_token_id
    rm = RewardModel(model, embedded_tokenizer, MAX_TEXT_TOKENS)
    candidates = [[prompt, GARBAGE[0], "Make it shorter."], [], [GARBAGE[1]]]
    rows = [TINY_TRIPLETS[N_TRAIN], TINY_TRIPLETS[0], TINY_TRIPLETS[1]]
    one = rm.score([r[0] for r in rows], [r[2] for r in rows], candidates, batch_size=1)
    many = rm.score([r[0] for r in rows], [r[2] for r in rows], candidates, batch_size=16)
    assert [len(r) for r in one] == [3, 0, 1]
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, atol=1e-5)
    alone = rm.score_ids([reward_input_ids(embedded_tokenizer, prompt_turns, prompt)])
    assert one[0][0] == pytest.approx(alone[0], abs=1e-5)


@pytest.fixture(scope="module")
def fitted(pairs, tmp_path_factory, embedded_model_dir) -> Path:
    """The embedded SmolLM2 reward model after 10 steps on the 6 train pairs, with the held-out eval pairs."""
    out = tmp_path_factory.mktemp("rm") / "run"
    train(rm_args(pairs, out, "--max_steps", "10", "--eval_pairs", str(pairs["eval"]),
                  "--per_device_eval_batch_size", "4"))
    return out


@pytest.mark.slow
def test_a_short_fit_ranks_the_truth_above_garbage(fitted):
    """Loaded as inference loads it, the reward model puts each row's true prompt above a garbage string: on the
    rows it trained on and on the 2 held out (garbage strings it never saw there)."""
    rm = load_reward_model(str(fitted))
    unseen = ["blorp snee quaffle 9 9 zint", GARBAGE[2]]
    rewards = rm.score([t[0] for t in TINY_TRIPLETS], [t[2] for t in TINY_TRIPLETS],
                       [[t[1], unseen[i % 2]] for i, t in enumerate(TINY_TRIPLETS)])
    margins = [r[0] - r[1] for r in rewards]
    assert all(m > 0 for m in margins), margins


@pytest.mark.slow
def test_reward_labelled_pairs_need_no_known_prompt(fitted, tmp_path):
    """West-of-N pairs (build_pairs --reward_model): the reward model, not SCS against a truth, labels each
    candidate, so triplets without a rewrite_prompt give pairs; the chosen side is the candidate of the highest
    reward (here each row's real prompt over garbage) and the pairs carry the rewards. Without --reward_model the
    same triplets stop in one line naming the missing column."""
    build_pairs = load_script("data_generation/build_pairs.py")
    ids = [f"t{i}" for i in range(len(TINY_TRIPLETS))]
    pd.DataFrame({"id": ids, "original_text": [t[0] for t in TINY_TRIPLETS],
                  "rewritten_text": [t[2] for t in TINY_TRIPLETS]}).to_parquet(tmp_path / "triplets.parquet")
    rows = [(i, text) for i, t in zip(ids, TINY_TRIPLETS) for text in (GARBAGE[0], t[1], GARBAGE[1])]
    pd.DataFrame({"id": [i for i, _ in rows], "candidate": [c for _, c in rows], "source": "policy"}).to_parquet(
        tmp_path / "candidates.parquet")
    flags = ["--candidates", str(tmp_path / "candidates.parquet"), "--output_dir", str(tmp_path / "pairs"),
             "--strategy", "best_vs_worst", "--min_margin", "0", "--max_pairs_per_example", "1", "--eval_fraction",
             "0", "--tokenizer", "embedded", "--max_text_tokens", str(MAX_TEXT_TOKENS)]
    with pytest.raises(DataError, match="rewrite_prompt"):
        build_pairs.main(*parse_args(build_pairs.PairArguments, args=flags))
    summary = build_pairs.main(*parse_args(build_pairs.PairArguments, args=[
        *flags, "--reward_model", str(fitted), "--split_by", "id"]))
    assert summary["scorer"]["model"] == "reward_model" and summary["train_pairs"] == len(ids)
    got = pd.read_json(tmp_path / "pairs" / "train.jsonl", lines=True)
    rewards = load_reward_model(str(fitted)).score([t[0] for t in TINY_TRIPLETS], [t[2] for t in TINY_TRIPLETS],
                                                   [[GARBAGE[0], t[1], GARBAGE[1]] for t in TINY_TRIPLETS])
    truth_wins = 0
    for (_, row), t, r in zip(got.iterrows(), TINY_TRIPLETS, rewards):
        texts = [GARBAGE[0], t[1], GARBAGE[1]]
        assert row["chosen"][-1]["content"] == " ".join(texts[int(r.argmax())].split())
        assert row["rejected"][-1]["content"] == " ".join(texts[int(r.argmin())].split())
        truth_wins += int(r.argmax()) == 1
        assert row["score_chosen"] == pytest.approx(r.max(), abs=1e-4)
        assert row["score_rejected"] == pytest.approx(r.min(), abs=1e-4)
    assert truth_wins == len(ids)  # the fit ranks each real prompt above garbage, so it is always the chosen side


@pytest.mark.slow
def test_texts_without_a_prompt_go_from_policy_samples_to_reward_labelled_pairs(fitted, tmp_path):
    """The West-of-N path end to end on texts whose prompt is unknown: candidates.py samples the policy on a file
    with no rewrite_prompt column (sources: policy only), and build_pairs labels them with the reward model."""
    candidates = load_script("data_generation/candidates.py")
    build_pairs = load_script("data_generation/build_pairs.py")
    texts = tmp_path / "texts.jsonl"
    pd.DataFrame({"original_text": [t[0] for t in TINY_TRIPLETS[:3]],
                  "rewritten_text": [t[2] for t in TINY_TRIPLETS[:3]]}).to_json(texts, orient="records", lines=True)
    out = tmp_path / "cands"
    candidates.main(*parse_args(candidates.CandidateArguments, args=[
        "--triplets", str(texts), "--output_dir", str(out), "--sources", "policy", "--policy", "embedded",
        "--num_samples", "3", "--max_new_tokens", "12", "--max_text_tokens", str(MAX_TEXT_TOKENS)]))
    cands = pd.read_parquet(out / "candidates.parquet")
    assert set(cands["source"]) == {"policy"} and cands["id"].nunique() >= 2  # a row may sample nothing usable
    summary = build_pairs.main(*parse_args(build_pairs.PairArguments, args=[
        "--candidates", str(out / "candidates.parquet"), "--reward_model", str(fitted), "--split_by", "id",
        "--strategy", "best_vs_worst", "--min_margin", "0", "--eval_fraction", "0"]))
    pairs = pd.read_json(out / "pairs" / "train.jsonl", lines=True)
    assert summary["scorer"]["model"] == "reward_model" and len(pairs) >= 1
    assert (pairs["score_chosen"] > pairs["score_rejected"]).all()
    with pytest.raises(DataError, match="has no rewrite_prompt"):  # SCS labels need the true prompt
        build_pairs.main(*parse_args(build_pairs.PairArguments, args=[
            "--candidates", str(out / "candidates.parquet"), "--output_dir", str(tmp_path / "scs")]))


@pytest.mark.slow
def test_an_offline_copy_of_the_base_loads_and_another_base_stops(fitted, embedded_model_dir, tiny_base,
                                                                  monkeypatch):
    """Kaggle has no hub: the reward model loads on a local copy of its base (predict --reward_base, the notebook's
    REWARD_BASE) with the same rewards; a different model stops in one line naming both."""
    import promptrec.reward_model as rm_module

    texts = ([TINY_TRIPLETS[0][0]], [TINY_TRIPLETS[0][2]], [[TINY_TRIPLETS[0][1], GARBAGE[0]]])
    want = load_reward_model(str(fitted)).score(*texts)
    loaded = []

    def spy(name, **kwargs):
        loaded.append(name)
        return load_model(name, **kwargs)

    load_model = rm_module.load_model
    monkeypatch.setattr(rm_module, "load_model", spy)
    got = load_reward_model(str(fitted), base=str(embedded_model_dir)).score(*texts)
    assert loaded == [str(embedded_model_dir)] and np.allclose(got[0], want[0], atol=1e-5)
    with pytest.raises(DataError, match=re.escape(f"model_name_or_path: '{tiny_base}' given, 'embedded' in")):
        load_reward_model(str(fitted), base=str(tiny_base))
    assert len(loaded) == 1  # stopped before loading anything


def test_an_empty_eval_file_trains_without_eval(pairs, tiny_base, tmp_path):
    """build_pairs writes an empty eval.jsonl when no eval example gave a pair (tiny runs, the reward recipe's
    strict pairs): the reward model then trains without eval instead of stopping."""
    empty = tmp_path / "eval.jsonl"
    empty.write_text("")
    trainer = train(rm_args(pairs, tmp_path / "run", "--max_steps", "1", "--eval_pairs", str(empty),
                            "--eval_strategy", "steps", "--eval_steps", "1", base=tiny_base))
    assert trainer.state.global_step == 1 and trainer.eval_dataset is None


@pytest.mark.slow
def test_run_folder_holds_config_metrics_tokenizer_and_card(fitted, pairs):
    config = json.loads((fitted / "run_config.json").read_text())
    assert config["stage"] == "reward_model" and config["model_name_or_path"] == "embedded"
    assert config["max_text_tokens"] == MAX_TEXT_TOKENS  # from the pairs' summary.json: inference renders with it
    assert config["trained_on"] == str(pairs["train"]) and config["pairs"]["train_pairs"] == N_TRAIN
    assert config["ModelConfig"]["lora_task_type"] == "SEQ_CLS" and "RewardConfig" in config
    adapter = json.loads((fitted / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    from safetensors import safe_open

    with safe_open(str(fitted / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k and "lora" not in k for k in f.keys())  # the trained head is saved with the adapter
    metrics = json.loads((fitted / "metrics.json").read_text())
    ranking = metrics["ranking"]
    assert ranking["pairs"] == 4 and ranking["candidates"] == 6 and ranking["prompts_ranked"] == 2
    assert 0 <= ranking["pairwise_accuracy"] <= 1 and -1 <= ranking["spearman"] <= 1
    assert "eval_accuracy" in metrics["eval"] and metrics["train"]["global_step"] == 10
    # the reloaded model gives the rewards the trained one reported
    rm = load_reward_model(str(fitted))
    df = pd.read_json(pairs["eval"], lines=True)
    cands = eval_candidates(df)
    again = ranking_metrics(df, cands, rm.score_messages(cands["prompt"].tolist(), cands["candidate"].tolist()))
    assert again["mean_reward_chosen"] == pytest.approx(ranking["mean_reward_chosen"], abs=1e-4)
    assert (fitted / "tokenizer_config.json").is_file() and (fitted / "curves.png").is_file()
    card = (fitted / "README.md").read_text()
    assert "reward model" in card and "pairwise accuracy" in card and "load_reward_model" in card


def bad_pairs(tmp_path: Path, pairs, case: str) -> tuple[Path, list[str], str]:
    """(a broken pairs file, extra flags, what the error must say) for one kind of breakage."""
    rows = [json.loads(line) for line in pairs["train"].read_text().splitlines()]
    path = tmp_path / "bad" / "train.jsonl"
    path.parent.mkdir()
    extra, expect = [], ""
    if case == "chosen_not_messages":
        rows[1]["chosen"] = "Make it formal."
        expect = "column 'chosen' row 2"
    elif case == "no_scores_for_margin":
        rows = [{k: v for k, v in r.items() if k != "score_rejected"} for r in rows]
        extra, expect = ["--margin", "true"], "missing column(s) score_rejected"
    elif case == "score_not_a_number":
        rows[2]["score_chosen"] = "high"
        extra, expect = ["--margin", "true"], "column 'score_chosen' row 3 is not a number"
    elif case == "other_text_budget":
        extra, expect = ["--max_text_tokens", "32"], "cut texts to 16 tokens"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_name("summary.json").write_text(json.dumps({"max_text_tokens": MAX_TEXT_TOKENS}))
    return path, extra, expect


@pytest.mark.parametrize("case", ["chosen_not_messages", "no_scores_for_margin", "score_not_a_number",
                                  "other_text_budget"])
def test_bad_pairs_file_gives_one_line_error_naming_it(pairs, tmp_path, capsys, case):
    path, extra, expect = bad_pairs(tmp_path, pairs, case)
    argv = rm_args({"train": path}, tmp_path / "run", *extra)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: train(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the run's own log lines
    assert line.startswith(f"error: {path}") and expect in line and "Traceback" not in err, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter_and_head(pairs, tiny_base, tmp_path, monkeypatch):
    """kill -9 after the step-2 checkpoint, then ``--resume_from_checkpoint last``: the same losses step by step and
    the same adapter and score head as a run never killed (6 pairs at batch 2: the resume lands mid-epoch)."""
    from trl import RewardTrainer

    def argv(out, *extra):
        return rm_args(pairs, out, "--max_steps", "4", "--per_device_train_batch_size", "2", "--save_strategy",
                       "steps", "--save_steps", "2", *extra, base=tiny_base)

    straight = train(argv(tmp_path / "straight"))
    killed = run_killed_at_step("reward/train_rm.py", "RewardTrainer", argv(tmp_path / "killed"), step=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "run_config.json").exists()
    steps = count_training_steps(monkeypatch, RewardTrainer)
    resumed = train(argv(tmp_path / "killed", "--resume_from_checkpoint", "last"))
    assert steps == [2, 3]  # only the steps after the checkpoint were trained again
    assert_resumed_like_straight(resumed, straight, tmp_path / "killed", tmp_path / "straight", steps=4)


@pytest.mark.parametrize("recipe, arch", [("rm_phi2_qlora", "phi"), ("rm_mistral7b_qlora", "mistral")])
def test_gpu_recipes_train_on_their_architecture(recipe, arch, pairs, tmp_path):
    """The QLoRA recipes' LoRA targets and head on a tiny random model of their architecture (CPU, no 4-bit)."""
    base = tiny_target_checkpoint(arch, tmp_path / arch)
    cpu = ["--load_in_4bit", "false", "--dtype", "float32", "--bf16", "false", "--use_cpu", "true", "--optim",
           "adamw_torch", "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
           "--eval_strategy", "no", "--eval_pairs", "none", "--logging_steps", "1", "--seed", "0"]
    trainer = train(["--config", str(RECIPES / f"{recipe}.yaml"), "--model_name_or_path", str(base), "--train_pairs",
                     str(pairs["train"]), "--output_dir", str(tmp_path / "run"), *cpu])
    _, _, model_args = parse(["--config", str(RECIPES / f"{recipe}.yaml"), *cpu])
    wrapped = {n.rsplit(".", 1)[-1] for n, m in trainer.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(model_args.lora_target_modules)
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["base_shape"]["model_type"] == arch


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(pairs, tiny_base, tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "dpo/accelerate/multi_cpu.yaml", "reward/train_rm.py",
           *rm_args(pairs, out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_pairs",
                    str(pairs["eval"]), base=tiny_base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["world_size"] == 2 and metrics["ranking"]["pairs"] == 4
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1


# ── pure helpers ──

def test_pairwise_accuracy_and_spearman():
    assert pairwise_accuracy([2, 1, 0.5], [1, 1, 1]) == pytest.approx(1 / 3)  # a tie is not a win
    assert math.isnan(pairwise_accuracy([], []))
    with pytest.raises(ValueError):
        pairwise_accuracy([1, 2], [1])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties take their average rank
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def test_ranking_metrics_on_hand_made_rewards():
    def turn(role, text):
        return [{"role": role, "content": text}]

    p1, p2 = turn("user", "texts one"), turn("user", "texts two")
    df = pd.DataFrame([
        {"prompt": p1, "chosen": turn("assistant", "a"), "rejected": turn("assistant", "b"), "score_chosen": 0.9,
         "score_rejected": 0.5},
        {"prompt": p1, "chosen": turn("assistant", "a"), "rejected": turn("assistant", "c"), "score_chosen": 0.9,
         "score_rejected": 0.1},
        {"prompt": p2, "chosen": turn("assistant", "a"), "rejected": turn("assistant", "d"), "score_chosen": 0.8,
         "score_rejected": 0.2}])
    cands = eval_candidates(df)
    assert cands[["group", "candidate", "score"]].values.tolist() == [[0, "a", 0.9], [0, "b", 0.5], [0, "c", 0.1],
                                                                       [1, "a", 0.8], [1, "d", 0.2]]
    metrics = ranking_metrics(df, cands, [3.0, 1.0, 2.0, 0.0, 1.0])  # p1: a > c > b; p2: d above a (wrong)
    assert metrics["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert metrics["spearman_within_prompt"] == pytest.approx(0.5) and metrics["prompts_ranked"] == 1
    assert metrics["spearman"] == pytest.approx(spearman([3, 1, 2, 0, 1], [0.9, 0.5, 0.1, 0.8, 0.2]))
    assert metrics["mean_reward_chosen"] == pytest.approx(2.0) and metrics["candidates"] == 5
