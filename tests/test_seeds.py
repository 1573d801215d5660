"""pipeline/seeds.py: differences to SFT per run and across runs of the main job that differ only in their seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))

from seeds import SeedArguments, compare, markdown, parse_known, run_scores, t_interval  # noqa: E402

from promptrec.tables import DataError  # noqa: E402

TRUTH = ["Make it a poem.", "Make it formal.", "Make it a poem.", "Turn it into a tweet."]
CLUSTERS = [0, 1, 0, 2]


class ExactScorer:
    """1 for a prediction equal to the truth, else 0: differences are counts a reader can check by hand."""

    def score(self, predictions, truths):
        return np.array([float(p == t) for p, t in zip(predictions, truths)])


def make_run(root: Path, name: str, sft: list[str], dpo: list[str], ids=("a", "b", "c", "d")) -> str:
    """A run folder as pipeline/run.py leaves it, as far as the comparison reads it."""
    run = root / name
    (run / "split").mkdir(parents=True)
    (run / "predict").mkdir()
    pd.DataFrame({"id": list(ids), "rewrite_prompt": TRUTH, "prompt_cluster": CLUSTERS}).to_parquet(
        run / "split" / "heldout.parquet")
    for method, preds in (("base", ["x"] * 4), ("sft", sft), ("dpo", dpo)):
        pd.DataFrame({"id": list(ids), "rewrite_prompt": preds}).to_csv(run / "predict" / f"{method}.csv", index=False)
    return str(run)


def test_t_interval_matches_the_textbook_value():
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, se 1/sqrt(3), t(0.975, 2) = 4.3027
    assert mean == 2.0 and low == pytest.approx(2 - 4.3027 / 3 ** 0.5, abs=1e-3)
    assert high == pytest.approx(2 + 4.3027 / 3 ** 0.5, abs=1e-3)
    assert np.isnan(t_interval([0.5])[1])


def test_parse_known_reads_numbers_and_rejects_garbage():
    assert parse_known("42: dpo=-0.0129, iterate=+0.0296") == ("42", {"dpo": -0.0129, "iterate": 0.0296})
    for bad in ("42 dpo=0.1", "42: dpo", "42: dpo=high", ": dpo=0.1"):
        with pytest.raises(DataError, match="--known"):
            parse_known(bad)


def test_compare_gives_each_runs_gain_and_their_mean(tmp_path):
    sft = ["Make it a poem.", "no", "no", "no"]  # 1 of 4 right
    run1 = make_run(tmp_path, "s1", sft, ["Make it a poem.", "Make it formal.", "no", "no"])  # +1 row: +0.25
    run2 = make_run(tmp_path, "s2", sft, ["no", "no", "no", "no"])  # −1 row: −0.25
    args = SeedArguments(runs=[run1, run2], methods=["dpo", "grpo"], known=["42: dpo=0.5"])
    per_run, groups = run_scores(args.runs, ExactScorer(), args.methods)
    assert list(groups) == CLUSTERS and "constant" not in str(set(per_run[0]))  # baselines are not scored
    (result,) = compare(args, per_run, groups)  # no run has GRPO: no row for it
    assert [r["run"] for r in result["runs"]] == ["s1", "s2", "42"]
    assert [r["diff"] for r in result["runs"]] == pytest.approx([0.25, -0.25, 0.5])
    assert result["runs"][2]["low"] is None  # a known run brings no row-level interval
    assert result["across_runs"]["mean"] == pytest.approx(0.5 / 3)
    assert result["across_runs"]["low"] < 0 < result["across_runs"]["high"]
    assert result["row_average"]["n_runs"] == 2 and result["row_average"]["mean"] == pytest.approx(0.0)
    assert result["across_runs"]["sd"] == pytest.approx(np.std([0.25, -0.25, 0.5], ddof=1))


def test_each_runs_opening_word_drift_comes_from_its_report(tmp_path):
    sft = ["no"] * 4
    run1 = make_run(tmp_path, "s1", sft, ["Make it a poem.", "no", "no", "no"])
    run2 = make_run(tmp_path, "s2", sft, ["no"] * 4)  # no report.json: no drift to show
    drift = {"n": 4, "top_word": "make", "top_share": 0.75, "entropy_nats": 0.5, "top5": {"make": 0.75},
             "reference": {"n": 4, "top_word": "no", "top_share": 0.25, "entropy_nats": 1.0},
             "reference_share_of_top_word": 0.0, "doubled": True}
    (Path(run1) / "report.json").write_text(json.dumps({"rows": [{"id": "sft"}, {"id": "dpo", "drift": drift}]}))
    args = SeedArguments(runs=[run1, run2], methods=["dpo"])
    (result,) = compare(args, *run_scores(args.runs, ExactScorer(), args.methods))
    assert result["runs"][0]["drift"] == {"top_word": "make", "top_share": 0.75, "sft_top_share": 0.25,
                                          "doubled": True}
    assert result["runs"][1]["drift"] is None
    table = markdown([result])
    assert "'make' 75% (SFT's top word 25%) **doubled**" in table and ", SD 0.1768" in table


def test_compare_against_another_baseline_such_as_the_compute_matched_control(tmp_path):
    sft = ["no"] * 4
    run1 = make_run(tmp_path, "s1", sft, ["Make it a poem.", "Make it formal.", "no", "no"])
    run2 = make_run(tmp_path, "s2", sft, ["Make it a poem.", "no", "no", "no"])
    args = SeedArguments(runs=[run1, run2], methods=["dpo"], baseline="base")  # base predicts "x": 0 everywhere
    per_run, groups = run_scores(args.runs, ExactScorer(), args.methods, args.baseline)
    assert set(per_run[0]) == {"base", "dpo"}
    (result,) = compare(args, per_run, groups)
    assert result["baseline"] == "base" and [r["diff"] for r in result["runs"]] == pytest.approx([0.5, 0.25])


def test_a_known_run_joins_a_non_sft_baseline_and_each_run_says_where_it_ran(tmp_path):
    """A run whose folder is gone enters as its paired difference to the --baseline row; a run's report.json
    environment (bf16 instructions, training dtype) is shown beside its row, since seeds can come from machines
    whose SFT adapters differ."""
    sft = ["no"] * 4
    run1 = make_run(tmp_path, "s1", sft, ["Make it a poem.", "no", "no", "no"])
    run2 = make_run(tmp_path, "s2", sft, ["no"] * 4)
    env = {"cpu": "AMD EPYC", "cpu_bf16": False, "training_dtype": "float32"}
    (Path(run1) / "report.json").write_text(json.dumps({"rows": [], "environment": env}))
    args = SeedArguments(runs=[run1, run2], methods=["dpo"], baseline="base", known=["1: dpo=-0.0165"])
    (result,) = compare(args, *run_scores(args.runs, ExactScorer(), args.methods, args.baseline))
    assert [r["diff"] for r in result["runs"]] == pytest.approx([0.25, 0.0, -0.0165])
    assert [r.get("ran_on") for r in result["runs"]] == ["bf16 CPU: no, training float32", None, None]
    table = markdown([result])
    assert "| dpo | s1 | +0.2500 (" in table and "| bf16 CPU: no, training float32 |" in table


def test_runs_of_another_split_are_refused(tmp_path):
    same = ["no"] * 4
    run1 = make_run(tmp_path, "s1", same, same)
    run2 = make_run(tmp_path, "s2", same, same, ids=("a", "b", "c", "e"))
    with pytest.raises(DataError, match="s2: its held-out rows differ"):
        run_scores([run1, run2], ExactScorer())
