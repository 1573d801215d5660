"""promptrec/environment.py: the machine, dtypes and versions every report records, and where reports record them."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch

from promptrec import environment
from promptrec.environment import (
    LIBRARIES,
    NOT_INSTALLED,
    NOT_RECORDED,
    cpu_model,
    describe_environment,
    environment_line,
    library_versions,
    model_dtype,
)
from promptrec.training import run_sections, training_dtype

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from comparison import ran_on, recorded_dtypes

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu avx512f avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
"""


def test_cpu_model_reads_the_model_name_line_and_falls_back(monkeypatch):
    assert cpu_model(CPUINFO) == "AMD EPYC 9654 96-Core Processor"
    monkeypatch.setattr(platform, "processor", lambda: "aarch64")
    assert cpu_model("processor\t: 0\nBogoMIPS\t: 50.00\n") == "aarch64"  # ARM's cpuinfo has no model name
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_model("") == "unknown"
    assert cpu_model()  # this machine's, never empty


def test_describe_environment_has_the_facts_and_real_versions():
    env = describe_environment(training_dtype="float32", generation_dtype="bfloat16")
    assert set(env) == {"cpu", "cpu_count", "torch_threads", "cpu_bf16", "gpu", "training_dtype",
                        "generation_dtype", "versions"}
    assert env["torch_threads"] == torch.get_num_threads() and env["cpu_count"] >= 1
    assert isinstance(env["cpu_bf16"], bool)
    assert (env["gpu"] is None) == (not torch.cuda.is_available())
    assert set(env["versions"]) == {"python", *LIBRARIES}
    assert env["versions"]["torch"] == version("torch") == torch.__version__
    assert env["versions"]["transformers"] == version("transformers")
    assert library_versions(("no-such-package-promptrec",))["no-such-package-promptrec"] == NOT_INSTALLED
    json.dumps(env)  # goes into JSON files as is


def test_environment_line_names_the_machine_dtypes_and_versions(monkeypatch):
    monkeypatch.setattr(environment, "cpu_model", lambda: "AMD EPYC")
    env = describe_environment(training_dtype="bfloat16 autocast over float32 weights", generation_dtype="bfloat16")
    line = environment_line(env)
    assert line.startswith(f"AMD EPYC, {torch.get_num_threads()} torch threads (")
    assert "training bfloat16 autocast over float32 weights, generation bfloat16" in line
    assert f"torch {version('torch')}" in line and f"trl {version('trl')}" in line
    assert "training" not in environment_line(describe_environment())  # no dtypes given, none named
    assert "+ GPU NVIDIA H100" in environment_line(env | {"gpu": "NVIDIA H100"})


def test_model_and_training_dtypes():
    assert model_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16)) == "bfloat16"
    int_only = torch.nn.Module()
    int_only.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.uint8), requires_grad=False)
    assert model_dtype(int_only) is None
    fp32 = SimpleNamespace(dtype="float32")
    assert training_dtype(SimpleNamespace(bf16=True, fp16=False), fp32) == "bfloat16 autocast over float32 weights"
    assert training_dtype(SimpleNamespace(bf16=False, fp16=False), fp32) == "float32"
    assert training_dtype(SimpleNamespace(bf16=True, fp16=False), SimpleNamespace(dtype="bf16")) == (
        "bfloat16 weights under bfloat16 autocast")


def test_run_config_records_the_environment(tmp_path):
    from trl import ModelConfig, SFTConfig

    @dataclass
    class Script:
        max_text_tokens: int = 64

    config = run_sections(Script(), SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True),
                          ModelConfig(model_name_or_path="embedded", dtype="float32"))
    assert config["environment"]["training_dtype"] == "bfloat16 autocast over float32 weights"
    assert config["environment"]["versions"]["trl"] == version("trl")


def test_report_says_where_it_ran_and_what_a_run_recorded(tmp_path):
    assert recorded_dtypes(tmp_path) == (NOT_RECORDED, NOT_RECORDED)  # an older run: nothing recorded
    (tmp_path / "sft").mkdir()
    (tmp_path / "predict").mkdir()
    (tmp_path / "sft" / "run_config.json").write_text(json.dumps({"stage": "sft"}))
    (tmp_path / "predict" / "base.config.json").write_text(json.dumps({"rows": 3}))
    assert recorded_dtypes(tmp_path) == (NOT_RECORDED, NOT_RECORDED)  # files without the keys
    (tmp_path / "sft" / "run_config.json").write_text(json.dumps({"environment": {"training_dtype": "float32"}}))
    for name in ("sft", "dpo"):
        (tmp_path / "predict" / f"{name}.config.json").write_text(
            json.dumps({"environment": {"generation_dtype": "bfloat16"}}))
    env = ran_on(tmp_path)
    assert (env["training_dtype"], env["generation_dtype"]) == ("float32", "bfloat16")
    assert "training float32, generation bfloat16" in environment_line(env)
