"""Shared training pieces without training: recipes parse, LoRA targets per architecture, completion-only masking,
stable splits, pairs validation."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from stage_helpers import REPO, load_script, recipe_mismatches

from promptrec.cli import parse_args
from promptrec.run_config import INHERITED
from promptrec.splits import split_frame
from promptrec.tables import DataError
from promptrec.training import check_lora_targets, lora_config, read_pairs, rows_consumed, sft_dataset

SFT_RECIPES = sorted((REPO / "sft" / "configs").glob("*.yaml"))
DPO_RECIPES = sorted((REPO / "dpo" / "configs").glob("*.yaml"))
RM_RECIPES = sorted((REPO / "reward" / "configs").glob("rm_*.yaml"))  # reward/configs' other recipes: test_reward.py
LAUNCHERS = sorted((REPO / "dpo" / "accelerate").glob("*.yaml"))


# Each entry script's parser: (script arguments dataclass, TRL config class).
PARSERS = {"sft/train.py": ("SFTScriptArguments", "SFTConfig"), "dpo/train.py": ("DPOScriptArguments", "DPOConfig"),
           "dpo/grpo.py": ("GRPOScriptArguments", "GRPOConfig"),
           "reward/train_rm.py": ("RMScriptArguments", "RewardConfig")}


def recipe_script(path, stage=None) -> str:
    """The entry script a recipe is for: ``<stage>/grpo.py`` for ``grpo_*.yaml``, ``<stage>/train_rm.py`` for
    ``rm_*.yaml``, else ``<stage>/train.py``."""
    stage = stage or path.parent.parent.name
    prefixes = {"grpo_": "grpo.py", "rm_": "train_rm.py"}
    return f"{stage}/" + next((s for p, s in prefixes.items() if path.name.startswith(p)), "train.py")


def parse_recipe(path, *overrides, stage=None, script=None):
    """Parse a recipe with its script's parser. GPU recipes (bf16, paged optimiser) get ``--use_cpu true`` on a
    machine without CUDA, because TrainingArguments refuses bf16 without a GPU or use_cpu."""
    import trl

    script = script or recipe_script(path, stage)
    script_args, config = PARSERS[script]
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    module = load_script(script)
    model_config = getattr(module, "InheritedModelConfig", trl.ModelConfig)  # DPO, GRPO: unset = the SFT run's
    return parse_args(getattr(module, script_args), getattr(trl, config), model_config,
                      args=["--config", str(path), *cpu, *overrides])


@pytest.mark.parametrize("path", SFT_RECIPES + DPO_RECIPES + RM_RECIPES + LAUNCHERS,
                         ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}")
def test_every_recipe_and_launcher_config_parses(path):
    if path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(str(path))
        assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16")
        if config.distributed_type == "DEEPSPEED":
            assert config.deepspeed_config["zero_stage"] in (2, 3)
        return
    script_args, training_args, model_args = parse_recipe(path)
    # every value arrives as the recipe writes it (none overwritten or mis-typed), and the ones that matter are set
    assert recipe_mismatches(path, script_args, training_args, model_args) == {}
    written = set(yaml.safe_load(path.read_text()))
    stage = path.parent.parent.name
    needs = {"dpo": {"beta", "loss_type", "scorer"},
             "reward": {"model_name_or_path", "lora_r", "train_pairs", "eval_pairs"}}.get(  # no SCS eval: no scorer
        stage, {"model_name_or_path", "lora_r", "max_text_tokens", "scorer"})
    assert needs | {"learning_rate"} <= written and written & {"max_steps", "num_train_epochs"}
    assert training_args.output_dir.startswith("checkpoints/")
    if path.parent.parent.name == "dpo":  # decided once, by the SFT run: read back from its run_config.json
        assert all(getattr(model_args, name) is None for name in INHERITED) and script_args.sft_adapter
    else:
        assert model_args.model_name_or_path
    if model_args.load_in_4bit:  # QLoRA recipes: NF4, double quantisation, storage = compute dtype (ZeRO-3)
        assert model_args.use_bnb_nested_quant and model_args.bnb_4bit_quant_storage == model_args.dtype


def test_unknown_recipe_key_is_an_error(tmp_path, capsys):
    """A stale key in a recipe stops the parse with one line naming it (exit 2), not a traceback."""
    recipe = tmp_path / "stale.yaml"
    recipe.write_text((REPO / "sft/configs/smollm2.yaml").read_text() + "max_seq_length: 512\n")
    with pytest.raises(SystemExit) as stop:
        parse_recipe(recipe, stage="sft")
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "max_seq_length" in line


def test_only_user_facing_path_errors_are_one_line(tmp_path, capsys):
    """A missing path the user named (a table, a recipe) is ``error: <path>: <problem>`` and exit 2; any other
    FileNotFoundError is a bug and keeps its traceback."""
    from promptrec.cli import run_main
    from promptrec.tables import UserPathError, read_table, require_path

    missing = tmp_path / "missing.csv"
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: read_table(missing))
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {missing}: no such file\n"
    with pytest.raises(SystemExit) as stop:
        parse_recipe(tmp_path / "nope.yaml", stage="sft")
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.yaml'}: no such file (the --config recipe)\n"
    with pytest.raises(FileNotFoundError):  # internal: not caught
        run_main(lambda: open(tmp_path / "internal.json"))
    assert require_path(tmp_path, "directory") == tmp_path
    with pytest.raises(UserPathError, match=f"^{tmp_path}: not a file$"):
        require_path(tmp_path)


def _tiny(config_cls, **kwargs):
    from transformers import AutoModelForCausalLM

    config = config_cls(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, **kwargs)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("recipe, arch", [("phi2_qlora", "phi"), ("mistral7b_qlora", "mistral")])
def test_recipe_lora_targets_land_on_the_architecture(recipe, arch):
    from peft import get_peft_model
    from transformers import MistralConfig, PhiConfig

    model = _tiny(PhiConfig) if arch == "phi" else _tiny(MistralConfig, num_key_value_heads=2)
    _, _, model_args = parse_recipe(REPO / "sft" / "configs" / f"{recipe}.yaml")
    peft_model = get_peft_model(model, lora_config(model_args, model))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(model_args.lora_target_modules)
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())


def test_wrong_targets_and_auto_targets():
    from transformers import PhiConfig

    from promptrec.training import default_lora_targets

    phi = _tiny(PhiConfig)
    with pytest.raises(ValueError, match="o_proj"):  # Llama names on Phi: o_proj/gate_proj/... don't exist
        check_lora_targets(phi, default_lora_targets("mistral"))
    _, _, model_args = parse_recipe(REPO / "sft/configs/phi2_qlora.yaml", "--lora_target_modules", "auto")
    assert set(lora_config(model_args, phi).target_modules) == set(default_lora_targets("phi"))


def test_completion_only_loss_masks_the_rendered_prompt(tmp_path, tiny_triplets, embedded_tokenizer,
                                                        embedded_model_dir):
    """SFTTrainer on our prompt/completion rows supervises exactly the completion (the prompt, then end of turn)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    config = AutoConfig.from_pretrained(embedded_model_dir)
    config.update(dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    model = AutoModelForCausalLM.from_config(config)
    dataset = sft_dataset(tiny_triplets.head(2), embedded_tokenizer, max_text_tokens=16)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_length=256, report_to="none")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=embedded_tokenizer)
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_ids = embedded_tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True,
                                                        tokenize=True, return_dict=False)
    n_prompt = len(prompt_ids)
    assert ids[:n_prompt].tolist() == list(prompt_ids)
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()
    supervised = embedded_tokenizer.decode(ids[n_prompt:])
    assert supervised.startswith(tiny_triplets.rewrite_prompt[0]) and "<|im_end|>" in supervised


def test_4bit_cpu_model_is_unchanged_by_eval_and_saving(embedded_tokenizer):
    """An eval forward then ``state_dict()`` (what every checkpoint save does) must leave a 4-bit model's logits
    bit-identical: bitsandbytes' CPU repacking would round and re-quantise the frozen base's absmax."""
    from promptrec.models import load_model

    model = load_model("embedded", load_in_4bit=True, dtype="float32").eval()
    batch = embedded_tokenizer(["Recover the instruction: Arr matey!"], return_tensors="pt")
    with torch.no_grad():
        first = model(**batch).logits
        model.state_dict()
        again = model(**batch).logits
    assert torch.equal(first, again)


def test_rows_consumed_is_what_max_steps_reaches():
    from types import SimpleNamespace

    args = SimpleNamespace(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2)
    assert rows_consumed(args) == 48
    assert rows_consumed(SimpleNamespace(**{**vars(args), "max_steps": -1})) is None  # by epochs: every row


def test_split_is_stable_when_rows_are_added():
    """Eval membership depends on the key alone, so stages reading different subsets of one file agree."""
    small = pd.DataFrame({"id": [f"r{i}" for i in range(40)]})
    more = pd.concat([small, pd.DataFrame({"id": [f"s{i}" for i in range(40)]})], ignore_index=True)
    _, small_eval = split_frame(small, 0.3, "id", seed=5)
    _, big_eval = split_frame(more, 0.3, "id", seed=5)
    assert 0 < len(small_eval) < len(small)
    assert set(small_eval.id) == set(big_eval.id) & set(small.id)


def test_a_salted_outer_split_leaves_the_stages_their_own_eval_rows():
    """The pipeline holds prompts out, then SFT and pair building split its train side again by prompt with the
    same seed: unsalted, every prompt the inner split would pick was already held out (the real-data run's SFT
    got 1 eval row of 744)."""
    df = pd.DataFrame({"id": [f"r{i}" for i in range(600)], "rewrite_prompt": [f"prompt {i}" for i in range(600)]})
    train, heldout = split_frame(df, 0.2, "prompt", seed=42)
    _, inner = split_frame(train, 0.1, "prompt", seed=42)
    assert len(inner) == 1  # the degenerate case: only the "at least one group" rule puts anything there
    train, heldout = split_frame(df, 0.2, "prompt", seed=42, salt="heldout")
    _, inner = split_frame(train, 0.1, "prompt", seed=42)
    assert 0.05 * len(train) < len(inner) < 0.15 * len(train)
    assert not set(heldout.rewrite_prompt) & set(train.rewrite_prompt)

def test_read_pairs_checks_the_conversational_format(tmp_path):
    prompt = [{"role": "user", "content": "Original text: a. Rewritten text: b."}]
    good = {"id": "x", "prompt": prompt, "chosen": [{"role": "assistant", "content": "Make it formal."}],
            "rejected": [{"role": "assistant", "content": "Make it a poem."}], "score_chosen": 0.9,
            "score_rejected": 0.1}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "Make it formal."}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: column 'chosen' row 2"):
        read_pairs(str(path))
    path.write_text(json.dumps(good) + "\n")
    ds = read_pairs(str(path))
    assert ds.column_names == ["prompt", "chosen", "rejected"] and ds[0]["chosen"] == good["chosen"]


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(script, args)`` of every train/grpo/train_rm/merge command in sft/, dpo/ and reward/README.md (accelerate's
    own flags dropped after checking that its config file exists)."""
    import shlex

    found = []
    for readme in ("sft/README.md", "dpo/README.md", "reward/README.md"):
        text = (REPO / readme).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if not line.startswith(("python ", "accelerate ")):
                continue
            words = shlex.split(line)
            scripts = [i for i, w in enumerate(words) if w in (*PARSERS, "dpo/merge.py")]
            if not scripts:
                continue
            if words[0] == "accelerate":
                assert (REPO / words[words.index("--config_file") + 1]).exists(), line
            found.append((words[scripts[0]], words[scripts[0] + 1:]))
    return found


@pytest.mark.parametrize("script, args", readme_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_readme_commands_parse(script, args):
    if script == "dpo/merge.py":
        module = load_script(script)
        assert parse_args(module.MergeArguments, args=args)[0].adapter
        return
    config = REPO / args[args.index("--config") + 1]
    script_args, _, _ = parse_recipe(config, *args[args.index("--config") + 2:], script=script)
    assert script_args.max_text_tokens is None or script_args.max_text_tokens > 0


def test_cpu_has_bf16_reads_the_flags_line():
    from promptrec.models import cpu_has_bf16

    assert cpu_has_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16("flags\t\t: fpu amx_bf16\n")
    assert not cpu_has_bf16("flags\t\t: fpu sse2 avx2 avx512f\nbugs\t\t: avx512_bf16\n")  # only the flags line
    assert not cpu_has_bf16("")
