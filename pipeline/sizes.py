"""Data sizes and steps per ``--size`` preset of the main job. Each value is a default that a pipeline flag of the
same name overrides (``--sft_steps 60``). "small" is the main job on 2 CPU cores; "tiny" is CI's smoke run; "full" is
for a GPU (all triplets, real training lengths)."""

SIZES = {
    "tiny": {"max_triplets": 16, "rewrite_new_tokens": 48, "max_heldout": 6, "mean_prompt_steps": 2,
             "sft_steps": 2, "dpo_steps": 2, "grpo_steps": 1, "reward_steps": 2,
             "policy_samples": 2, "eval_samples": 4, "candidate_triplets": 12, "max_validation": 8},
    "small": {"max_triplets": 120, "rewrite_new_tokens": 96, "max_heldout": 120, "mean_prompt_steps": 8,
              "sft_steps": 40, "dpo_steps": 16, "grpo_steps": 8, "reward_steps": 20,
              "policy_samples": 4, "eval_samples": 16, "candidate_triplets": 64, "max_validation": None},
    "full": {"max_triplets": None, "rewrite_new_tokens": 320, "max_heldout": 1000, "mean_prompt_steps": 16,
             "sft_steps": 1500, "dpo_steps": 600, "grpo_steps": 300, "reward_steps": 300,
             "policy_samples": 6, "eval_samples": 500, "candidate_triplets": None, "max_validation": None},
}
