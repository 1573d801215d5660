"""Issue 23's seed-42 choice of the pair recipe, on validation rows only (the protocol is fixed in
docs/po_selection.md, "Implementation notes", seventh session).

    python scripts/pair_choice.py --run checkpoints/pipeline/real_gemma

Each variant rebuilds round 1's pairs from the run's own round-1 candidates with the run's pairs command plus the
variant's flags (``<output_dir>/<variant>/pairs``), retrains round 1 with the run's DPO command plus the chosen loss
(``--beta 0.3``) on them, and scores the final adapter on the validation rows (``po_loss_choice.run_variant``).
Variant ``today`` is the run's own pairs with that loss: the loss choice's ``rpo_beta0.3`` (read, not retrained).
A finished step is skipped on a re-run. Writes ``<output_dir>/pair_choice.json``. Nothing here reads a test row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from po_loss_choice import choose, run_variant  # noqa: E402

SELF_PLAY = ["--chosen_sources", "policy", "--rejected_sources", "policy"]
VARIANTS = {
    "today": [],
    "self_play_bvw": [*SELF_PLAY, "--strategy", "best_vs_worst", "--max_pairs_per_example", "1", "--min_margin", "0"],
    "self_play_topk": SELF_PLAY,
}
LOSS = ["--beta", "0.3"]  # the loss choice's pick (docs/po_selection.md)


def build_pairs(run: Path, out: Path, flags: list[str]) -> Path:
    if not (out / "summary.json").is_file():
        record = json.loads((run / "pairs/stage.json").read_text())
        command = shlex.split(next(iter(record["commands"].values())))
        command[command.index("--output_dir") + 1] = str(out)
        subprocess.run([*command, *flags], check=True, cwd=REPO)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="checkpoints/pipeline/real_gemma",
                        help="The seed-42 run (its pairs and DPO stages done, the loss choice run).")
    parser.add_argument("--output_dir", default=None, help="Default: <run>_pair_choice.")
    args = parser.parse_args()
    run = Path(args.run)
    out = Path(args.output_dir or f"{run}_pair_choice")
    selected = {"today": Path(f"{run}_loss_choice/rpo_beta0.3/selected")}
    if not (selected["today"] / "selection.json").is_file():
        raise SystemExit(f"{selected['today']}: run scripts/po_loss_choice.py first (variant rpo_beta0.3)")
    for name, flags in VARIANTS.items():
        if name != "today":
            pairs = build_pairs(run, out / name / "pairs", flags)
            selected[name] = run_variant(run, out / name / "dpo", [
                *LOSS, "--train_pairs", str(pairs / "train.jsonl"), "--eval_pairs", str(pairs / "eval.jsonl")])
    choose(run, selected, VARIANTS, "today", out / "pair_choice.json")


if __name__ == "__main__":
    main()
