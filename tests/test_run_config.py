"""The run contract (promptrec/run_config.py): one RunConfig written by SFT and read by every later stage, checked
against what a later stage is told, carried with the rows it trained on, and stated in the adapter's model card."""

from __future__ import annotations

import json
import shutil

import pytest
from stage_helpers import make_sft_run, tiny_target_checkpoint

from promptrec.model_card import model_card
from promptrec.models import EMBEDDED_HUB_ID, load_model, model_shape
from promptrec.run_config import (
    INHERITED,
    RUN_CONFIG,
    RunConfig,
    TrainingData,
    read_run_config,
    same_shape,
    split_rows,
)
from promptrec.tables import DataError, write_json
from promptrec.training import FromSFTArguments, InheritedModelConfig, inherit_from_sft, load_base, sft_eval_triplets

SFT_RUN = RunConfig(stage="sft", model_name_or_path="embedded", base_model_id=EMBEDDED_HUB_ID, dtype="float32",
                    load_in_4bit=True, bnb_4bit_quant_storage="float32", attn_implementation="sdpa",
                    tokenizer="embedded", max_text_tokens=100, lora_target_modules=["q_proj", "v_proj"], lora_r=16,
                    lora_alpha=32,
                    data=TrainingData("reference", [], "prompt", 0.1, 42, 450, 54,
                                      licence="the project's own (bundled with promptrec, written for it)"),
                    sections={"world_size": 1, "environment": {"training_dtype": "float32"},
                              "SFTConfig": {"max_steps": 60, "learning_rate": 2e-4}})


def test_round_trip_keeps_the_schema_and_the_other_sections(tmp_path):
    SFT_RUN.save(tmp_path)
    raw = json.loads((tmp_path / RUN_CONFIG).read_text())
    assert raw["model_name_or_path"] == "embedded" and raw["data"]["train_rows"] == 450
    assert raw["environment"]["training_dtype"] == "float32"  # where pipeline/comparison.py reads it
    assert read_run_config(tmp_path) == SFT_RUN


def test_a_run_config_written_before_the_schema_loads(tmp_path):
    """What promptrec.training.run_config wrote: a few top-level keys, the rest in the resolved dataclasses."""
    old = {"stage": "sft", "model_name_or_path": "microsoft/phi-2", "max_text_tokens": 384, "load_in_4bit": True,
           "dtype": "bfloat16", "world_size": 1, "lora_target_modules": ["dense", "fc1"],
           "SFTScriptArguments": {"max_text_tokens": 384, "triplets": "x.csv"},
           "SFTConfig": {"max_steps": 10}, "environment": {"training_dtype": "bfloat16"},
           "ModelConfig": {"model_name_or_path": "microsoft/phi-2", "model_revision": "main", "dtype": "bfloat16",
                           "attn_implementation": "sdpa", "load_in_4bit": True, "load_in_8bit": False,
                           "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
                           "bnb_4bit_quant_storage": "bfloat16", "lora_r": 32}}
    write_json(old, tmp_path / RUN_CONFIG)
    run = read_run_config(tmp_path)
    assert (run.model_name_or_path, run.max_text_tokens, run.load_in_4bit, run.dtype) == (
        "microsoft/phi-2", 384, True, "bfloat16")
    assert (run.bnb_4bit_quant_storage, run.attn_implementation) == ("bfloat16", "sdpa")  # from ModelConfig
    assert run.sections["environment"] == {"training_dtype": "bfloat16"} and run.to_dict()["world_size"] == 1


def test_a_missing_run_folder_and_a_folder_without_a_run_config_say_which(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'nope'}: no such directory"):
        read_run_config(tmp_path / "nope")
    with pytest.raises(DataError, match=f"^{tmp_path}: no {RUN_CONFIG}"):
        read_run_config(tmp_path)
    assert read_run_config(tmp_path, required=False) is None


def test_dpo_and_grpo_inherit_what_their_recipe_leaves_unset(tmp_path):
    SFT_RUN.save(tmp_path)
    script, model = FromSFTArguments(sft_adapter=str(tmp_path)), InheritedModelConfig()
    assert inherit_from_sft(script, model) == SFT_RUN
    assert {name: getattr(model, name) for name in INHERITED} == {name: getattr(SFT_RUN, name) for name in INHERITED}
    assert script.max_text_tokens == 100


@pytest.mark.parametrize("flags, message", [
    ({"load_in_4bit": False}, "load_in_4bit: False given, True in"),
    ({"dtype": "bfloat16"}, "dtype: 'bfloat16' given, 'float32' in"),
    ({"attn_implementation": "eager"}, "attn_implementation: 'eager' given, 'sdpa' in"),
    ({"model_name_or_path": "other/model"}, "model_name_or_path: 'other/model' given, 'embedded' in"),
    ({"max_text_tokens": 64}, "max_text_tokens: 64 given, 100 in"),
])
def test_a_contradiction_names_both_values_unless_overridden(tmp_path, flags, message):
    model_flags = {k: v for k, v in flags.items() if k != "max_text_tokens"}
    script_flags = {k: v for k, v in flags.items() if k == "max_text_tokens"}
    SFT_RUN.save(tmp_path)

    def run(allow):
        script = FromSFTArguments(sft_adapter=str(tmp_path), allow_config_override=allow, **script_flags)
        model = InheritedModelConfig(**model_flags)
        inherit_from_sft(script, model)
        return script, model

    with pytest.raises(DataError) as err:
        run(False)
    line = str(err.value)
    assert message in line and str(tmp_path / RUN_CONFIG) in line and "--allow_config_override true" in line
    assert "\n" not in line
    script, model = run(True)
    (name, value), = flags.items()
    assert getattr(script if name == "max_text_tokens" else model, name) == value


def test_same_values_in_other_spellings_agree(tmp_path, embedded_model_dir):
    """dtype aliases, and a local copy of the base (its folder instead of its name: the same config) agree."""
    run = RunConfig("sft", "embedded", base_shape=model_shape("embedded"), dtype="float32")
    assert run.agree("dtype", "fp32") == "fp32"
    assert run.agree("model_name_or_path", str(embedded_model_dir)) == str(embedded_model_dir)


def test_another_model_with_the_same_name_pattern_is_caught(tmp_path):
    """A local model whose config differs from the base the run recorded (Mistral v0.1 for v0.2, say) stops."""
    other = tiny_target_checkpoint("mistral", tmp_path / "mistral-7b-instruct-v0.1")
    run = RunConfig("sft", "mistralai/Mistral-7B-Instruct-v0.2", base_shape={**model_shape(str(other)),
                                                                             "rope_theta": 1e6})
    assert same_shape({**run.base_shape, "rope_theta": None}, run.base_shape)  # a version that does not state it
    with pytest.raises(DataError, match="model_name_or_path: .*mistral-7b-instruct-v0.1' given, "
                                        "'mistralai/Mistral-7B-Instruct-v0.2' in"):
        run.agree("model_name_or_path", str(other))


def test_the_sft_rows_survive_moving_the_run_and_losing_the_source(tmp_path, embedded_model_dir):
    """DPO's eval rows and GRPO's prompts come from the SFT run's folder, not from its source triplet file."""
    run = make_sft_run(tmp_path, max_text_tokens=16)
    saved_eval, saved_train = split_rows(run, "eval"), split_rows(run, "train")
    (tmp_path / "triplets.jsonl").unlink()
    moved = shutil.move(str(run), str(tmp_path / "elsewhere"))
    rows = sft_eval_triplets(FromSFTArguments(sft_adapter=moved, eval_scs_samples=8))
    assert rows.equals(saved_eval) and len(rows) > 0
    assert split_rows(moved, "train").equals(saved_train) and len(saved_train) + len(rows) == 8


def test_attn_implementation_reaches_the_model(embedded_model_dir):
    for kernel in ("eager", "sdpa"):
        model = load_model("embedded", dtype="float32", attn_implementation=kernel)
        assert model.config._attn_implementation == kernel
    model = load_base(InheritedModelConfig(model_name_or_path="embedded", dtype="float32", attn_implementation="eager",
                                           load_in_4bit=False, load_in_8bit=False))
    assert model.config._attn_implementation == "eager"  # a recipe's attn_implementation, through training's loader


def test_model_card_states_task_base_data_method_scs_and_loading():
    dpo = RunConfig(**{**SFT_RUN.__dict__, "stage": "dpo", "trained_on": "pairs/train.jsonl", "sections": {
        "sft_run": SFT_RUN.to_dict(), "DPOConfig": {"max_steps": 30, "learning_rate": 1e-4, "beta": 0.1,
                                                    "loss_type": ["sigmoid", "sft"]}}})
    metrics = {"scs": {"n": 54, "scorer": {"model": "all-MiniLM-L6-v2 (embedded)"}, "dpo": 0.6123, "sft": 0.5981}}
    card = model_card(dpo, metrics, measured={"mean_scs": 0.6011, "ci_low": 0.58, "ci_high": 0.62, "n": 120,
                                              "where": "pipeline report"})
    assert card.startswith("---\nlibrary_name: peft\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    for expected in ("recover the rewrite prompt", "SCS", "`HuggingFaceTB/SmolLM2-135M-Instruct` (loaded as "
                     "`embedded`)", "4-bit nf4", "texts cut to 100 tokens", "450 train / 54 eval", "the project's own",
                     "pairs/train.jsonl", "DPO (TRL)", "r 16, alpha 32", "targets q_proj, v_proj", "30 steps",
                     "learning rate 0.0001", "beta 0.1", "loss sigmoid + sft",
                     "pipeline report: **0.6011** (95% CI 0.5800 … 0.6200) on 120 held-out rows",
                     "**0.6123**; on the same rows sft 0.5981", "inference/predict.py --adapter",
                     "kaggle_inference.ipynb", "PeftModel.from_pretrained", "BitsAndBytesConfig"):
        assert expected in card, expected
    assert "[None]" not in card and "licence: license" not in card
    sft_card = model_card(RunConfig("sft", "/models/local-base", data=None), {})
    assert "`/models/local-base`" in sft_card and "not measured" in sft_card and "base_model:" not in sft_card
