"""Chat templates and the two task formats every stage shares.

* The **rewrite** format: what the generator (Gemma in the competition) is asked. The user turn is
  ``f"{rewrite_prompt}\\n\\n{original_text}"``; under Gemma's template that renders exactly as the host did:
  ``<start_of_turn>user\\n{prompt}\\n\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``.
* The **recovery** format: what the policy model (SFT, DPO, candidate sampling, inference) sees — the original
  and rewritten texts, each cut to a token budget with a visible marker — and the answer it must give: the
  rewrite prompt alone, one sentence.

Texts are user data: a chat control string inside one (``<end_of_turn>``, ``<|im_end|>``…) must stay plain
text. :func:`neutralize_control_strings` puts a zero-width space after its first character, so no tokenizer
reads it as a special token and it cannot end the turn early; printed, the text looks the same.
"""

from __future__ import annotations

ZWSP = "\u200b"
CONTROL_STRINGS = (
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "[INST]", "[/INST]", "<s>", "</s>",
)

# Gemma-7b-it's template (as shipped with the model); set on Gemma tokenizers that lack one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Phi-2 and other base models have no chat template. Phi-2's model card documents the "Instruct: … / Output:"
# QA format; we use it for every template-less model. A system turn, if any, is a plain first paragraph.
INSTRUCT_OUTPUT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Instruct: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Output: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Output:{% endif %}"
)

RECOVERY_INSTRUCTION = (
    "An LLM was given an instruction and an original text, and it rewrote the text. "
    "Recover the instruction: answer with the instruction alone, in one sentence.\n\n"
    "Original text:\n{original}\n\n"
    "Rewritten text:\n{rewritten}"
)
TRUNCATION_MARKER = " [...]"


def ensure_chat_template(tokenizer, model_type: str | None = None) -> None:
    """Give a tokenizer a chat template when it has none: Gemma's for Gemma, Instruct/Output otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE if model_type == "gemma" else INSTRUCT_OUTPUT_TEMPLATE


def neutralize_control_strings(text: str, extra: tuple[str, ...] | list[str] = ()) -> str:
    """Break every chat control string in ``text`` with a zero-width space after its first character."""
    for token in sorted(set(CONTROL_STRINGS) | set(extra), key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + ZWSP + token[1:])
    return text


def special_strings(tokenizer) -> list[str]:
    """The tokenizer's own special tokens (to neutralise on top of :data:`CONTROL_STRINGS`)."""
    if tokenizer is None:
        return []
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return [t for t in tokens if t]


def rewrite_messages(rewrite_prompt: str, original_text: str, tokenizer=None) -> list[dict]:
    """The generator's chat: one user turn ``"{prompt}\\n\\n{text}"``, as the competition host built it."""
    extra = special_strings(tokenizer)
    prompt = neutralize_control_strings(rewrite_prompt, extra)
    text = neutralize_control_strings(original_text, extra)
    return [{"role": "user", "content": f"{prompt}\n\n{text}"}]


def truncate_to_tokens(text: str, max_tokens: int | None, tokenizer=None, marker: str = TRUNCATION_MARKER) -> str:
    """Keep the start of ``text`` within ``max_tokens`` (tokenizer tokens, or words without one) and mark the cut."""
    text = text.strip()
    if not max_tokens or max_tokens <= 0:
        return text
    if tokenizer is None:
        words = text.split()
        return text if len(words) <= max_tokens else " ".join(words[:max_tokens]) + marker
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    cut = enc["offset_mapping"][max_tokens - 1][1]
    return text[:cut].rstrip() + marker


def recovery_messages(original_text: str, rewritten_text: str, tokenizer=None, max_text_tokens: int | None = 256,
                      ) -> list[dict]:
    """The policy model's input: one user turn holding both texts, each cut to ``max_text_tokens``."""
    extra = special_strings(tokenizer)
    original = neutralize_control_strings(truncate_to_tokens(original_text, max_text_tokens, tokenizer), extra)
    rewritten = neutralize_control_strings(truncate_to_tokens(rewritten_text, max_text_tokens, tokenizer), extra)
    return [{"role": "user", "content": RECOVERY_INSTRUCTION.format(original=original, rewritten=rewritten)}]


def recovery_answer(rewrite_prompt: str) -> list[dict]:
    """The answer the policy must give: the prompt alone, as one assistant turn."""
    return [{"role": "assistant", "content": " ".join(str(rewrite_prompt).split())}]


def recovery_example(original_text: str, rewritten_text: str, rewrite_prompt: str, tokenizer=None,
                     max_text_tokens: int | None = 256) -> dict:
    """A TRL conversational prompt/completion row: ``{"prompt": [user], "completion": [assistant]}``."""
    return {
        "prompt": recovery_messages(original_text, rewritten_text, tokenizer, max_text_tokens),
        "completion": recovery_answer(rewrite_prompt),
    }


def preference_example(original_text: str, rewritten_text: str, chosen: str, rejected: str, tokenizer=None,
                       max_text_tokens: int | None = 256) -> dict:
    """A TRL conversational preference row: ``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``."""
    return {
        "prompt": recovery_messages(original_text, rewritten_text, tokenizer, max_text_tokens),
        "chosen": recovery_answer(chosen),
        "rejected": recovery_answer(rejected),
    }
