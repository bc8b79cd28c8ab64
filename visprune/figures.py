"""Matplotlib figures written the way every artifact is: off-screen (Agg) and atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from visprune.artifacts import atomic_write_bytes
from visprune.manifests.schema_ids import PLOT

PNG_SCHEMA_KEY, PLOT_SCHEMA = "visprune-schema", PLOT.name


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path) -> None:
    """Lay out, write as PNG to `out` atomically, and close the figure."""
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={PNG_SCHEMA_KEY: PLOT_SCHEMA})  # marks it as ours (outputs.py)
    plt.close(fig)
    atomic_write_bytes(Path(out), buffer.getvalue())
