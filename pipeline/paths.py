"""Every path of a main-job run folder, named once: pipeline/stages.py writes them, comparison.py and seeds.py read."""

from __future__ import annotations

from pathlib import Path

from promptrec.run_config import RUN_CONFIG, SPLIT_ROWS

# What a stage reads of an adapter run folder: the weights, their PEFT config, the run's contract and the SFT
# run's train/eval rows that DPO and GRPO carry on.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", RUN_CONFIG, SPLIT_ROWS)


class RunPaths:
    def __init__(self, root: str | Path):
        r = self.root = Path(root)
        self.history = r / "invocations.jsonl"  # every invocation, appended (never rewritten): its arguments and the
        # stages it ran or skipped; each stage's own settings are in its stage.json
        self.timings = r / "timings.json"
        self.triplets = r / "rewrite" / "triplets.parquet"
        self.train, self.heldout = r / "split" / "train.parquet", r / "split" / "heldout.parquet"
        self.validation = r / "split" / "validation.parquet"  # choices of the PO stages are made here (issue 23)
        self.test_csv, self.truth_csv = r / "split" / "test.csv", r / "split" / "truth.csv"
        self.mean_prompt = r / "mean_prompt" / "mean_prompt.json"
        self.sft, self.candidates, self.pairs, self.dpo, self.grpo = (r / s for s in
                                                                     ("sft", "candidates", "pairs", "dpo", "grpo"))
        self.reward = r / "reward"  # the reward model's pairs (reward/pairs) and its run (reward/model)
        self.reward_pairs, self.reward_model = self.reward / "pairs", self.reward / "model"
        self.control = r / "control"  # "SFT, continued": the compute-matched control of the DPO stages
        self.predict = r / "predict"
        self.predict_cache = r / "predict_cache"  # greedy answers by adapter digest, rows and settings: kept when
        # the predict stage re-runs, so an unchanged row (base, SFT) is not decoded again (promptrec/prediction_cache)
        self.predicted_rows = r / "predict" / "rows.json"  # what the predict stage decoded, per report row id
        self.rerank = r / "predict" / "rerank.json"  # the reward rows' choices on validation (docs/reward_model.md)
        self.report_md, self.report_json = r / "report.md", r / "report.json"

    def stage(self, name: str) -> Path:
        return self.root / name

    def round(self, r: int) -> Path:
        """Round ``r`` >= 2 of on-policy DPO (the iterate stage); round 1 is the dpo stage."""
        return self.root / "iterate" / f"round{r}"

    @staticmethod
    def selected(po_run: Path) -> Path:
        """What a DPO round ships: the adapter its select step chose on validation (dpo/select_adapter.py)."""
        return Path(po_run) / "selected"

    def last_dpo(self, rounds: int) -> Path:
        """What the last DPO round shipped: the iterate stage's last round's pick, or the dpo stage's."""
        return self.selected(self.round(rounds) / "dpo" if rounds > 1 else self.dpo)

    def prediction(self, row: str, side: str = "test") -> Path:
        """Row ``row``'s submission on the test rows, or (``side`` "validation") on the validation rows."""
        return self.predict / f"{row}.csv" if side == "test" else self.predict / side / f"{row}.csv"

    def raw_prediction(self, row: str, side: str = "test") -> Path:
        """The raw output (candidates and their scores) beside :meth:`prediction`."""
        return self.prediction(row, side).with_suffix(".raw.parquet")
