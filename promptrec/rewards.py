"""Reward functions for online RL on the competition metric, in TRL's reward-function form (``GRPOTrainer``).

TRL calls each reward function once per generation batch as
``f(prompts=, completions=, completion_ids=, **dataset_columns, trainer_state=, log_extra=, log_metric=)`` and
wants one float per completion back. ``completions`` are conversational (each a list holding one assistant message
dict) when the dataset's ``prompt`` is, else plain strings; every other dataset column arrives as a list with one
value per completion (a prompt's value repeated for each of its generations).

* :func:`scs_reward` — the metric itself: the completion is cleaned as inference cleans it
  (:func:`promptrec.postprocess.clean_prediction`) and scored by SCS against the row's ``rewrite_prompt`` with a
  :class:`promptrec.scoring.Scorer`. A completion with nothing usable in it (:func:`promptrec.postprocess.
  unusable_reason`, the rule inference and the candidates step use too: blank, a refusal, an echo of the task, a
  copy of the input, degenerate repetition) gets :data:`UNUSABLE_REWARD` = -1, the lowest SCS there is, so it
  ranks below every real guess. (Inference would submit the mean prompt in its place; rewarding that instead
  would teach the policy that saying nothing is as good as a poor guess.)
* :func:`length_penalty` — optional shaping: 0 up to ``max_words`` words, falling linearly to -1 at twice that.
  Off unless the stage gives it a weight (GRPOConfig ``reward_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from promptrec.postprocess import PostprocessConfig, clean_prediction

UNUSABLE_REWARD = -1.0  # the minimum of SCS: a cosine of -1, cubed


def completion_text(completion) -> str:
    """The text of one completion: a string as is; a conversational completion's assistant contents joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if completion is None:
        return ""
    return "".join(completion_text(message) for message in completion)


def _column(values, n: int, name: str) -> list:
    if values is None:
        raise ValueError(f"the reward needs the dataset column '{name}' (one value per completion)")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column '{name}' has {len(values)} values for {n} completions")
    return values


def scs_reward(scorer, postprocess: PostprocessConfig | None = None, name: str = "scs") -> Callable[..., list[float]]:
    """A TRL reward function: SCS of each cleaned completion against its row's true prompt.

    Columns used: ``rewrite_prompt`` (required, the truth); ``original_text`` and ``rewritten_text`` when present
    (so a verbatim copy of the input counts as unusable, as at inference). ``scorer`` is a
    :class:`promptrec.scoring.Scorer` (its caches make repeated completions and truths free). Returns floats in
    [-1, 1]; unusable completions get :data:`UNUSABLE_REWARD`. The function is named ``name`` (TRL logs
    ``rewards/<name>/mean``), and logs the cleaned text beside each completion (``log_completions``).
    """
    config = postprocess or PostprocessConfig()

    def reward(prompts, completions, completion_ids=None, rewrite_prompt=None, original_text=None,
               rewritten_text=None, log_extra=None, **kwargs) -> list[float]:
        n = len(completions)
        truths = [str(t) for t in _column(rewrite_prompt, n, "rewrite_prompt")]
        if original_text is not None and rewritten_text is not None:
            sources = list(zip(_column(original_text, n, "original_text"), _column(rewritten_text, n,
                                                                                   "rewritten_text")))
        else:
            sources = [()] * n
        cleaned = [clean_prediction(completion_text(c), config, src) for c, src in zip(completions, sources)]
        rewards = [UNUSABLE_REWARD] * n
        usable = [i for i, text in enumerate(cleaned) if text]
        if usable:
            scores = scorer.score([cleaned[i] for i in usable], [truths[i] for i in usable])
            for i, score in zip(usable, scores):
                rewards[i] = float(score)
        if log_extra is not None:
            log_extra("cleaned", cleaned)
        return rewards

    reward.__name__ = reward.__qualname__ = name
    return reward


def length_penalty(max_words: int = 20, name: str = "length") -> Callable[..., list[float]]:
    """A TRL reward function: 0 for a completion of at most ``max_words`` words (whitespace-split, the raw
    completion), falling linearly to -1 at ``2 * max_words`` and staying there. Against rambling and bags of
    keywords: the host's sentence-t5 reads 128 tokens, and a long answer costs generation time."""
    if max_words < 1:
        raise ValueError("max_words must be >= 1")

    def reward(prompts, completions: Sequence, **kwargs) -> list[float]:
        return [-min(1.0, max(0, len(completion_text(c).split()) - max_words) / max_words) for c in completions]

    reward.__name__ = reward.__qualname__ = name
    return reward
