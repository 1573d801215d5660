"""The main job's arguments: one dataclass, parsed from ``--config pipeline/configs/<model>.yaml`` plus flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from sizes import SIZES  # pipeline/sizes.py, beside this script

STAGES = ("rewrite", "split", "mean_prompt", "sft", "candidates", "pairs", "reward", "dpo", "iterate", "control",
          "grpo", "predict", "report")


@dataclass
class PipelineArguments:
    run_dir: str = field(default="checkpoints/pipeline/smollm2", metadata={"help": "Where every stage writes."})
    size: str = field(default="small", metadata={"help": f"Preset of data sizes and steps: {', '.join(SIZES)}."})
    triplets: str | None = field(default=None, metadata={
        "help": "Triplets to train on instead of generating rewrites: 'reference' (the bundled reference rewrites) "
                "or a file, e.g. ../shared/data/triplets.csv."})
    generate: bool = field(default=False, metadata={
        "help": "Generate rewrites with the rewrite recipe and --generator even when triplets is set."})
    generator: str = field(default="embedded", metadata={"help": "Rewrite generator (e.g. google/gemma-7b-it)."})
    producers: list[str] = field(default_factory=list, metadata={
        "help": "With --triplets: keep rows whose 'producer' starts with one of these (e.g. 'gemma')."})
    model: str = field(default="embedded", metadata={"help": "Base policy model: hub id, local dir or 'embedded'."})
    scorer: str = field(default="embedded", metadata={"help": "SCS scorer for pairs and the report: auto, embedded…"})
    rewrite_recipe: str = field(default="data_generation/configs/smollm2.yaml", metadata={"help": "Rewrite recipe."})
    sft_recipe: str = field(default="sft/configs/smollm2.yaml", metadata={"help": "SFT recipe."})
    candidates_recipe: str = field(default="data_generation/configs/candidates_smollm2.yaml", metadata={
        "help": "Candidates recipe."})
    pairs_recipe: str = field(default="data_generation/configs/pairs_smollm2.yaml", metadata={"help": "Pairs recipe."})
    dpo_recipe: str = field(default="dpo/configs/smollm2.yaml", metadata={"help": "DPO recipe."})
    grpo_recipe: str | None = field(default=None, metadata={
        "help": "GRPO recipe (online RL on the SCS reward from the SFT adapter, dpo/grpo.py); unset: the stage is "
                "skipped (on 2 CPU cores a GRPO step takes minutes)."})
    dpo_rounds: int = field(default=1, metadata={
        "help": "Rounds of on-policy DPO. Round 1 is the dpo stage (from SFT); each further round (the iterate stage) "
                "samples the previous round's adapter on fresh train triplets, pairs its samples by SCS against the "
                "truth and trains DPO from that adapter (its reference)."})
    dpo_reference: str = field(default="start", metadata={
        "help": "Reference of DPO rounds 2..: 'start' (a frozen copy of the adapter the round starts from, TRL's "
                "default) or 'sft' (the SFT adapter, so drift does not compound over rounds)."})
    control: bool = field(default=False, metadata={
        "help": "Also train the compute-matched control 'SFT, continued': the SFT adapter trained further on train "
                "rows the DPO rounds did not sample, for the DPO stages' wall time, its checkpoints chosen on "
                "validation like DPO's (docs/po_selection.md). Doubles the time of the PO part of the job."})
    control_seconds: float | None = field(default=None, metadata={
        "help": "Train the control this many seconds instead of the DPO stages' recorded wall time (smoke tests)."})
    mbr_candidates: int = field(default=0, metadata={
        "help": "N > 0: the predict stage also decodes the last DPO adapter (the iterate stage's, else dpo's) by MBR "
                "over N samples, its greedy answer and the mean prompt (inference/predict.py --selection mbr)."})
    reward_recipe: str | None = field(default=None, metadata={
        "help": "Reward-model recipe (reward/train_rm.py, e.g. reward/configs/rm_smollm2.yaml); unset: no reward "
                "stage. The reward stage pairs round 1's SCS-scored candidates without the true prompt "
                "(--reward_pairs_recipe) and trains a reward model on them; the predict stage then adds the rows RM "
                "rerank, RM + MBR and oracle, all on the MBR row's N samples (needs --mbr_candidates N; the MBR "
                "weight of RM + MBR is chosen on validation rows: docs/reward_model.md)."})
    reward_pairs_recipe: str = field(default="data_generation/configs/pairs_rm_smollm2.yaml", metadata={
        "help": "Pairs recipe of the reward model's pairs (build_pairs.py; the true prompt never chosen)."})
    max_text_tokens: int = field(default=100, metadata={"help": "Token budget of each text in the recovery prompt."})
    heldout_fraction: float = field(default=0.2, metadata={"help": "Share of prompts held out for the report."})
    validation_fraction: float = field(default=0.2, metadata={
        "help": "Share of the remaining (non-held-out) prompt groups kept as validation: each DPO round's checkpoint "
                "and interpolation is chosen on these rows, never on the held-out ones (docs/po_selection.md)."})
    select_alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75], metadata={
        "help": "Interpolations (1-α)·ΔW_SFT + α·ΔW_DPO scored on validation after each DPO round; none: no "
                "interpolation."})
    select_checkpoints: int = field(default=4, metadata={
        "help": "Checkpoints of each DPO round scored on validation, evenly spaced, the last being the round's "
                "adapter: 4 (every quarter), 2 (half-way and the end) or 1 (the end only)."})
    split_by: str = field(default="cluster", metadata={
        "help": "Held-out groups: 'cluster' (near-duplicate prompts by scorer embedding stay together) or 'prompt'."})
    cluster_threshold: float = field(default=0.8, metadata={
        "help": "split_by cluster: prompts with scorer cosine >= this (transitively) are one group."})
    max_triplets: int | None = field(default=None, metadata={"help": "Override the size's number of triplets."})
    sft_steps: int | None = field(default=None, metadata={"help": "Override the size's SFT steps."})
    dpo_steps: int | None = field(default=None, metadata={"help": "Override the size's DPO steps."})
    grpo_steps: int | None = field(default=None, metadata={"help": "Override the size's GRPO steps."})
    reward_steps: int | None = field(default=None, metadata={"help": "Override the size's reward-model steps."})
    max_heldout: int | None = field(default=None, metadata={"help": "Override the size's held-out rows scored."})
    max_validation: int | None = field(default=None, metadata={
        "help": "Override the size's cap on validation rows scored per candidate (None: every validation row)."})
    candidate_triplets: int | None = field(default=None, metadata={
        "help": "Override the size's number of train triplets that get candidates (and so DPO pairs)."})
    bf16: str = field(default="auto", metadata={
        "help": "bf16 autocast for SFT, DPO and GRPO: true, false, or auto (on when training on a CPU with bf16 "
                "instructions, faster there; otherwise the recipe decides). A bf16 base on top gave only 1.05-1.11x "
                "and is not used (bench/README.md)."})
    extra: list[str] = field(default_factory=list, metadata={
        "help": "Per-stage overrides 'stage:--key value…', e.g. dpo:--beta=0.2 'dpo:--loss_type ipo hinge'; the "
                "reward stage's pairs take 'reward_pairs:…', its trainer 'reward:…'."})
    force: list[str] = field(default_factory=list, metadata={
        "help": f"Stages to redo from scratch although their settings and inputs did not change (a stage whose "
                f"settings or inputs changed re-runs by itself, and so does every stage that reads its output): any "
                f"of {', '.join(STAGES)}, or all."})
    until: str = field(default="report", metadata={"help": "Stop after this stage (e.g. sft), leaving the rest."})
    dry_run: bool = field(default=False, metadata={
        "help": "Print which stages would run and why (changed settings or inputs), run nothing."})
    seed: int = field(default=42, metadata={"help": "Seed passed to every stage."})

    def __post_init__(self):
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16 must be auto, true or false, not {self.bf16!r}")
        if self.select_checkpoints < 1:
            raise ValueError(f"select_checkpoints must be >= 1, not {self.select_checkpoints}")
        if self.dpo_reference not in ("start", "sft"):
            raise ValueError(f"dpo_reference must be start or sft, not {self.dpo_reference!r}")
        if self.split_by not in ("cluster", "prompt"):
            raise ValueError(f"split_by must be cluster or prompt, not {self.split_by!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, not {self.size!r}")
        unknown = set(self.force) - set(STAGES) - {"all"}
        if unknown:
            raise ValueError(f"unknown stage(s) in --force: {sorted(unknown)}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), not {self.validation_fraction}")
        if self.dpo_rounds < 1 or self.mbr_candidates < 0:
            raise ValueError("dpo_rounds must be >= 1 and mbr_candidates >= 0")
        if self.reward_recipe and not self.mbr_candidates:
            raise ValueError("reward_recipe needs mbr_candidates > 0: the reward model reranks the MBR row's samples")
        if self.until not in STAGES:
            raise ValueError(f"until must be one of {', '.join(STAGES)}, not {self.until!r}")

    def training_cli(self) -> list[str]:
        """Overrides every trainer gets: the CPU when there is no GPU (GPU recipes included: TrainingArguments
        refuses bf16 without one), and --bf16 (none on auto with a GPU: the recipe's own setting)."""
        import torch

        from promptrec.models import cpu_has_bf16

        device = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
        if self.bf16 == "auto":
            return device + ["--bf16", str(cpu_has_bf16()).lower()] if device else []
        return device + ["--bf16", self.bf16]

    def knob(self, name: str):
        override = getattr(self, name, None)
        return override if override is not None else SIZES[self.size][name]
