"""Optional vLLM backend for the rewrite step on a GPU machine where ``vllm`` is installed.

Same contract as :func:`promptrec.generation.iter_generate`: yields ``(indices, outputs)`` per chunk, prompts
rendered by the same chat template. Not exercised in CI (no GPU, vLLM not installed there).
"""

from __future__ import annotations

from promptrec.generation import SamplingParams

CHUNK = 256  # rows handed to vLLM at once; each chunk is written before the next starts (resumability)


def vllm_batches(model_name: str, tokenizer, params: SamplingParams):
    try:
        from vllm import LLM
        from vllm import SamplingParams as VllmParams
    except ImportError as err:
        raise ImportError("backend=vllm needs the vllm package (pip install vllm) on a CUDA machine") from err
    from promptrec.models import resolve_model_path

    llm = LLM(model=resolve_model_path(model_name), seed=params.seed)
    sampling = VllmParams(n=params.num_return_sequences, max_tokens=params.max_new_tokens,
                          temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
                          seed=params.seed)

    def batches(conversations, desc):
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        for start in range(0, len(prompts), CHUNK):
            outs = llm.generate(prompts[start:start + CHUNK], sampling, use_tqdm=True)
            yield (list(range(start, start + len(outs))),
                   [[o.text.strip() for o in out.outputs] for out in outs])

    return batches
