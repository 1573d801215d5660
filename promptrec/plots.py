"""The one figure helper of the stages' PNGs (training curves, pair margins, SCS histograms, the main job's report)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: str | Path, ncols: int = 1, size: tuple[float, float] = (7, 4), dpi: int = 110):
    """Yields a list of ``ncols`` axes side by side; on exit the figure is laid out, saved to ``path`` (folders
    made) with matplotlib's headless Agg backend, and closed (also when the body raises; then nothing is saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
