"""Batched chat generation with Hugging Face ``generate``: length-sorted batches, left padding.

Used by the rewrite step (generator = Gemma or the embedded model), candidate sampling and inference.
Sorting by length puts similar lengths in one batch, so little compute goes to padding; results come back
in input order. On the CPU the KV cache is static (:meth:`SamplingParams.generate_kwargs`); the dtype is the loader's
(:func:`promptrec.models.generation_dtype`). Measured in bench/bench_predict.py.

Sampling draws each row's tokens from its own random stream (:class:`RowSampler`), seeded by the seed and the row's
prompt tokens (:func:`row_seed`): a row samples the same text whichever rows share its batch, so a resumed, sharded
or re-batched run samples what one straight run does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class SamplingParams:
    """Decoding settings; ``temperature == 0`` means greedy. ``kv_cache``: ``auto`` (static on the CPU, the library's
    default on a GPU), ``static`` or ``dynamic``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0
    kv_cache: str = "auto"

    def generate_kwargs(self, device: torch.device | None = None) -> dict:
        """``generate`` keywords. On the CPU the KV cache is static (written in place): transformers' default dynamic
        cache concatenates every layer's keys and values at each new token, ~15% of a CPU generate call (torch
        profiler; bench/bench_predict.py). A GPU keeps the library's default."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_return_sequences": self.num_return_sequences}
        on_cpu = device is not None and device.type == "cpu"
        if self.kv_cache == "static" or (self.kv_cache == "auto" and on_cpu):
            kwargs["cache_implementation"] = "static"
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def row_seed(seed: int, token_ids: Sequence[int], sample: int = 0) -> int:
    """The seed of sample ``sample`` of one prompt: from ``seed`` and the prompt's tokens only, never its batch."""
    digest = hashlib.sha1(f"{seed}:{sample}:{','.join(map(str, token_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class RowSampler:
    """A ``transformers`` logits processor that samples under greedy decoding, with one random stream per row.

    Gumbel-max: the argmax of ``scores + Gumbel noise`` is a draw from ``softmax(scores)``. Placed after the
    temperature / top-k / top-p warpers, it samples as ``do_sample=True`` does, but row r's noise comes from its own
    generator (``seeds[r]``), so its tokens do not depend on the other rows of the batch (up to the batch's tiny
    numerical effect on the logits themselves).
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.generators = None  # made on the scores' device at the first step (a GPU draws its own noise)

    def __call__(self, input_ids, scores):
        device = scores.device
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20)))
        return scores + gumbel.to(scores.dtype)


def sampling_processors(params: SamplingParams, seeds: Sequence[int], top_k: int | None = 50):
    """The logits processors of a sampled ``generate`` call run as greedy decoding: the warpers ``do_sample`` would
    apply (temperature, the model's ``top_k``, ``top_p``), then :class:`RowSampler`."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    processors.append(RowSampler(seeds))
    return processors


def default_batch_size() -> int:
    """Rows per generate call where a caller sets none. CPU: 32 (bench/bench_predict.py, 2 cores, bf16, texts cut to 64
    tokens: 1.5x the rows/s of 8; 64 rows gained 2% more for 3x the memory). GPU: 8, as before (a 7B model's batch
    must fit a 16 GB card; raise ``--batch_size`` where memory allows)."""
    return 8 if torch.cuda.is_available() else 32


def encode_conversations(tokenizer, conversations: Sequence[list[dict]], max_input_tokens: int | None = None
                         ) -> list[list[int]]:
    """Token ids of each chat with the generation prompt appended (the model's own chat template)."""
    encoded = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding despite return_dict=False
            ids = ids["input_ids"]
        ids = list(ids)
        if max_input_tokens and len(ids) > max_input_tokens:
            ids = ids[-max_input_tokens:]  # the template's end (generation prompt) must survive
        encoded.append(ids)
    return encoded


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so memory peaks show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def iter_generate(model, tokenizer, conversations: Sequence[list[dict]], params: SamplingParams,
                  batch_size: int | None = None, max_input_tokens: int | None = None, progress: bool = True,
                  desc: str = "generate") -> Iterator[tuple[list[int], list[list[str]]]]:
    """Yield ``(indices, outputs)`` per batch; ``outputs[j]`` holds ``num_return_sequences`` texts for item
    ``indices[j]``. Callers write each batch as it comes, so a killed run loses at most one batch."""
    ids = encode_conversations(tokenizer, conversations, max_input_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    gen_kwargs = params.generate_kwargs(device)
    batch_size = batch_size or default_batch_size()
    n = params.num_return_sequences
    sampled = params.temperature > 0
    if sampled:  # greedy decoding + RowSampler: each of a row's n copies draws from its own stream
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_return_sequences=1)
        top_k = getattr(model.generation_config, "top_k", None)
        top_k = 50 if top_k is None else top_k  # do_sample's default
    bar = tqdm(total=len(ids), desc=desc, unit="row", disable=not progress)
    for batch in length_sorted_batches([len(x) for x in ids], batch_size):
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            attention[row, width - len(ids[i]):] = 1
        if sampled:
            input_ids, attention = input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)
            seeds = [row_seed(params.seed, ids[i], k) for i in batch for k in range(n)]
            gen_kwargs["logits_processor"] = sampling_processors(params, seeds, top_k)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             pad_token_id=pad_id, **gen_kwargs)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        yield batch, [[t.strip() for t in texts[j * n:(j + 1) * n]] for j in range(len(batch))]
        bar.update(len(batch))
    bar.close()


def generate(model, tokenizer, conversations: Sequence[list[dict]], params: SamplingParams | None = None,
             batch_size: int | None = None, **kwargs) -> list[list[str]]:
    """All outputs in input order: ``result[i]`` is the list of ``num_return_sequences`` texts for item i."""
    params = params or SamplingParams()
    result: list[list[str]] = [[] for _ in conversations]
    for batch, outputs in iter_generate(model, tokenizer, conversations, params, batch_size, **kwargs):
        for i, texts in zip(batch, outputs):
            result[i] = texts
    return result
