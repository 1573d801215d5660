"""inference/predict.py and the Kaggle notebook: bad input, prediction end to end (with and without an adapter)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from promptrec.models import ModelNotFoundError, load_model
from promptrec.policy import load_policy, policy_of, resolve_policy
from promptrec.postprocess import PostprocessConfig, resolve_mean_prompt
from promptrec.predict import PredictArguments, predict_file, predict_frame, read_test_table
from promptrec.selection import SelectionRule
from promptrec.tables import DataError, write_json

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "inference" / "predict.py"
NOTEBOOK = REPO / "inference" / "kaggle_inference.ipynb"
MEAN = "Improve the text to this."
# Tiny decoding so the CPU tests stay fast: texts cut to 16 tokens, 4 new tokens.
FAST = {"max_new_tokens": 4, "max_text_tokens": 16, "progress": False}


@pytest.fixture
def test_csv(tmp_path, tiny_triplets):
    """Two test rows (id, original_text, rewritten_text) with ids out of sorted order."""
    df = tiny_triplets.head(2)[["original_text", "rewritten_text"]].assign(id=["b", "a"])
    path = tmp_path / "test.csv"
    df[["id", "original_text", "rewritten_text"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, embedded_model_dir, embedded_tokenizer):
    """A LoRA adapter laid out as checkpoints/sft/<run>: random (non-zero) LoRA weights, tokenizer, run_config."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model("embedded", dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("checkpoints") / "sft" / "tiny"
    model.save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    write_json({"ModelConfig": {"model_name_or_path": "embedded"}, "ScriptArguments": {"max_text_tokens": 16}},
               out / "run_config.json")
    return out


def check_submission(path, ids):
    """Every id once, in order; ``<stem>.config.json`` counts the rows the mean prompt stood in for (``fallbacks``:
    the model's answer was unusable; ``rows_without_text``): each holds the mean prompt, and under greedy selection
    no other row does (MBR may also pick the mean prompt among real answers)."""
    sub = pd.read_csv(path, keep_default_na=False)
    assert list(sub.columns) == ["id", "rewrite_prompt"]
    assert list(sub["id"].astype(str)) == list(ids)
    config = json.loads(Path(path).with_name(f"{Path(path).stem}.config.json").read_text())
    stood_in = config["fallbacks"] + config["rows_without_text"]
    assert config["rows"] == len(ids) and 0 <= config["fallbacks"] <= config["rows"] - config["rows_without_text"]
    as_mean = int((sub["rewrite_prompt"] == config["postprocess"]["mean_prompt"]).sum())
    assert as_mean == stood_in if config["selection"]["selection"] == "greedy" else as_mean >= stood_in
    return sub


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("id,original_text,rewritten_text\n", "no rows"),
    ("id,original_text\n1,hello\n", "missing column(s) rewritten_text"),
    ("id,original_text,rewritten_text\n1,a b,c d\n2,e f,g h\n1,i j,k l\n", "duplicate id 1 in rows 1, 3"),
    ("id,original_text,rewritten_text\n1,a b,c d\n2,e f,\n",
     "column 'rewritten_text' row 2 is empty or not text (NaN)"),
    ("id,original_text,rewritten_text\n1,a b,c d\n,e f,g h\n", "column 'id' row 2 is empty"),
])
def test_bad_input_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "test.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_test_table(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("id,original_text,rewritten_text\nx,a b,c d\nx,e f,g h\n")
    out = tmp_path / "submission.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", str(path), "--output", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {path}: duplicate id 'x' in rows 1, 2; "
                                                    "1 duplicate row(s) in all")
    assert not list(tmp_path.glob("submission*"))


def test_cli_bad_flag_value_is_a_one_line_error(tmp_path):
    """A value a dataclass refuses (here batch_size 0) stops with one line and exit 2, as argparse's own errors do."""
    out = tmp_path / "submission.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", "test.csv", "--output", str(out), "--batch_size",
                           "0"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: batch_size and max_new_tokens must be >= 1"
    assert not out.exists()


def test_mean_prompt_from_string_or_json(tmp_path):
    assert resolve_mean_prompt("  Make it  better. ") == "Make it better."
    good = write_json({"mean_prompt": "Rewrite this text.", "score": 0.6}, tmp_path / "mean_prompt.json")
    assert resolve_mean_prompt(str(good)) == "Rewrite this text."
    bad = write_json({"prompt": "x"}, tmp_path / "bad.json")
    for path, message in ((bad, "no non-empty 'mean_prompt'"), (tmp_path / "missing.json", "no such")):
        with pytest.raises(DataError, match=message):
            resolve_mean_prompt(str(path))


def test_base_model_resolution(tmp_path, embedded_model_dir):
    """The run's base unless --model names another (an error, or with the override flag that model); an adapter
    without a run config names its base in adapter_config.json; no adapter and no model: the embedded one."""
    nested = {"ModelConfig": {"model_name_or_path": "microsoft/phi-2"}, "ScriptArguments": {"max_text_tokens": 64}}
    write_json(nested, tmp_path / "run_config.json")  # as the code before RunConfig wrote it
    assert resolve_policy(adapter=str(tmp_path)).model == "microsoft/phi-2"
    with pytest.raises(DataError, match=r"model_name_or_path: 'my/model' given, 'microsoft/phi-2' in .*"
                                        r"--allow_config_override true"):
        resolve_policy("my/model", str(tmp_path))
    assert resolve_policy("my/model", str(tmp_path), allow_override=True).model == "my/model"
    # an old run recorded no fingerprint of its base: a local directory is taken as a copy of it (the notebook's case)
    assert resolve_policy(str(embedded_model_dir), str(tmp_path)).model == str(embedded_model_dir)
    assert resolve_policy().model == "embedded"
    (tmp_path / "run_config.json").unlink()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert resolve_policy(adapter=str(tmp_path)).model == "/models/base"
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="pass --model"):
        resolve_policy(adapter=str(tmp_path))


@pytest.mark.parametrize("run_config, flag, expected", [
    ({"model_name_or_path": "embedded", "max_text_tokens": 100}, None, 100),  # as promptrec.training saves it
    ({"ModelConfig": {"model_name_or_path": "embedded"}, "ScriptArguments": {"max_text_tokens": 64}}, None, 64),
    ({"model_name_or_path": "embedded", "max_text_tokens": None}, None, None),  # trained uncut → predict uncut
    ({"model_name_or_path": "embedded"}, None, 256),
    ({"model_name_or_path": "embedded", "max_text_tokens": 100}, 100, 100),  # the flag agrees
])
def test_policy_settings_come_from_run_config(tmp_path, run_config, flag, expected):
    write_json(run_config, tmp_path / "run_config.json")
    resolved = policy_of(PredictArguments(adapter=str(tmp_path), max_text_tokens=flag, load_in_4bit=False)).summary()
    assert resolved == {"model": "embedded", "adapter": str(tmp_path), "max_text_tokens": expected,
                        "load_in_4bit": False}


def test_a_flag_that_contradicts_the_run_stops_unless_overridden(tmp_path):
    write_json({"model_name_or_path": "embedded", "max_text_tokens": 100}, tmp_path / "run_config.json")
    args = PredictArguments(adapter=str(tmp_path), max_text_tokens=32, load_in_4bit=False)
    with pytest.raises(DataError, match="max_text_tokens: 32 given, 100 in .*run_config.json"):
        policy_of(args)
    assert policy_of(replace(args, allow_config_override=True)).max_text_tokens == 32
    with pytest.raises(DataError, match=f"{tmp_path / 'gone'}: no such directory"):
        policy_of(replace(args, adapter=str(tmp_path / "gone")))


# ---------------------------------------------------------------- prediction


def test_nan_texts_fallback_predicts_the_mean_prompt_without_the_model(tmp_path, test_csv, embedded_model,
                                                                        embedded_tokenizer, monkeypatch):
    df = pd.read_csv(test_csv)
    df.loc[0, "original_text"] = None
    df.to_csv(test_csv, index=False)
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError, match="column 'original_text' row 1"):
        predict_file(PredictArguments(input=str(test_csv), output=str(out), **FAST), model=embedded_model,
                     tokenizer=embedded_tokenizer)
    import promptrec.predict as predict_module

    seen = []
    real_generate = predict_module.generate
    monkeypatch.setattr(predict_module, "generate",
                        lambda model, tok, convs, *a, **k: seen.append(len(convs)) or real_generate(model, tok, convs,
                                                                                                    *a, **k))
    args = PredictArguments(input=str(test_csv), output=str(out), nan_texts="fallback", **FAST)
    predict_file(args, PostprocessConfig(mean_prompt="Rewrite this text."), model=embedded_model,
                 tokenizer=embedded_tokenizer)
    sub = check_submission(out, ["b", "a"])
    assert seen == [1]
    assert sub["rewrite_prompt"][0] == "Rewrite this text."
    config = json.loads((tmp_path / "submission.config.json").read_text())
    assert config["rows_without_text"] == 1
    assert config["environment"]["generation_dtype"] == str(embedded_model.dtype).removeprefix("torch.")


@pytest.mark.parametrize("answers, fallbacks", [
    ("truth", 0), ("original_text", 2), ("rewritten_text", 2), (["I'm sorry, I can't.", "Make it an ad."], 1)])
def test_fallbacks_count_the_rows_whose_answer_was_unusable(tmp_path, test_csv, tiny_triplets, embedded_model,
                                                            embedded_tokenizer, monkeypatch, answers, fallbacks):
    """A policy that answers with the true prompts never falls back; one that copies its input (or refuses) does, on
    every such row, so a bound such as "fallbacks < half the rows" passes the first and trips the others."""
    import promptrec.predict as predict_module

    rows = tiny_triplets.head(2).rename(columns={"rewrite_prompt": "truth"})
    said = rows[answers].tolist() if isinstance(answers, str) else answers
    monkeypatch.setattr(predict_module, "generate", lambda model, tok, convs, *a, **k: [[t] for t in said])
    out = tmp_path / "submission.csv"
    predict_file(PredictArguments(input=str(test_csv), output=str(out), **FAST), model=embedded_model,
                 tokenizer=embedded_tokenizer)
    check_submission(out, ["b", "a"])
    config = json.loads((tmp_path / "submission.config.json").read_text())
    assert (config["fallbacks"], config["rows"]) == (fallbacks, 2)
    assert (config["fallbacks"] < config["rows"] / 2) == (answers == "truth")


def test_cli_without_adapter_end_to_end(tmp_path, test_csv, embedded_model_dir):
    mean = write_json({"mean_prompt": MEAN}, tmp_path / "mean_prompt.json")
    out = tmp_path / "sub.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", str(test_csv), "--output", str(out),
                           "--raw_output", str(tmp_path / "raw.csv"), "--mean_prompt", str(mean),
                           "--append_mean_prompt", "--max_new_tokens", "4", "--max_text_tokens", "16",
                           "--no_progress"], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub = check_submission(out, ["b", "a"])
    assert all(p.endswith(MEAN) for p in sub["rewrite_prompt"])
    raw = pd.read_csv(tmp_path / "raw.csv", keep_default_na=False)
    assert list(raw.columns) == ["id", "raw_prediction", "rewrite_prompt"] and raw["raw_prediction"].str.len().all()
    config = json.loads((tmp_path / "sub.config.json").read_text())
    assert config["resolved"] == {"model": "embedded", "adapter": None, "max_text_tokens": 16, "load_in_4bit": False}
    assert config["merged_adapter"] is False  # no adapter: nothing to merge, whatever --merge_adapter says
    assert config["postprocess"]["mean_prompt"] == MEAN


def test_cli_mbr_selection_end_to_end(tmp_path, test_csv, embedded_model_dir):
    """--selection mbr: every id once, never blank, the pick among the recorded candidates, the settings recorded."""
    out = tmp_path / "sub.csv"
    argv = ["--input", str(test_csv), "--output", str(out), "--raw_output", str(tmp_path / "raw.jsonl"),
            "--selection", "mbr", "--num_candidates", "3", "--scorer", "embedded",
            "--max_new_tokens", "4", "--max_text_tokens", "16", "--no_progress"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], check=False, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub = check_submission(out, ["b", "a"])
    raw = pd.read_json(tmp_path / "raw.jsonl", lines=True, dtype=False)
    assert list(raw.columns) == ["id", "raw_prediction", "raw_samples", "candidates", "mbr_scores",
                                 "selected_index", "selected", "rewrite_prompt"]
    for row in raw.itertuples(index=False):
        candidates, scores = json.loads(row.candidates), json.loads(row.mbr_scores)
        assert len(json.loads(row.raw_samples)) == 3
        assert MEAN in candidates and 2 <= len(candidates) <= 5 and len(scores) == len(candidates)
        assert row.selected == candidates[row.selected_index] and row.rewrite_prompt == row.selected  # no append
    assert list(sub["rewrite_prompt"]) == list(raw["rewrite_prompt"])
    config = json.loads((tmp_path / "sub.config.json").read_text())
    assert config["args"]["selection"] == "mbr"
    selection = config["selection"]
    assert {k: selection[k] for k in ("selection", "num_candidates", "mbr_temperature", "concat_top_k")} == {
        "selection": "mbr", "num_candidates": 3, "mbr_temperature": 0.8, "concat_top_k": 1}
    assert selection["scorer"]["model"] == "all-MiniLM-L6-v2 (embedded)" and sum(selection["picks"].values()) == 2


def test_mbr_arguments():
    assert PredictArguments().candidate_params() is None  # greedy selection samples nothing extra
    params = PredictArguments(selection="mbr", num_candidates=4, mbr_temperature=0.7, seed=3).candidate_params()
    assert (params.num_return_sequences, params.temperature, params.seed) == (4, 0.7, 4)
    assert params.generate_kwargs()["do_sample"] is True
    for bad in ({"num_candidates": 0}, {"concat_top_k": 0}, {"mbr_temperature": 0.0}):
        with pytest.raises(ValueError):
            PredictArguments(selection="mbr", **bad)
    with pytest.raises(ValueError, match="selection must be one of greedy, mbr, reward, reward_mbr, not 'beam'"):
        PredictArguments(selection="beam")


# ---------------------------------------------------------------- reward selection


class FakeRewardModel:
    """Stands in for promptrec.reward_model.RewardModel (same ``score`` signature): a reward per candidate from a
    table, else its length in characters; records the rows it was asked about."""

    def __init__(self, table: dict[str, float] | None = None):
        self.table = table or {}
        self.rows: list[list[str]] = []

    def score(self, originals, rewrittens, candidates, batch_size=16):
        assert len(originals) == len(rewrittens) == len(candidates) and batch_size >= 1
        self.rows += [list(row) for row in candidates]
        return [np.array([self.table.get(c, float(len(c))) for c in row]) for row in candidates]


class LetterScorer:
    """An encoder by letter counts: enough for MBR scores without a sentence-transformers model."""

    exponent = 3.0
    identity = {"model": "letters"}

    def encode(self, texts):
        vectors = np.array([[t.lower().count(ch) + 0.1 for ch in "aeioumnrst "] for t in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("selection", ["mbr", "reward", "reward_mbr"])
def test_reward_selection_in_predict_frame_never_leaves_a_blank(embedded_tokenizer, monkeypatch, selection):
    """Candidates are greedy, mean prompt and samples; a row whose answer and samples are all unusable gets the mean
    prompt, a row without text gets it without a model call, and the rewards and MBR scores are there in every
    rule (with ``mbr`` the rewards are recorded but MBR picks)."""
    import promptrec.predict as predict_module

    answers = {1: [["I'm sorry, I can't."], ["Make it rhyme."]],
               2: [["", "???"], ["Write it as a poem.", "Make it rhyme."]]}
    monkeypatch.setattr(predict_module, "generate",
                        lambda model, tok, convs, params, **k: answers[params.num_return_sequences][:len(convs)])
    test = pd.DataFrame({"id": ["x", "y", "z"], "original_text": ["A cat sat.", "The sea.", None],
                         "rewritten_text": ["A feline rested.", "Waves, waves.", "Hi."]})
    post = PostprocessConfig(mean_prompt=MEAN)
    rewards = FakeRewardModel({"Write it as a poem.": 9.0, "Make it rhyme.": 1.0, MEAN: 0.0})
    frame = predict_frame(test, None, embedded_tokenizer, post, batch_size=2, samples=PredictArguments(
        selection="mbr", num_candidates=2).candidate_params(), scorer=LetterScorer(),
        rule=SelectionRule(selection, mbr_weight=0.5), reward_model=rewards)
    assert list(frame["rewrite_prompt"][[0, 2]]) == [MEAN, MEAN] and frame["rewrite_prompt"].str.strip().all()
    assert list(frame["fallback"]) == [True, False, False] and list(frame["selected_index"][[0, 2]]) == [0, -1]
    candidates = json.loads(frame["candidates"][1])
    assert candidates == ["Make it rhyme.", MEAN, "Write it as a poem.", "Make it rhyme."]
    assert json.loads(frame["rewards"][1]) == [1.0, 0.0, 9.0, 1.0] and len(json.loads(frame["mbr_scores"][1])) == 4
    assert rewards.rows == [[MEAN], candidates]  # row z (no text) never reaches the reward model
    mbr = json.loads(frame["mbr_scores"][1])
    expected = "Write it as a poem." if selection != "mbr" else candidates[int(np.argmax(np.round(mbr, 6)))]
    assert frame["rewrite_prompt"][1] == candidates[frame["selected_index"][1]] == expected


def test_cli_reward_selection_end_to_end(tmp_path, test_csv, embedded_model_dir, monkeypatch):
    """inference/predict.py's main with --selection reward on the embedded model (a fake reward model loaded in
    place of the run dir's): a valid submission, the raw output holds candidates, MBR scores, rewards and the pick."""
    import runpy

    import promptrec.cli
    import promptrec.predict as predict_module

    monkeypatch.setattr(promptrec.cli, "setup_logging", lambda *a, **k: None)  # keep pytest's log handlers
    rewards = FakeRewardModel()  # by length: the longest candidate wins
    monkeypatch.setattr(predict_module, "load_rewarder",
                        lambda path, dtype, base=None, allow_override=False: rewards if Path(path).is_dir() else None)
    out, raw_path = tmp_path / "sub.csv", tmp_path / "raw.jsonl"
    argv = ["--input", str(test_csv), "--output", str(out), "--raw_output", str(raw_path), "--selection", "reward",
            "--reward_model", str(tmp_path), "--num_candidates", "2", "--scorer", "embedded", "--max_new_tokens", "4",
            "--max_text_tokens", "16", "--no_progress"]
    runpy.run_path(str(SCRIPT))["main"](*promptrec.cli.parse_args(PredictArguments, PostprocessConfig, args=argv))
    sub = check_submission(out, ["b", "a"])
    raw = pd.read_json(raw_path, lines=True, dtype=False)
    assert list(raw.columns) == ["id", "raw_prediction", "raw_samples", "candidates", "mbr_scores", "rewards",
                                 "selected_index", "selected", "rewrite_prompt"]
    for row in raw.itertuples(index=False):
        candidates, scores, reward = (json.loads(x) for x in (row.candidates, row.mbr_scores, row.rewards))
        assert MEAN in candidates and len(scores) == len(reward) == len(candidates)
        assert reward == [float(len(c)) for c in candidates] and row.selected_index == int(np.argmax(reward))
        assert row.selected == candidates[row.selected_index] == row.rewrite_prompt
    assert list(sub["rewrite_prompt"]) == list(raw["rewrite_prompt"]) and len(rewards.rows) == 2
    selection = json.loads((tmp_path / "sub.config.json").read_text())["selection"]
    assert {k: selection[k] for k in ("selection", "num_candidates", "reward_model")} == {
        "selection": "reward", "num_candidates": 2, "reward_model": str(tmp_path)}
    assert "mbr_weight" not in selection and sum(selection["picks"].values()) == 2


@pytest.mark.parametrize("argv, message", [
    (["--selection", "reward"], "--selection reward needs --reward_model DIR (a reward/train_rm.py run)"),
    (["--selection", "reward_mbr"], "--selection reward_mbr needs --reward_model DIR (a reward/train_rm.py run)"),
    (["--reward_model", "rm"], "--reward_model needs --selection reward, reward_mbr or mbr (greedy has no "
                               "candidates)"),
    (["--selection", "reward_mbr", "--reward_model", "rm", "--mbr_weight", "-1"],
     "mbr_weight must be >= 0 and reward_batch_size >= 1"),
])
def test_reward_arguments_are_one_line_errors(capsys, argv, message):
    from promptrec.cli import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(PredictArguments, PostprocessConfig, args=["--input", "test.csv", *argv])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    rule = PredictArguments(selection="reward_mbr", reward_model="rm", mbr_weight=0.5).selection_rule()
    assert rule == SelectionRule("reward_mbr", 0.5, 1, 16) and PredictArguments().selection_rule() is None


def test_a_missing_reward_model_dir_stops_before_the_policy_loads(tmp_path, test_csv, monkeypatch):
    import promptrec.predict as predict_module

    monkeypatch.setattr(predict_module, "load_policy", lambda *a, **k: pytest.fail("the policy loaded"))
    gone = tmp_path / "no_rm"
    args = PredictArguments(input=str(test_csv), output=str(tmp_path / "s.csv"), selection="reward",
                            reward_model=str(gone), scorer="embedded", **FAST)
    with pytest.raises(DataError) as err:
        predict_file(args)
    assert str(err.value) == f"{gone}: no such directory (--reward_model: a reward/train_rm.py run)"


def test_a_dir_that_is_no_reward_model_run_is_a_one_line_error(tmp_path):
    """A policy run's dir given as --reward_model: promptrec.reward_model must refuse it in one line (skipped until
    that module exists)."""
    pytest.importorskip("promptrec.reward_model")
    from promptrec.cli import USER_ERRORS
    from promptrec.predict import load_rewarder

    write_json({"model_name_or_path": "embedded", "max_text_tokens": 16}, tmp_path / "run_config.json")
    with pytest.raises(USER_ERRORS) as err:
        load_rewarder(str(tmp_path))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_greedy_by_default_sampling_optional():
    assert PredictArguments().sampling_params().generate_kwargs()["do_sample"] is False
    kwargs = PredictArguments(temperature=0.7, top_p=0.9).sampling_params().generate_kwargs()
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    with pytest.raises(ValueError):
        PredictArguments(temperature=-1)


def test_load_policy_applies_the_adapter_and_its_run_config(adapter_dir, embedded_model, embedded_tokenizer):
    from peft import PeftModel

    policy = resolve_policy(adapter=str(adapter_dir))
    model, _ = load_policy(policy)
    assert isinstance(model, PeftModel)
    assert policy.summary() == {"model": "embedded", "adapter": str(adapter_dir), "max_text_tokens": 16,
                        "load_in_4bit": False}
    ids = embedded_tokenizer("Rewrite this as a poem.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, embedded_model(ids).logits, atol=1e-4)


def test_a_merged_policy_computes_what_its_lora_layers_compute(adapter_dir, embedded_model, embedded_tokenizer):
    """--merge_adapter folds the update into the base: a plain model (no LoRA layers left) with the adapter's logits,
    not the base's; only where the base is unquantised."""
    from peft import PeftModel

    from promptrec.policy import should_merge

    policy = resolve_policy(adapter=str(adapter_dir), load_in_4bit=False)
    assert [should_merge(policy, m) for m in ("auto", "true", "false")] == [True, True, False]
    assert not should_merge(replace(policy, adapter=None), "auto")  # nothing to merge
    quantised = replace(policy, load_in_4bit=True)
    assert not should_merge(quantised, "auto")  # merging would re-quantise: the adapter stays separate
    with pytest.raises(ValueError, match="unquantised"):
        should_merge(quantised, "true")
    with pytest.raises(ValueError, match="auto, true, false"):
        should_merge(policy, "yes")
    with pytest.raises(ValueError, match="merge_adapter must be one of"):
        PredictArguments(merge_adapter="yes")  # a bad value fails with the arguments, before any model loads

    lora, _ = load_policy(policy)
    merged, _ = load_policy(policy, merge=True)
    assert isinstance(lora, PeftModel) and not isinstance(merged, PeftModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    ids = embedded_tokenizer("Rewrite this as a poem.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = lora(ids).logits, merged(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, embedded_model(ids).logits, atol=1e-3)


def test_cli_records_whether_the_adapter_was_merged(tmp_path, test_csv, adapter_dir):
    out = tmp_path / "submission.csv"
    predict_file(PredictArguments(input=str(test_csv), output=str(out), adapter=str(adapter_dir), max_new_tokens=4,
                                  merge_adapter="auto", load_in_4bit=False, progress=False))
    config = json.loads(out.with_name("submission.config.json").read_text())
    assert config["merged_adapter"] is True and config["args"]["merge_adapter"] == "auto"
    check_submission(out, ["b", "a"])


def test_prediction_cache_reuses_greedy_answers_and_misses_on_any_change(tmp_path, test_csv, adapter_dir,
                                                                         monkeypatch):
    """A second decode of the same adapter on the same rows with the same settings loads no model and gives the same
    submission; post-processing still runs on a hit; other settings, other rows or other adapter bytes miss."""
    import promptrec.predict as predict_module

    cache = tmp_path / "cache"

    def run(name, post=None, **overrides):
        args = PredictArguments(**{"input": str(test_csv), "output": str(tmp_path / f"{name}.csv"),
                                   "adapter": str(adapter_dir), "load_in_4bit": False, "prediction_cache": str(cache),
                                   **FAST, **overrides})
        args.max_text_tokens = None  # the adapter's run config decides it
        submission = predict_file(args, post or PostprocessConfig(mean_prompt=MEAN))
        return submission, json.loads((tmp_path / f"{name}.config.json").read_text())

    first, config = run("first")
    assert config["prediction_cache"]["reused"] is False and len(list(cache.glob("*.json"))) == 1

    def no_model(*a, **k):
        raise AssertionError("the model was loaded on a cache hit")

    monkeypatch.setattr(predict_module, "load_policy", no_model)
    again, config = run("again")
    assert config["prediction_cache"]["reused"] is True
    pd.testing.assert_frame_equal(again, first)
    appended, config = run("appended", PostprocessConfig(mean_prompt=MEAN, append_mean_prompt=True))
    assert config["prediction_cache"]["reused"] is True  # post-processing is not part of the key: it runs on a hit
    assert appended["rewrite_prompt"].tolist() == [p if p == MEAN else f"{p} {MEAN}" for p in first["rewrite_prompt"]]
    with pytest.raises(AssertionError, match="loaded on a cache hit"):
        run("longer", max_new_tokens=5)  # another decoding setting: another key
    with pytest.raises(AssertionError, match="loaded on a cache hit"):
        run("sampled", temperature=0.7)  # sampled answers are never cached
    other_rows = tmp_path / "other.csv"
    pd.read_csv(test_csv).head(1).to_csv(other_rows, index=False)
    with pytest.raises(AssertionError, match="loaded on a cache hit"):
        run("other_rows", input=str(other_rows))
    moved = shutil.copytree(adapter_dir, tmp_path / "moved")  # the same bytes elsewhere: the same answers
    assert run("moved", adapter=str(moved))[1]["prediction_cache"]["reused"] is True
    weights = load_file(moved / "adapter_model.safetensors")  # retrained in place: the same path, other bytes
    save_file({k: v * 1.01 for k, v in weights.items()}, moved / "adapter_model.safetensors")
    with pytest.raises(AssertionError, match="loaded on a cache hit"):
        run("retrained", adapter=str(moved))
    with pytest.raises(AssertionError, match="loaded on a cache hit"):
        run("off", prediction_cache="none")  # 'none': no cache read


def test_truncated_adapter_is_a_one_line_error(tmp_path, test_csv, adapter_dir):
    """An adapter_model.safetensors cut short (a copy that died half way) names the file, in one line, no traceback."""
    bad = shutil.copytree(adapter_dir, tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = f"{weights}: not a readable safetensors file (truncated or corrupt?)"
    with pytest.raises(ModelNotFoundError) as err:
        load_model("embedded", adapter=str(bad))
    assert str(err.value) == message
    proc = subprocess.run([sys.executable, str(SCRIPT), "--input", str(test_csv), "--output", str(tmp_path / "s.csv"),
                           "--adapter", str(bad)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"


# ---------------------------------------------------------------- the Kaggle notebook


def run_notebook(tmp_path, monkeypatch, settings: dict):
    """Execute the Kaggle notebook with ``PROMPTREC_<NAME>`` overrides; return the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernelspec for this interpreter in a private Jupyter dir: CI machines have no registered kernel.
    kernel_dir = tmp_path / "jupyter" / "kernels" / "promptrec-test"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "promptrec test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    for name, value in settings.items():
        monkeypatch.setenv(f"PROMPTREC_{name}", str(value))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="promptrec-test", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def test_kaggle_notebook_runs_on_the_embedded_model(tmp_path, test_csv, adapter_dir, monkeypatch):
    """The notebook end to end, and predict_file with an adapter: the base model and max_text_tokens come from
    the adapter's run_config.json."""
    out = tmp_path / "working" / "submission.csv"
    nb = run_notebook(tmp_path, monkeypatch, {
        "TEST_CSV": test_csv, "OUTPUT": out, "BASE_MODEL": "", "ADAPTER": adapter_dir, "SRC_DIR": REPO,
        "WHEELS_DIR": "", "MAX_NEW_TOKENS": 4, "LOAD_IN_4BIT": "0", "BATCH_SIZE": 2})
    sub = check_submission(out, ["b", "a"])
    assert all(p.endswith(MEAN) for p in sub["rewrite_prompt"])  # the notebook appends the mean prompt by default
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"promptrec from {REPO / 'promptrec'}" in printed
    config = json.loads((out.parent / "submission.config.json").read_text())
    assert config["resolved"] == {"model": "embedded", "adapter": str(adapter_dir), "max_text_tokens": 16,
                                  "load_in_4bit": False}
    assert config["selection"] == {"selection": "greedy"}  # the notebook's default


def test_kaggle_notebook_mbr_selection(tmp_path, test_csv, monkeypatch):
    """SELECTION=mbr on the embedded model, SCORER_DIR "" → the embedded MiniLM scorer."""
    out = tmp_path / "working" / "submission.csv"
    run_notebook(tmp_path, monkeypatch, {
        "TEST_CSV": test_csv, "OUTPUT": out, "BASE_MODEL": "embedded", "ADAPTER": "", "SRC_DIR": REPO,
        "WHEELS_DIR": "", "MAX_NEW_TOKENS": 4, "MAX_TEXT_TOKENS": 16, "LOAD_IN_4BIT": "0", "BATCH_SIZE": 2,
        "SELECTION": "mbr", "NUM_CANDIDATES": 2, "SCORER_DIR": ""})
    sub = check_submission(out, ["b", "a"])
    assert all(p.endswith(MEAN) for p in sub["rewrite_prompt"])
    selection = json.loads((out.parent / "submission.config.json").read_text())["selection"]
    assert selection["selection"] == "mbr" and selection["num_candidates"] == 2
    assert selection["scorer"]["model"] == "all-MiniLM-L6-v2 (embedded)"


def test_notebook_settings_are_predict_arguments():
    """The notebook builds PredictArguments with real field names only, and has the same selection switch as the
    script (SELECTION, REWARD_MODEL, MBR_WEIGHT)."""
    import ast
    from dataclasses import fields

    nb = json.loads(NOTEBOOK.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
             "PredictArguments"]
    names = {f.name for f in fields(PredictArguments)}
    assert len(calls) == 1 and {k.arg for k in calls[0].keywords} <= names
    assert {"selection", "reward_model", "mbr_weight"} <= {k.arg for k in calls[0].keywords}
    for setting in ("SELECTION", "REWARD_MODEL", "MBR_WEIGHT"):
        assert f'{setting} = ' in code
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|HF_TOKEN|login\(", code)  # offline, no secrets


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_readme_commands_parse():
    """Every `inference/predict.py` command in inference/README.md parses with the script's parser."""
    from promptrec.cli import parse_args

    text = (REPO / "inference" / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line.split("inference/predict.py", 1)[1]) for line in text.splitlines()
                if line.startswith(".venv/bin/python inference/predict.py")]
    assert len(commands) >= 3
    for argv in commands:
        if "--help" not in argv:
            parse_args(PredictArguments, PostprocessConfig, args=argv)
