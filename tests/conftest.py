"""Shared fixtures: hand-written triplets, the embedded model, and (when present) the real shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROMPTREC_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_TRIPLETS = [
    ("The meeting moved to Tuesday at 3pm. Please bring the quarterly report and your laptop.",
     "Rewrite this email as a pirate would say it.",
     "Arr, the gatherin' be moved to Tuesday at three bells! Bring yer quarterly report and yer laptop, matey."),
    ("Our new blender has five speeds, a glass jar and a two-year warranty.",
     "Turn this into an enthusiastic advertisement.",
     "Meet the blender of your dreams! Five speeds, a gorgeous glass jar, and a two-year warranty. Get yours today!"),
    ("The river flooded the valley after three days of rain, and farmers lost most of their crops.",
     "Rewrite this as a short poem.",
     "Three days of rain, the river rose,\nThe valley drowned where the wheat once grows."),
    ("Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
     "Explain this to a five-year-old.",
     "Plants eat sunshine! They drink water and breathe air, and make their own sugar snack and fresh air for us."),
    ("I am writing to complain about the late delivery of my order, which arrived two weeks after the promised date.",
     "Make this text more polite and formal.",
     "I would like to respectfully bring to your attention that my order arrived two weeks after the expected date."),
    ("The team won the final match 3-1 after trailing at half time.",
     "Rewrite this as a breaking news headline.",
     "COMEBACK: Team Storms Back From Half-Time Deficit to Win Final 3-1"),
    ("Mix flour, sugar and eggs, then bake for twenty minutes at 180 degrees.",
     "Convert this recipe into a numbered list of steps.",
     "1. Mix the flour, sugar and eggs.\n2. Bake for twenty minutes at 180 degrees."),
    ("The library will close early on Friday for staff training.",
     "Rewrite this in the style of Shakespeare.",
     "Hark! On Friday shall the house of books shut its doors betimes, that its keepers may be taught."),
]


@pytest.fixture
def tiny_triplets() -> pd.DataFrame:
    """Eight hand-written triplets (id, original_text, rewrite_prompt, rewritten_text, prompt_category)."""
    rows = [{"id": f"t{i}", "original_text": o, "rewrite_prompt": p, "rewritten_text": r, "prompt_category": "misc"}
            for i, (o, p, r) in enumerate(TINY_TRIPLETS)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The materialised embedded SmolLM2 directory (built once per machine, then cached)."""
    from promptrec.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_model_dir):
    from promptrec.models import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def embedded_model(embedded_model_dir):
    """The embedded SmolLM2 in fp32 on the CPU, shared read-only by tests that only generate."""
    from promptrec.models import load_model

    model = load_model("embedded", dtype="float32")
    model.eval()
    return model


@pytest.fixture(scope="session")
def shared_triplets() -> pd.DataFrame:
    """The real triplets from ../shared/data (run-time only, never committed); skips when absent."""
    path = SHARED_DATA / "triplets.csv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return pd.read_csv(path)


@pytest.fixture(scope="session")
def shared_prompts() -> pd.DataFrame:
    path = SHARED_DATA / "prompts.csv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return pd.read_csv(path)
