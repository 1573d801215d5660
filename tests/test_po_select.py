"""Choosing what a DPO round ships on validation rows (issue 23): the three-way split, the LoRA-update
interpolation, the selection rule and dpo/select_adapter.py end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from stage_helpers import load_script, make_sft_run

from promptrec.po_select import SFT, active_adapter, choose, grid, interpolate, selection_table
from promptrec.splits import CLUSTER_COLUMN, split_frame, three_way_split


# ------------------------------------------------------------------------------------------------ three-way split
def clustered_rows(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "rewrite_prompt": [f"p{i}" for i in range(n)],
                         CLUSTER_COLUMN: [f"c{k}" for k in rng.integers(0, 60, n)]})


def test_three_way_split_is_cluster_disjoint_and_keeps_the_test_rows():
    df = clustered_rows()
    train, validation, test = three_way_split(df, 0.2, 0.25, by="cluster", seed=42)
    sides = [set(side[CLUSTER_COLUMN]) for side in (train, validation, test)]
    assert all(sides) and not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert len(train) + len(validation) + len(test) == len(df)
    _, two_way_test = split_frame(df, 0.2, by="cluster", seed=42, salt="heldout")  # the split before issue 23
    assert list(test["id"]) == list(two_way_test["id"])
    assert 0.1 < len(validation) / (len(train) + len(validation)) < 0.45


# ------------------------------------------------------------------------------------------------ selection rule
def test_grid_lists_sft_first_then_steps_then_alphas():
    names = [c.name for c in grid([8, 4], 16, [0.75, 0.25])]
    assert names == ["sft", "step4", "step8", "step16", "alpha0.25", "alpha0.75"]
    assert [c.name for c in grid([], 2, [], start_is_sft=False)] == ["sft", "start", "step2"]
    with pytest.raises(ValueError, match="alpha"):
        grid([], 4, [1.0])


def test_choose_picks_the_validation_best_and_ties_go_to_sft_then_earlier():
    order = ["sft", "step4", "step8", "alpha0.5"]
    assert choose({"sft": 0.20, "step4": 0.22, "step8": 0.25, "alpha0.5": 0.24}, order) == "step8"
    assert choose({"sft": 0.25, "step4": 0.21, "step8": 0.25, "alpha0.5": 0.25 - 1e-12}, order) == "sft"
    assert choose({"sft": 0.10, "step4": 0.30, "step8": 0.30, "alpha0.5": 0.2}, order) == "step4"
    with pytest.raises(ValueError, match="no score"):
        choose({"sft": 0.1}, order)


def test_selection_table_pairs_every_candidate_with_sft():
    scores = {SFT: np.array([0.2, 0.4, 0.6, 0.8]), "step4": np.array([0.3, 0.5, 0.7, 0.9])}
    rows = selection_table(scores, ["sft", "step4"], groups=["a", "a", "b", "c"])
    assert rows[0]["diff_vs_sft"] == 0 and rows[1]["diff_vs_sft"] == pytest.approx(0.1)
    assert rows[1]["ci_low"] == pytest.approx(0.1) and rows[1]["mean"] == pytest.approx(0.6)


# ------------------------------------------------------------------------------------------- interpolation (ΔW)
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """An SFT-like run and a PO-like run: same base, different LoRA weights."""
    sft = make_sft_run(tmp_path_factory.mktemp("sft"), 32, lora_init_std=0.02)
    po = make_sft_run(tmp_path_factory.mktemp("po"), 32, lora_init_std=0.05)
    return sft, po


def test_interpolation_endpoints_reproduce_sft_and_the_adapter_and_mix_the_update(two_runs):
    from promptrec.models import load_model

    sft, po = two_runs
    model = load_model("embedded", dtype="float32", adapter=str(sft))
    model.load_adapter(str(po), adapter_name="po")
    for alpha in (0.0, 0.5, 1.0):
        interpolate(model, "default", "po", alpha, f"a{alpha:g}".replace(".", "_"))
    model.eval()
    ids = torch.tensor([[1, 42, 7, 99, 5, 300]])

    def logits(adapter):
        model.set_adapter(adapter)
        with torch.no_grad():
            return model(input_ids=ids).logits

    assert not torch.allclose(logits("default"), logits("po"), atol=1e-3)
    torch.testing.assert_close(logits("a0"), logits("default"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits("a1"), logits("po"), atol=1e-5, rtol=1e-5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # the update itself: (ΔW_sft + ΔW_po) / 2
    want = 0.5 * layer.get_delta_weight("default") + 0.5 * layer.get_delta_weight("po")
    torch.testing.assert_close(layer.get_delta_weight("a0_5"), want, atol=1e-6, rtol=1e-5)
    model.peft_config["po"].use_rslora = True  # its update is not B·A at scaling 1: refused, not built wrong
    with pytest.raises(ValueError, match="use_rslora"):
        interpolate(model, "default", "po", 0.5, "rs")


def test_a_merged_candidate_decodes_as_its_lora_layers_and_leaves_the_base_as_it_was(two_runs):
    """select_adapter --merge_adapter: each candidate (an interpolation too) is folded into the base for its decode and
    folded out after it, so every later candidate starts from the very base."""
    from promptrec.models import load_model

    sft, po = two_runs
    model = load_model("embedded", dtype="float32", adapter=str(sft))
    model.load_adapter(str(po), adapter_name="po")
    interpolate(model, "default", "po", 0.5, "mix")
    model.eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[1, 42, 7, 99, 5, 300]])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    for name in ("default", "po", "mix"):
        with active_adapter(model, name), torch.no_grad():
            want = model(input_ids=ids).logits
        with active_adapter(model, name, merge=True), torch.no_grad():
            assert layer.merged and layer.merged_adapters == [name]
            got = model(input_ids=ids).logits
        assert not layer.merged
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in base.items())  # restored bit for bit, not merely close


# ------------------------------------------------------------------------------------- dpo/select_adapter.py
def test_select_scores_every_candidate_on_validation_and_ships_the_pick(two_runs, tmp_path):
    from safetensors.torch import load_file

    from promptrec.cli import parse_args

    sft, po_source = two_runs
    po = tmp_path / "dpo"
    shutil.copytree(po_source, po)
    (po / "metrics.json").write_text(json.dumps({"train": {"global_step": 2}}))
    shutil.copytree(sft, po / "checkpoint-1")  # a checkpoint half-way: the SFT weights themselves
    validation = pd.read_json(sft.parent / "triplets.jsonl", lines=True).head(6)
    validation.to_parquet(tmp_path / "validation.parquet")
    module = load_script("dpo/select_adapter.py")
    (args,) = parse_args(module.SelectArguments, args=[
        "--sft_adapter", str(sft), "--po_run", str(po), "--validation", str(tmp_path / "validation.parquet"),
        "--output_dir", str(po / "selected"), "--alphas", "0.5", "--max_new_tokens", "6", "--scorer", "embedded",
        "--mean_prompt", "Rewrite the text.", "--prediction_cache", str(tmp_path / "cache")])
    summary = module.main(args)
    assert summary["reused_predictions"] == ["step1"]  # checkpoint-1 holds SFT's very weights: decoded once

    out = po / "selected"
    saved = json.loads((out / "selection.json").read_text())
    names = [row["name"] for row in saved["validation"]]
    assert names == ["sft", "step1", "step2", "alpha0.5"] and saved["n_validation"] == 6
    means = {row["name"]: row["mean"] for row in saved["validation"]}
    assert saved["picked"] == summary["picked"] == choose(means, names)
    assert means["step1"] == pytest.approx(means["sft"])  # same weights, same greedy answers
    assert all("drift" in row and "seconds" in row for row in saved["validation"])
    config = json.loads((out / "run_config.json").read_text())
    assert config["selection"]["picked"] == saved["picked"]
    source = {"sft": sft, "step1": sft, "step2": po}.get(saved["picked"])
    got = load_file(str(out / "adapter_model.safetensors"))
    if source is not None:
        want = load_file(str(source / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    else:  # an interpolation: rank of both summed
        r = json.loads((sft / "adapter_config.json").read_text())["r"]
        assert json.loads((out / "adapter_config.json").read_text())["r"] == config["lora_r"] == 2 * r
    preds = pd.read_parquet(out / "validation_predictions.parquet")
    assert len(preds) == 6 and {f"pred_{n}" for n in names} <= set(preds.columns)
    assert not (out / "DONE").exists() and not (out / "checkpoint-1").exists()

    again = module.main(args)  # a later selection with the same adapters (a later round, the control, a seed)
    assert again["reused_predictions"] == ["sft", "step1", "step2"]  # the interpolation is rebuilt and decoded
    # Reused candidates give the very same answers and scores. The rebuilt interpolation is decoded afresh: bf16 CPU
    # kernels may flip a near-tie of this untrained tiny model between two decodes, so only its presence is checked.
    first, second = ({r["name"]: r["mean"] for r in s["validation"]} for s in (summary, again))
    assert {n: second[n] for n in again["reused_predictions"]} == {n: first[n] for n in again["reused_predictions"]}
    repeated = pd.read_parquet(out / "validation_predictions.parquet")
    reused_columns = [f"pred_{n}" for n in again["reused_predictions"]]
    assert repeated[reused_columns].equals(preds[reused_columns]) and repeated["pred_alpha0.5"].str.len().gt(0).all()
    (tmp_path / "validation.parquet").unlink()
    validation.head(5).to_parquet(tmp_path / "validation.parquet")  # other rows: nothing may be reused
    assert module.main(args)["reused_predictions"] == ["step1"]


def test_a_shipped_interpolation_loads_as_the_mixed_update(two_runs, tmp_path, monkeypatch):
    from promptrec.cli import parse_args
    from promptrec.models import load_model

    sft, po = two_runs
    validation = pd.read_json(sft.parent / "triplets.jsonl", lines=True).head(2)
    validation.to_parquet(tmp_path / "validation.parquet")
    module = load_script("dpo/select_adapter.py")
    monkeypatch.setattr(module, "choose", lambda means, order: "alpha0.25")  # ship the interpolation whatever won
    (args,) = parse_args(module.SelectArguments, args=[
        "--sft_adapter", str(sft), "--po_run", str(po), "--validation", str(tmp_path / "validation.parquet"),
        "--output_dir", str(tmp_path / "selected"), "--alphas", "0.25", "--max_new_tokens", "4",
        "--scorer", "embedded", "--checkpoints", "false"])
    assert module.main(args)["picked"] == "alpha0.25"

    shipped = load_model("embedded", dtype="float32", adapter=str(tmp_path / "selected"))
    both = load_model("embedded", dtype="float32", adapter=str(sft))
    both.load_adapter(str(po), adapter_name="po")
    got = shipped.base_model.model.model.layers[1].mlp.down_proj.get_delta_weight("default")
    layer = both.base_model.model.model.layers[1].mlp.down_proj
    want = 0.75 * layer.get_delta_weight("default") + 0.25 * layer.get_delta_weight("po")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the policy loads in 4-bit, which is never merged")
def test_a_merged_selection_keeps_its_own_cache_entries(two_runs, tmp_path):
    """Merged decodes may differ from unmerged ones by float rounding: they never reuse, nor overwrite, the
    unmerged predictions a seed's earlier selections cached."""
    from promptrec.cli import parse_args

    sft, po = two_runs
    validation = pd.read_json(sft.parent / "triplets.jsonl", lines=True).head(2)
    validation.to_parquet(tmp_path / "validation.parquet")
    module = load_script("dpo/select_adapter.py")
    argv = ["--sft_adapter", str(sft), "--po_run", str(po), "--validation", str(tmp_path / "validation.parquet"),
            "--output_dir", str(tmp_path / "selected"), "--alphas", "", "--checkpoints", "false",
            "--max_new_tokens", "4", "--scorer", "embedded", "--prediction_cache", str(tmp_path / "cache")]
    plain = module.main(parse_args(module.SelectArguments, args=argv)[0])
    merged = module.main(parse_args(module.SelectArguments, args=[*argv, "--merge_adapter", "true"])[0])
    assert plain["merged"] is False and merged["merged"] is True and merged["reused_predictions"] == []
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4  # two candidates, each decoded both ways
    again = module.main(parse_args(module.SelectArguments, args=argv)[0])
    assert sorted(again["reused_predictions"]) == sorted(r["name"] for r in plain["validation"])
