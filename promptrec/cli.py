"""Command-line plumbing shared by every entry script: TRL's parser and one-line errors."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable

from promptrec.models import ModelNotFoundError
from promptrec.tables import DataError, require_path

# Bad input the user can fix (a missing path they named is a DataError: promptrec.tables.require_path). Anything
# else, a FileNotFoundError included, is a bug and keeps its traceback.
USER_ERRORS = (DataError, ModelNotFoundError)


def parse_args(*dataclass_types, args=None):
    """Parse ``--config recipe.yaml`` plus CLI overrides into the dataclasses (unknown keys are an error). A missing
    recipe, or a value a dataclass's ``__post_init__`` refuses (ValueError), prints ``error: <one line>`` and exits 2,
    like argparse's own errors, instead of a traceback."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    try:
        recipe = _config_flag(sys.argv[1:] if args is None else args)
        if recipe is not None:
            require_path(recipe, hint="the --config recipe")
        return parser.parse_args_and_config(args=args)
    except ValueError as err:  # DataError included
        _exit_with(err)


def _config_flag(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv``, if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _exit_with(err: Exception) -> None:
    """Print ``error: <first line of err>`` to stderr and exit 2."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level,
                        force=True)
    for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main: Callable[[], object]) -> None:
    """Call ``main``; a bad input, a missing path the user named or a bad model name (:data:`USER_ERRORS`) prints
    ``error: <one line>`` and exits 2, with no traceback."""
    try:
        main()
    except USER_ERRORS as err:
        _exit_with(err)


def asdict_all(*objs) -> dict:
    """Resolved config of several dataclasses (e.g. script, training and model args) as one JSON-able dict."""
    out = {}
    for obj in objs:
        if obj is None:
            continue
        d = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        out[type(obj).__name__] = d
    return out
