"""pipeline/cache.py and the runner's decisions: a stage re-runs exactly when what produced it changed, says why,
resumes when it was interrupted with the same settings, and starts from an empty folder otherwise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))

from cache import changes, command_settings, decide, parse_flags  # noqa: E402
from paths import RunPaths  # noqa: E402
from stages import Stage, Step  # noqa: E402

from promptrec.cli import parse_args  # noqa: E402


def test_flags_and_recipe_values_resolve_like_trl_parser(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 60\nlearning_rate: 2.0e-4\nlora_target_modules: [q_proj, v_proj]\n")
    assert parse_flags(["--a", "1", "--b=x y", "--c", "p", "q", "--a", "2"]) == {"a": "2", "b": "x y", "c": "p q"}
    run = tmp_path / "run"
    settings = command_settings("sft/train.py", ["--config", str(recipe), "--max_steps", "4", "--output_dir",
                                                 str(run / "sft")], REPO, run)
    assert settings["max_steps"] == "4"  # the command line wins over the recipe
    assert settings["learning_rate"] == "0.0002" and settings["lora_target_modules"] == '["q_proj", "v_proj"]'
    assert settings["output_dir"] == "<run>/sft"  # a moved run folder is the same run
    cached = command_settings("inference/predict.py", ["--input", "t.csv", "--prediction_cache", str(run / "c")],
                              REPO, run)
    assert cached == command_settings("inference/predict.py", ["--input", "t.csv"], REPO, run)  # where, not what


def test_changes_name_each_differing_value():
    old = {"": {"max_steps": "4", "beta": "0.1"}}
    new = {"": {"max_steps": "60", "beta": "0.1", "loss_type": "ipo"}}
    assert changes(old, new) == ["loss_type unset → ipo", "max_steps 4 → 60"]
    assert changes({"round2/dpo": {"beta": "0.1"}}, {"round2/dpo": {"beta": "0.2"}}) == ["round2/dpo beta 0.1 → 0.2"]


@pytest.mark.parametrize(("record", "kwargs", "action", "reason"), [
    (None, {}, "fresh", "not run before"),
    (None, {"legacy_done": True}, "fresh", "older pipeline"),
    ({"status": "done"}, {}, "skip", None),
    ({"status": "done"}, {"forced": True}, "fresh", "--force"),
    ({"status": "done"}, {"upstream": ("sft",)}, "fresh", "upstream stage sft re-ran"),
    ({"status": "running"}, {}, "resume", "interrupted"),
    ({"status": "running", "settings": {"": {"max_steps": "2"}}}, {}, "fresh", "max_steps 2 → 4"),
    ({"status": "done", "inputs": {"split/train.parquet": "aaaa"}}, {}, "fresh", "input split/train.parquet changed"),
])
def test_decide(record, kwargs, action, reason):
    settings, inputs = {"": {"max_steps": "4"}}, {"split/train.parquet": "bbbb"}
    if record is not None:
        record = {"settings": settings, "inputs": inputs} | record
    decision = decide(record, settings, inputs, **kwargs)
    assert decision.action == action
    assert reason is None or any(reason in r for r in decision.reasons), decision.reasons


def make_runner(tmp_path, argv=()):
    from stage_helpers import load_script

    run = load_script("pipeline/run.py")
    (args,) = parse_args(run.PipelineArguments, args=["--run_dir", str(tmp_path / "run"), *argv])
    return run.Runner(args, RunPaths(args.run_dir))


def fake_stages(calls: list, knobs: dict, fail_at: str | None = None):
    """Two stages: 'split' writes a file from ``knobs['rows']``; 'sft' reads it and has a resumable step each."""
    def split_steps(job):
        def run():
            calls.append("split")
            (job.paths.train.parent).mkdir(parents=True, exist_ok=True)
            job.paths.train.write_text(str(knobs["rows"]))
        return [Step("", {"rows": str(knobs["rows"])}, run)]

    def sft_steps(job):
        def part(name):
            def run():
                calls.append(name)
                if name == fail_at:
                    raise KeyboardInterrupt  # killed half-way
            return run
        return [Step(n, {"steps": str(knobs["steps"])}, part(n), job.paths.sft / n) for n in ("a", "b")]

    return [Stage("split", lambda j: [], split_steps, lambda j: [j.paths.train]),
            Stage("sft", lambda j: [j.paths.train], sft_steps)]


def run_all(runner, stages):
    for number, stage in enumerate(stages, start=1):
        runner.stage(number, stage)


def test_runner_skips_reruns_and_resumes_as_the_records_say(tmp_path, capsys):
    calls, knobs = [], {"rows": 16, "steps": 2}
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    assert calls == ["split", "a", "b"]
    record = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert record["status"] == "done" and record["inputs"] == {"split/train.parquet": record["inputs"][
        "split/train.parquet"]} and record["config"]["run_dir"] == str(tmp_path / "run")

    calls.clear()  # unchanged: nothing runs
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    assert calls == [] and capsys.readouterr().out.count("skipped") == 2

    knobs["steps"] = 3  # a changed setting: that stage only, from an empty folder, saying why
    (tmp_path / "run" / "sft" / "stale").write_text("x")
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    assert calls == ["a", "b"] and not (tmp_path / "run" / "sft" / "stale").exists()
    assert "sft: runs (a steps 2 → 3; b steps 2 → 3)" in capsys.readouterr().out

    calls.clear()  # a changed upstream stage re-runs what reads it
    knobs["rows"] = 120
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    out = capsys.readouterr().out
    assert calls == ["split", "a", "b"] and "rows 16 → 120" in out and "upstream stage split re-ran" in out

    calls.clear()  # killed during step b: the next run resumes at b with the same settings, or restarts if changed
    knobs["steps"] = 4
    with pytest.raises(KeyboardInterrupt):
        run_all(make_runner(tmp_path), fake_stages(calls, knobs, fail_at="b"))
    calls.clear()
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    assert calls == ["b"] and "sft: resumes (interrupted before" in capsys.readouterr().out


def test_an_input_changed_by_hand_reruns_the_stage_that_reads_it(tmp_path, capsys):
    calls, knobs = [], {"rows": 16, "steps": 2}
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    (tmp_path / "run" / "split" / "train.parquet").write_text("edited")
    calls.clear()
    make_runner(tmp_path).stage(2, fake_stages(calls, knobs)[1])
    assert calls == ["a", "b"] and "input split/train.parquet changed" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    calls, knobs = [], {"rows": 16, "steps": 2}
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    calls.clear()
    knobs["rows"] = 120
    run_all(make_runner(tmp_path, ["--dry_run", "true"]), fake_stages(calls, knobs))
    out = capsys.readouterr().out
    assert calls == [] and "split: would run (rows 16 → 120)" in out and "sft: would run (upstream stage split" in out
    assert json.loads((tmp_path / "run" / "split" / "stage.json").read_text())["settings"][""]["rows"] == "16"


def test_a_failed_command_is_its_own_error_with_the_command_and_its_log_tail(tmp_path):
    from stage_helpers import load_script

    run = load_script("pipeline/run.py")
    code = "import sys; print('loading'); print('boom: bad value', file=sys.stderr); sys.exit(3)"
    cmd = [sys.executable, "-c", code]
    with pytest.raises(run.StageFailed) as err:
        run.execute("sft", cmd, tmp_path / "log.txt")
    message = str(err.value)
    assert "stage 'sft' failed (exit 3)" in message and "boom: bad value" in message and "import sys" in message
    assert "boom: bad value" in (tmp_path / "log.txt").read_text()
    assert not isinstance(err.value, ValueError)  # not DataError, the class that means bad input


def test_a_deleted_output_reruns_its_stage_and_an_old_folder_is_kept_aside(tmp_path, capsys):
    calls, knobs = [], {"rows": 16, "steps": 2}
    legacy = tmp_path / "run" / "sft"
    legacy.mkdir(parents=True)
    (legacy / "DONE").write_text("12 s\n")  # an older pipeline's finished stage: no record of its settings
    (legacy / "adapter_model.safetensors").write_text("weights")
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    assert "kept as" in capsys.readouterr().out and calls == ["split", "a", "b"]
    assert (tmp_path / "run" / "sft.legacy" / "adapter_model.safetensors").read_text() == "weights"

    (tmp_path / "run" / "split" / "train.parquet").unlink()
    calls.clear()
    run_all(make_runner(tmp_path), fake_stages(calls, knobs))
    assert calls == ["split", "a", "b"] and "train.parquet is missing" in capsys.readouterr().out


def test_report_names_each_invocations_arguments_against_the_latest():
    """A run folder whose stages come from two invocations: the earlier one lists what differed from the latest;
    the latest is not called "same arguments" (it is the reference)."""
    from comparison import provenance_lines

    early = {"invocation": "2026-12-06T17:07", "config": {"dpo_rounds": 2, "seed": 42}}
    late = {"invocation": "2026-12-07T04:31", "config": {"dpo_rounds": 1, "seed": 42}}
    lines = provenance_lines({"sft": early, "dpo": late}, [{"id": "sft", "method": "SFT adapter"},
                                                          {"id": "dpo", "method": "DPO adapter"}])
    assert "- 2026-12-06T17:07: sft (dpo_rounds=2)" in lines
    (latest,) = [line for line in lines if line.startswith("- 2026-12-07T04:31: dpo")]
    assert "the latest" in latest and "same arguments" not in latest
    assert "| DPO adapter | 2026-12-06T17:07, 2026-12-07T04:31 |" in lines
