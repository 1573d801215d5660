"""Predict the rewrite prompt of every row of a test.csv and write a Kaggle submission.

    python inference/predict.py --adapter checkpoints/sft/<run> --input test.csv --output submission.csv
    python inference/predict.py --model embedded --input test.csv --output submission.csv --append_mean_prompt
    python inference/predict.py --model embedded --selection reward --reward_model checkpoints/reward/<run>

The base model defaults to the one recorded in the adapter's run_config.json; 4-bit on a GPU, full precision on the
CPU; greedy unless --temperature > 0; --selection mbr / reward / reward_mbr pick among the greedy answer, samples
and the mean prompt (inference/README.md). `--help` lists the post-processing switches; `--config x.yaml` takes the
same keys as YAML. The Kaggle notebook (inference/kaggle_inference.ipynb) runs the same
`promptrec.predict.predict_file`.
"""

from __future__ import annotations

import logging

from promptrec.cli import asdict_all, parse_args, run_main, setup_logging
from promptrec.postprocess import PostprocessConfig
from promptrec.predict import PredictArguments, predict_file

logger = logging.getLogger("inference.predict")


def main(script_args: PredictArguments, post_args: PostprocessConfig) -> None:
    setup_logging()
    logger.info("Config: %s", asdict_all(script_args, post_args))
    submission = predict_file(script_args, post_args)
    for row in submission.head(3).itertuples(index=False):
        logger.info("sample: %s → %r", row.id, row.rewrite_prompt)


if __name__ == "__main__":
    script_args, post_args = parse_args(PredictArguments, PostprocessConfig)
    run_main(lambda: main(script_args, post_args))
