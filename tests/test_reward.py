"""The metric, the cached scorer and reward/evaluate.py (reward/ stage)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stage_helpers import recipe_mismatches

from promptrec import scoring
from promptrec.cli import parse_args
from promptrec.evaluation import align_predictions, bootstrap_ci, summarise
from promptrec.models import ModelNotFoundError
from promptrec.scoring import Scorer, ScorerArguments, scs
from promptrec.tables import DataError

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import reward/<name>.py as a module (stage folders are scripts, not packages)."""
    spec = importlib.util.spec_from_file_location(f"reward_{name}", REPO / "reward" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def minilm() -> Scorer:
    return Scorer("embedded")


# ── the metric ──

def test_scs_matches_the_competition_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    cos = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    np.testing.assert_allclose(scs(a, b), cos**3)  # the cube keeps the sign
    np.testing.assert_allclose(scs(a, b, exponent=2.0), np.sign(cos) * cos**2)
    np.testing.assert_allclose(scs(a, a), 1.0)
    np.testing.assert_allclose(scs(a, -a), -1.0)
    assert scs(np.zeros((1, 8)), b[:1])[0] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        scs(a, b[:4])


def test_scorer_self_is_one_and_related_beats_unrelated(minilm):
    truth = "Rewrite this text as a poem."
    related = ["Turn this text into a poem.", "Make this a short poem."]
    unrelated = ["Convert the recipe into a shopping list.", "Translate the email into formal legal language."]
    np.testing.assert_allclose(minilm.score([truth], [truth]), [1.0], atol=1e-5)
    s_rel = minilm.score(related, [truth] * 2)
    s_unrel = minilm.score(unrelated, [truth] * 2)
    assert s_rel.min() > s_unrel.max()
    assert minilm.identity == {"model": scoring.EMBEDDED_SCORER_NAME, "exponent": 3.0}


# ── the cache ──

def test_cache_gives_direct_vectors_and_embeds_each_string_once():
    scorer = Scorer("embedded")
    texts = ["Make it formal.", "Write it as a haiku.", "Make it formal.", "Summarise it."]
    vectors = scorer.encode(texts)
    direct = scorer.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors.dtype == np.float32 and scorer.n_embedded == 3

    bank = ["Make it formal.", "Write it as a haiku.", "Turn it into a limerick."]  # negatives repeat across rows
    out = scorer.score_candidates([bank + ["A row-specific guess."], bank, bank[:1]], ["Summarise it."] * 3)
    assert [len(o) for o in out] == [4, 3, 1]
    assert scorer.n_embedded == 5  # only the limerick and the row-specific guess were new
    np.testing.assert_allclose(out[1], scorer.score(bank, ["Summarise it."] * 3))
    assert out[2][0] == pytest.approx(out[0][0])


def test_disk_cache_carries_vectors_across_scorers(tmp_path):
    texts = ["Rewrite as a tweet.", "Rewrite as a sonnet."]
    first = Scorer("embedded", cache_dir=str(tmp_path))
    vectors = first.encode(texts)
    second = Scorer("embedded", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(second.encode(texts), vectors)
    assert second.n_embedded == 0
    second.encode(["A throw-away candidate."], cache=False)
    third = Scorer("embedded", cache_dir=str(tmp_path))
    third.encode(["A throw-away candidate."])
    assert third.n_embedded == 1  # cache=False stored nothing


_KILLED_IN_ENCODE = """
import os, signal, sys
from promptrec.scoring import Scorer

scorer = Scorer("embedded", batch_size=2, cache_dir=sys.argv[1])
embed, calls = scorer._embed, []

def embed_then_die(texts):
    calls.append(texts)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the 2nd embedding batch, as a killed job dies
    return embed(texts)

scorer._embed = embed_then_die
scorer.encode(sys.argv[2:])
"""


def test_disk_cache_keeps_the_batches_finished_before_a_kill(tmp_path):
    texts = ["Rewrite this as a long, winding epic poem.", "Make it a sonnet please.", "As a tweet.", "Haiku."]
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_ENCODE, str(tmp_path), *texts], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = Scorer("embedded", cache_dir=str(tmp_path))
    after.encode(texts[:2])  # the first batch (longest first): committed before the kill
    assert after.n_embedded == 0
    after.encode(texts[2:])  # the batch being embedded when it died: not there
    assert after.n_embedded == 2


def test_auto_falls_back_to_embedded_with_a_warning(monkeypatch, caplog):
    def unreachable(name):
        raise ModelNotFoundError(f"{name} unreachable")

    monkeypatch.setattr(scoring, "resolve_model_path", unreachable)
    with caplog.at_level(logging.WARNING, logger="promptrec.scoring"):
        scorer = Scorer("auto")
    assert scorer.identity["model"] == scoring.EMBEDDED_SCORER_NAME
    assert "sentence-t5-base" in caplog.text and "NOT comparable" in caplog.text


def test_unknown_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Scorer model 'no-such-org/no-such-model'.*'embedded'"):
        Scorer("no-such-org/no-such-model")


# ── evaluation ──

def _truth(n=6):
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "category": ["a", "b"] * (n // 2),
                         "rewrite_prompt": [f"Prompt number {i}." for i in range(n)]})


def test_align_accepts_any_order_and_keeps_the_truths():
    truth = _truth()
    preds = truth[["id", "rewrite_prompt"]].iloc[::-1].assign(rewrite_prompt=lambda d: "guess " + d["id"])
    rows = align_predictions(preds, truth)
    assert rows["id"].tolist() == truth["id"].tolist()
    assert rows["prediction"].tolist() == [f"guess r{i}" for i in range(6)]
    assert rows["truth"].tolist() == truth["rewrite_prompt"].tolist()
    assert rows["category"].tolist() == truth["category"].tolist() and not rows["blank"].any()


@pytest.mark.parametrize("mutate, message", [
    (lambda p: pd.concat([p, p.iloc[[2]]]), "duplicate id.*'r2'"),
    (lambda p: p.assign(id=p["id"].replace({"r1": "x9", "r4": "x7"})), "2 id.*not in truth: 'x9', 'x7'"),
    (lambda p: p.iloc[1:], "no prediction for 1 id.*'r0'"),
    (lambda p: p.assign(rewrite_prompt=p["rewrite_prompt"].where(p["id"] != "r3", "  ")), "blank for 1 id.*'r3'"),
    (lambda p: p.assign(rewrite_prompt=p["rewrite_prompt"].where(p["id"] != "r5", None)), "blank for 1 id.*'r5'"),
])
def test_align_rejects_bad_submissions(mutate, message):
    truth = _truth()
    with pytest.raises(DataError, match=message):
        align_predictions(mutate(truth[["id", "rewrite_prompt"]]), truth, truth_name="truth")


def test_allow_blank_counts_blanks_and_missing_rows():
    truth = _truth()
    preds = truth[["id", "rewrite_prompt"]].iloc[1:].copy()
    preds.loc[preds["id"] == "r3", "rewrite_prompt"] = ""
    rows = align_predictions(preds, truth, allow_blank=True)
    assert rows["blank"].tolist() == [True, False, False, True, False, False]
    assert rows.loc[rows["blank"], "prediction"].tolist() == ["", ""]


def test_cluster_bootstrap_is_wider_when_rows_of_a_cluster_move_together():
    """400 rows in 40 clusters whose rows share one value: the rows carry 40 observations' worth of evidence, and
    resampling clusters must say so (a row bootstrap would claim 10× the evidence)."""
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 10)
    values = rng.uniform(0, 1, 40)[groups]
    rows = bootstrap_ci(values, n_resamples=500, seed=3)
    clusters = bootstrap_ci(values, n_resamples=500, seed=3, groups=groups)
    assert clusters[0] < values.mean() < clusters[1]
    assert clusters[1] - clusters[0] > 2 * (rows[1] - rows[0])
    # one row per group: the same evidence as rows, so about the same width
    single = bootstrap_ci(values[::10], n_resamples=2000, seed=3, groups=np.arange(40))
    plain = bootstrap_ci(values[::10], n_resamples=2000, seed=3)
    assert abs((single[1] - single[0]) - (plain[1] - plain[0])) < 0.03


def test_bootstrap_interval_and_summary():
    values = np.random.default_rng(1).uniform(0, 1, 400)
    low, high = bootstrap_ci(values, n_resamples=500, seed=3)
    assert low < values.mean() < high and high - low < 0.15
    assert bootstrap_ci(values, n_resamples=500, seed=3) == (low, high)
    wide = bootstrap_ci(values[:20], n_resamples=500, seed=3)
    assert wide[1] - wide[0] > high - low
    rows = align_predictions(_truth()[["id", "rewrite_prompt"]], _truth())
    report = summarise(rows, np.array([1.0, 0.0, 0.5, 0.0, 0.3, 0.0]), {"model": "m", "exponent": 3.0})
    assert report["mean_scs"] == pytest.approx(0.3)
    assert report["per_category"] == {"a": {"n": 3, "mean_scs": pytest.approx(0.6)}, "b": {"n": 3, "mean_scs": 0.0}}
    assert report["scorer"] == {"model": "m", "exponent": 3.0}


def test_evaluate_writes_report_and_plot(tmp_path):
    truth = _truth(8).assign(rewrite_prompt=["Rewrite this as a poem.", "Make it formal.", "Explain it to a child.",
                                             "Turn it into a tweet.", "Write it as a pirate.", "Summarise it.",
                                             "Make it funny.", "Rewrite it as a news headline."])
    preds = truth[["id", "rewrite_prompt"]].sample(frac=1, random_state=0)
    preds.loc[preds["id"] == "r1", "rewrite_prompt"] = "Write a recipe for bread."
    truth.to_csv(tmp_path / "truth.csv", index=False)
    preds.to_csv(tmp_path / "sub.csv", index=False)
    evaluate = load_script("evaluate")
    args, scorer_args = parse_args(evaluate.EvaluateArguments, ScorerArguments, args=[
        "--predictions", str(tmp_path / "sub.csv"), "--truth", str(tmp_path / "truth.csv"),
        "--output_dir", str(tmp_path / "out"), "--scorer", "embedded", "--n_resamples", "200"])
    report = evaluate.main(args, scorer_args)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "scs_hist.png", "scores.csv",
                                                "run_config.json"}
    scores = pd.read_csv(out / "scores.csv").set_index("id")["scs"]
    assert scores.drop("r1").to_numpy() == pytest.approx(1.0, abs=1e-5) and scores["r1"] < 0.5
    assert json.loads((out / "report.json").read_text())["mean_scs"] == pytest.approx(scores.mean())
    assert report["ci"]["low"] <= report["mean_scs"] <= report["ci"]["high"]
    assert set(report["per_category"]) == {"a", "b"}
    assert report["scorer"]["model"] == scoring.EMBEDDED_SCORER_NAME
    assert "| mean SCS |" in (out / "report.md").read_text()
    assert (out / "scs_hist.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_cli_gives_a_one_line_error(tmp_path):
    _truth().to_csv(tmp_path / "truth.csv", index=False)
    pd.concat([_truth(), _truth().iloc[[0]]])[["id", "rewrite_prompt"]].to_csv(tmp_path / "sub.csv", index=False)
    proc = subprocess.run([sys.executable, "reward/evaluate.py", "--predictions", str(tmp_path / "sub.csv"),
                           "--truth", str(tmp_path / "truth.csv"), "--output_dir", str(tmp_path / "out")],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'sub.csv'}: duplicate id(s) 'r0'")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


# ── recipes and README ──

def test_readme_commands_and_recipes_parse():
    """Every `python reward/<script>.py ...` line of reward/README.md, and every recipe, parses with its parser."""
    scripts = {name: load_script(name) for name in ("evaluate", "mean_prompt")}
    dataclass_of = {"evaluate": "EvaluateArguments", "mean_prompt": "MeanPromptArguments"}
    commands = [shlex.split(line.strip().split("python ", 1)[1])
                for line in (REPO / "reward" / "README.md").read_text().splitlines()
                if line.strip().startswith("python reward/") or line.strip().startswith(".venv/bin/python reward/")]
    # reward/train_rm.py's commands and rm_*.yaml recipes parse with TRL's parser: test_training.py
    commands = [argv for argv in commands if argv[0].removeprefix("reward/").removesuffix(".py") in scripts]
    assert len(commands) >= 3
    for argv in commands:
        name = argv[0].removeprefix("reward/").removesuffix(".py")
        parse_args(getattr(scripts[name], dataclass_of[name]), ScorerArguments, args=argv[1:])
    for recipe in (p for p in (REPO / "reward" / "configs").glob("*.yaml") if not p.name.startswith("rm_")):
        name = "evaluate" if recipe.stem.startswith("evaluate") else "mean_prompt"
        parsed = parse_args(getattr(scripts[name], dataclass_of[name]), ScorerArguments,
                            args=["--config", str(recipe)])
        assert recipe_mismatches(recipe, *parsed) == {}  # every value arrives as written
