"""Where a run ran: CPU model, threads, bf16 instructions, GPU, dtypes and library versions, for every report.

:func:`describe_environment` returns the facts as a JSON-able dict (saved in ``run_config.json``, the predict step's
``<stem>.config.json``, the pipeline's ``report.json`` and the benchmarks' output); :func:`environment_line` writes
them as one line for a report or a benchmark's first line of output. Versions are read from the installed packages'
metadata, so no library is imported just to name its version.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from promptrec.models import cpu_has_bf16

# The libraries whose versions every report records (distribution names).
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "sentence-transformers",
             "bitsandbytes")
# The ones environment_line names (the full set is in the dict).
LINE_LIBRARIES = ("torch", "transformers", "trl", "peft")
NOT_INSTALLED = "not installed"
NOT_RECORDED = "not recorded"


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name: the first ``model name`` line of ``cpuinfo`` (default: ``/proc/cpuinfo``), else
    ``platform.processor()``, else ``"unknown"``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def library_versions(names=LIBRARIES) -> dict[str, str]:
    """``{"python": "3.x.y", <distribution>: <version> or "not installed", ...}`` from package metadata."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def model_dtype(model) -> str | None:
    """The dtype name (``"float32"``, ``"bfloat16"``…) of the model's first floating-point parameter: the dtype it
    runs in (for a 4-bit model, whose quantised weights are integers, that of its unquantised modules)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def describe_environment(training_dtype: str | None = None, generation_dtype: str | None = None) -> dict:
    """The machine and software a run used, as a JSON-able dict with the keys

    ``cpu`` (model name), ``cpu_count`` (``os.cpu_count()``), ``torch_threads`` (``torch.get_num_threads()``),
    ``cpu_bf16`` (bool: bf16 instructions, :func:`promptrec.models.cpu_has_bf16`), ``gpu`` (CUDA device 0's name,
    or None), ``training_dtype`` and ``generation_dtype`` (as given, None when the caller has none), and
    ``versions`` (``python`` and each of :data:`LIBRARIES` → version or ``"not installed"``).
    """
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": cpu_has_bf16(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "training_dtype": training_dtype, "generation_dtype": generation_dtype, "versions": library_versions()}


def environment_line(env: dict) -> str:
    """One line of :func:`describe_environment`'s dict, e.g. ``AMD EPYC, 2 torch threads (2 CPUs), bf16
    instructions: yes; training bfloat16 autocast over float32 weights, generation bfloat16; python 3.12.3, torch
    2.13.0, transformers 5.23.0, trl 1.16.0, peft 0.21.2`` (the dtypes only when the dict has them)."""
    machine = (f"{env.get('cpu', 'unknown')}{' + GPU ' + env['gpu'] if env.get('gpu') else ''}, "
               f"{env.get('torch_threads')} torch threads ({env.get('cpu_count')} CPUs), "
               f"bf16 instructions: {'yes' if env.get('cpu_bf16') else 'no'}")
    dtypes = ", ".join(f"{stage} {env[f'{stage}_dtype']}" for stage in ("training", "generation")
                       if env.get(f"{stage}_dtype"))
    versions = env.get("versions", {})
    libraries = ", ".join(f"{name} {versions[name]}" for name in ("python", *LINE_LIBRARIES) if name in versions)
    return "; ".join(part for part in (machine, dtypes, libraries) if part)
