"""The fast CPU generation path: the dtype chooser, the KV cache choice, and bf16 vs fp32 on the same rows."""

from __future__ import annotations

import pytest
import torch

from promptrec.generation import RowSampler, SamplingParams, generate
from promptrec.models import generation_dtype, load_model, parse_dtype
from promptrec.templates import recovery_messages

BF16_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AMX_CPU = "flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n"
OLD_CPU = "flags\t\t: fpu sse2 avx2 avx512f\n"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule applies without CUDA")


@no_cuda
def test_auto_bf16_picks_bf16_only_on_a_cpu_with_bf16_instructions():
    assert generation_dtype("auto_bf16", BF16_CPU) == torch.bfloat16
    assert generation_dtype("auto_bf16", AMX_CPU) == torch.bfloat16
    assert generation_dtype("auto_bf16", OLD_CPU) == torch.float32
    assert generation_dtype("auto_bf16", "") == torch.float32


@no_cuda
def test_auto_stays_fp32_on_the_cpu_and_a_forced_dtype_wins():
    """bf16 failed the quality-parity rule (docs/fast_cpu_path.md), so ``auto`` keeps fp32 even on a bf16 CPU."""
    assert generation_dtype("auto", BF16_CPU) == generation_dtype(None, AMX_CPU) == torch.float32
    assert generation_dtype("float32", BF16_CPU) == generation_dtype("fp32", BF16_CPU) == torch.float32
    assert generation_dtype("bfloat16", OLD_CPU) == torch.bfloat16
    assert parse_dtype("auto") == torch.float32


def test_static_kv_cache_on_the_cpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert SamplingParams().generate_kwargs(cpu)["cache_implementation"] == "static"
    assert "cache_implementation" not in SamplingParams().generate_kwargs(gpu)
    assert "cache_implementation" not in SamplingParams(kv_cache="dynamic").generate_kwargs(cpu)
    assert SamplingParams(kv_cache="static").generate_kwargs(gpu)["cache_implementation"] == "static"


def test_bf16_and_fp32_generate_valid_answers_for_the_same_rows(tiny_triplets, embedded_model, embedded_tokenizer):
    """Both dtypes, static and dynamic caches, greedy and sampled: one non-empty answer (or N samples) per row, in
    input order; the bf16 model really is bf16. Greedy fp32 answers do not depend on the cache or the batch size."""
    rows = tiny_triplets.head(6)
    convs = [recovery_messages(r.original_text, r.rewritten_text, embedded_tokenizer, 48) for r in rows.itertuples()]
    greedy = SamplingParams(max_new_tokens=12)
    fp32_static = generate(embedded_model, embedded_tokenizer, convs, greedy, batch_size=4, progress=False)
    fp32_dynamic = generate(embedded_model, embedded_tokenizer, convs, SamplingParams(max_new_tokens=12,
                            kv_cache="dynamic"), batch_size=1, progress=False)
    bf16_model = load_model("embedded", dtype=generation_dtype("bfloat16")).eval()
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    bf16 = generate(bf16_model, embedded_tokenizer, convs, greedy, batch_size=4, progress=False)
    sampled = generate(bf16_model, embedded_tokenizer, convs, SamplingParams(max_new_tokens=12, temperature=1.0,
                       num_return_sequences=3, seed=1), batch_size=4, progress=False)
    for outputs in (fp32_static, fp32_dynamic, bf16):
        assert len(outputs) == len(convs) and all(len(o) == 1 and o[0].strip() for o in outputs)
    assert fp32_static == fp32_dynamic
    assert len(sampled) == len(convs) and all(len(o) == 3 for o in sampled)


def test_row_sampler_draws_from_the_softmax_with_one_stream_per_row():
    """Gumbel-max over fixed scores: frequencies match softmax(scores); the same seed draws the same token."""
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    scores = probs.log().expand(4000, 4)
    picks = RowSampler(range(4000))(None, scores.clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4) / len(picks)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    again = RowSampler([7, 7, 8])(None, scores[:3].clone()).argmax(-1)
    assert again[0] == again[1] == RowSampler([7])(None, scores[:1].clone()).argmax(-1)[0]


def test_sampled_rows_do_not_depend_on_their_batch(tiny_triplets, embedded_model, embedded_tokenizer):
    """A row samples the same texts alone, in a batch, or with other rows first (resumed and sharded runs rely on
    it), and another seed samples others."""
    convs = [recovery_messages(r.original_text, r.rewritten_text, embedded_tokenizer, 16)
             for r in tiny_triplets.head(3).itertuples()]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, num_return_sequences=2, seed=3)
    batched = generate(embedded_model, embedded_tokenizer, convs, params, batch_size=3, progress=False)
    alone = [generate(embedded_model, embedded_tokenizer, [c], params, batch_size=1, progress=False)[0]
             for c in convs]
    assert batched == alone and all(len(o) == 2 for o in batched)
    params.seed = 4
    assert generate(embedded_model, embedded_tokenizer, convs, params, batch_size=3, progress=False) != batched
