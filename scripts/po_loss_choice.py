"""Issue 23's seed-42 choice of the DPO loss, on validation rows only (the protocol is fixed in docs/po_selection.md,
"Implementation notes", fourth session).

    python scripts/po_loss_choice.py --run checkpoints/pipeline/real_gemma

Each variant retrains round 1 with the pipeline's own DPO command of ``--run`` (read from ``<run>/dpo/stage.json``),
only the variant's flags appended, into ``<output_dir>/<variant>``; ``dpo/select_adapter.py`` then scores its final
adapter on the validation rows (SFT's predictions come from the run's ``select_cache``). Variant ``rpo`` is the
run's own round (its final adapter's validation predictions are read from ``<run>/dpo/selected``). A finished
variant is skipped on a re-run. Writes ``<output_dir>/loss_choice.json`` and prints each variant's validation mean
and its paired difference to ``rpo`` (prompt-cluster bootstrap). Nothing here reads a test row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from promptrec.evaluation import bootstrap_ci  # noqa: E402
from promptrec.scoring import ScorerArguments  # noqa: E402
from promptrec.splits import CLUSTER_COLUMN  # noqa: E402
from promptrec.tables import write_json  # noqa: E402

# Every variant keeps RPO's NLL term with weight 1 and changes only what its name says (docs/po_selection.md).
VARIANTS = {
    "rpo": [],
    "rpo_beta0.3": ["--beta", "0.3"],
    "ipo": ["--loss_type", "ipo", "sft"],
    "apo_zero": ["--loss_type", "apo_zero", "sft"],
    "robust_ls0.1": ["--loss_type", "robust", "sft", "--label_smoothing", "0.1"],
    "rpo_ld_alpha0.5": ["--ld_alpha", "0.5"],
}


def dpo_command(run: Path) -> list[str]:
    record = json.loads((run / "dpo" / "stage.json").read_text())
    if record.get("status") != "done":
        raise SystemExit(f"{run}/dpo/stage.json: the run's DPO stage has not finished")
    commands = record["commands"]  # step name → command line (pipeline/cache.py)
    command = next(c for c in (commands.values() if isinstance(commands, dict) else commands) if "dpo/train.py" in c)
    return shlex.split(command)


def final_predictions(selected: Path) -> list[str]:
    summary = json.loads((selected / "selection.json").read_text())
    final = max((c for c in summary["candidates"] if c["kind"] == "checkpoint"), key=lambda c: c.get("step", 0))
    return pd.read_parquet(selected / "validation_predictions.parquet")[f"pred_{final['name']}"].tolist()


def run_variant(run: Path, out: Path, flags: list[str]) -> Path:
    selected = out / "selected"
    if (selected / "selection.json").is_file():
        return selected
    cmd = dpo_command(run)
    i = cmd.index("--output_dir")
    cmd[i + 1] = str(out)
    subprocess.run([*cmd, *flags], check=True, cwd=REPO)
    subprocess.run([sys.executable, str(REPO / "dpo/select_adapter.py"), "--sft_adapter", str(run / "sft"),
                    "--po_run", str(out), "--validation", str(run / "split/validation.parquet"), "--mean_prompt",
                    str(run / "mean_prompt/mean_prompt.json"), "--scorer", "embedded", "--alphas", "",
                    "--checkpoints", "false", "--output_dir", str(selected), "--seed", "42"], check=True, cwd=REPO)
    return selected


def choose(run: Path, selected: dict[str, Path], flags: dict[str, list], base: str, out_file: Path) -> str:
    """Score each variant's final adapter on the run's validation rows; the highest mean wins only if its paired
    difference to ``base`` has a prompt-cluster bootstrap interval above zero, else ``base`` stays. Writes and
    prints the table."""
    validation = pd.read_parquet(run / "split/validation.parquet")
    truth = validation["rewrite_prompt"].tolist()
    groups = validation[CLUSTER_COLUMN].to_numpy() if CLUSTER_COLUMN in validation.columns else None
    scorer = ScorerArguments(scorer="embedded").build()
    scores = {name: np.asarray(scorer.score(final_predictions(path), truth), dtype=np.float64)
              for name, path in selected.items()}
    rows = []
    for name, values in scores.items():
        row = {"variant": name, "flags": flags[name], "validation_mean": float(values.mean())}
        if base in scores and name != base:
            low, high = bootstrap_ci(values - scores[base], 1000, seed=42, groups=groups)
            row |= {f"diff_vs_{base}": float((values - scores[base]).mean()), "ci_low": low, "ci_high": high}
        rows.append(row)
        print(f"{name:>16}: {row['validation_mean']:.4f}" + (
            f"  vs {base} {row[f'diff_vs_{base}']:+.4f} ({row['ci_low']:+.4f} … {row['ci_high']:+.4f})"
            if "ci_low" in row else ""), flush=True)
    best = max(rows, key=lambda r: r["validation_mean"])
    chosen = best["variant"] if best.get("ci_low", -1) > 0 else base
    write_json({"rows": rows, "n_validation": len(validation), "chosen": chosen,
                "rule": f"highest validation mean, only if its paired CI vs {base} lies above zero; else {base}"},
               out_file)
    print(f"chosen: {chosen}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="checkpoints/pipeline/real_gemma",
                        help="The seed-42 run (its DPO stage done).")
    parser.add_argument("--output_dir", default=None, help="Default: <run>_loss_choice.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    run = Path(args.run)
    out = Path(args.output_dir or f"{run}_loss_choice")
    selected = {name: run / "dpo/selected" if name == "rpo" else run_variant(run, out / name, VARIANTS[name])
                for name in args.variants}
    choose(run, selected, VARIANTS, "rpo", out / "loss_choice.json")


if __name__ == "__main__":
    main()
