"""Where visprune keeps what it builds for itself (the tiny checkpoints, calibration sets, stamps)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: `VISPRUNE_CACHE`, else ~/.cache/visprune."""
    return Path(os.environ.get("VISPRUNE_CACHE", Path.home() / ".cache" / "visprune"))
