"""Test helpers for the training stages: import an entry script (sft/train.py, dpo/train.py) as a module, compare
base weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# GRPO at its smallest for the end-to-end pipeline tests: one step of 2 answers of 8 tokens to 1 prompt
TINY_GRPO = ("grpo:--num_generations 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
             "--max_completion_length 8")


def load_script(relpath: str):
    """The module of ``REPO/relpath``, imported once under a unique name (stage folders are not packages)."""
    name = "stage_" + relpath.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def base_weights(model) -> dict:
    """The non-LoRA parameters of a model, PEFT-wrapped or not, under the plain model's names (4-bit weights as
    their packed bytes)."""
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): param.detach()
            for name, param in model.named_parameters() if "lora_" not in name}


def assert_same_base(trained, fresh) -> None:
    """Every base parameter of ``trained`` is bit-identical to the freshly loaded ``fresh`` model's."""

    got, want = base_weights(trained), base_weights(fresh)
    assert got.keys() == want.keys()
    changed = [name for name in want if not torch.equal(got[name], want[name])]
    assert not changed, f"base weights changed: {changed[:5]}"


_KILL_AT_STEP = """
import os, runpy, signal, sys
import trl
from transformers import TrainerCallback


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: as a killed job dies


trainer_cls = getattr(trl, {trainer!r})
init = trainer_cls.__init__


def init_with_kill(self, *args, **kwargs):  # patched in place: scripts may subclass it or pass their own callbacks
    init(self, *args, **kwargs)
    self.add_callback(KillAt())


trainer_cls.__init__ = init_with_kill
sys.argv = [{script!r}, *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def run_killed_at_step(script: str, trainer: str, argv: list[str], step: int):
    """Run ``python script *argv`` in a child process where every ``trl.<trainer>`` (subclasses included) SIGKILLs it
    at the end of training step ``step``; returns the ``CompletedProcess`` (returncode -9 when the kill came)."""
    import subprocess
    import sys

    code = _KILL_AT_STEP.format(step=step, trainer=trainer, script=str(REPO / script), argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)


def count_training_steps(monkeypatch, trainer_cls) -> list:
    """Count the micro-batches ``trainer_cls`` trains on in this process (one list item per ``training_step``)."""
    calls, original = [], trainer_cls.training_step

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "training_step", counted)
    return calls


def assert_resumed_like_straight(resumed, straight, resumed_dir: Path, straight_dir: Path, steps: int) -> None:
    """A resumed trainer logged the same loss at every step as one never killed, and saved the same adapter."""
    from safetensors.torch import load_file

    def losses(trainer):
        return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}

    assert resumed.state.global_step == steps and list(losses(resumed)) == list(range(1, steps + 1))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    want = load_file(str(straight_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name])


# Mistral-7B-Instruct's chat template (as its tokenizer ships it, minus the system-prompt branch).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def tiny_target_checkpoint(arch: str, path: Path) -> Path:
    """A tiny random checkpoint of a target architecture (``phi`` or ``mistral``: the real module names) saved to
    ``path`` with a tokenizer as its recipe expects it: Phi-2's has no chat template (promptrec gives it the
    documented Instruct/Output one), Mistral's has the [INST] template. The tokenizer is SmolLM2's vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, PhiConfig

    from promptrec.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    tokenizer.chat_template = None if arch == "phi" else MISTRAL_CHAT_TEMPLATE
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 2048, "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id}
    config = PhiConfig(**shape) if arch == "phi" else MistralConfig(**shape, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if arch == "phi":  # save_pretrained keeps no template when there is none, but make sure of it
        (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def make_sft_run(root: Path, max_text_tokens: int, lora_init_std: float = 0.0) -> Path:
    """``root/run``: a folder laid out like an sft/train.py run on tests/conftest.TINY_TRIPLETS (written to
    ``root/triplets.jsonl``): a LoRA adapter of the smollm2 recipe's shape (``lora_B`` drawn with
    ``lora_init_std`` > 0 so it differs from the base), tokenizer, run_config.json and split.parquet."""
    import pandas as pd
    from conftest import TINY_TRIPLETS
    from peft import get_peft_model
    from trl import ModelConfig, SFTConfig

    from promptrec.cli import parse_args
    from promptrec.models import load_model, load_tokenizer, model_shape
    from promptrec.run_config import RunConfig, TrainingData, save_split
    from promptrec.splits import split_frame
    from promptrec.training import lora_config

    triplets = pd.DataFrame([{"id": f"t{i}", "original_text": o, "rewrite_prompt": p, "rewritten_text": r}
                             for i, (o, p, r) in enumerate(TINY_TRIPLETS)])
    triplets.to_json(root / "triplets.jsonl", orient="records", lines=True)
    run = root / "run"
    _, _, model_args = parse_args(load_script("sft/train.py").SFTScriptArguments, SFTConfig, ModelConfig,
                                  args=["--config", str(REPO / "sft/configs/smollm2.yaml")])
    base = load_model("embedded", dtype="float32")
    model = get_peft_model(base, lora_config(model_args, base))
    if lora_init_std:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, lora_init_std)
    model.save_pretrained(run)
    load_tokenizer("embedded").save_pretrained(run)
    train, evaluation = split_frame(triplets, 0.25, "id", seed=0)
    save_split(run, train, evaluation)
    data = TrainingData(str(root / "triplets.jsonl"), [], "id", 0.25, 0, len(train), len(evaluation))
    RunConfig("sft", "embedded", base_shape=model_shape(base.config), dtype="float32", tokenizer="embedded",
              max_text_tokens=max_text_tokens, lora_target_modules=model_args.lora_target_modules, data=data).save(run)
    return run


def recipe_mismatches(recipe: Path, *parsed) -> dict:
    """``{key: (yaml value, parsed value)}`` for every key of ``recipe`` whose value did not arrive as written in the
    parsed dataclasses (the one that declares the key). Enums compare by value, a YAML-1.1 string such as ``2e-4`` as
    the number it spells, a scalar with a one-item list, and ``report_to: none`` with ``[]`` (transformers' spelling
    of "no integrations")."""
    import dataclasses
    import enum

    import yaml

    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    def same(given, got) -> bool:
        got = plain(got)
        if given == "none" and got == []:
            return True
        if isinstance(given, list) and isinstance(got, list):
            return len(given) == len(got) and all(same(a, b) for a, b in zip(given, got))
        if isinstance(got, list) and not isinstance(given, list):
            return got == [given]
        if isinstance(given, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
            try:
                return float(given) == float(got)
            except ValueError:
                return False
        return given == got or (isinstance(given, (int, float)) and isinstance(got, (int, float))
                                and float(given) == float(got))

    wrong = {}
    for key, given in yaml.safe_load(recipe.read_text()).items():
        owners = [obj for obj in parsed if key in {f.name for f in dataclasses.fields(obj)}]
        assert owners, f"{recipe.name}: no parsed dataclass declares '{key}'"
        got = getattr(owners[0], key)
        if not same(given, got):
            wrong[key] = (given, plain(got))
    return wrong


def recounted_fallbacks(test_path: Path, raw_path: Path) -> int:
    """The rows of a prediction whose raw answer the unusable-answer rule rejects (the mean prompt stood in for
    them), recomputed from the test table and predict's ``--raw_output``: what its ``fallbacks`` must say."""
    import pandas as pd

    from promptrec.postprocess import clean_prediction

    test = pd.read_csv(test_path, keep_default_na=False)
    raw = pd.read_csv(raw_path, keep_default_na=False)
    assert list(raw["id"].astype(str)) == list(test["id"].astype(str))
    return sum(not clean_prediction(answer, sources=(o, r)) for answer, o, r
               in zip(raw["raw_prediction"], test["original_text"], test["rewritten_text"]))
