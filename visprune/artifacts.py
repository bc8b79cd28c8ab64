"""Artifact plumbing shared by every stage: atomic writes, content hashes, tool versions.

Writes go to a temporary file in the destination folder and are renamed into place, so a crash or an error
never leaves a half-written artifact that a later stage could mistake for a valid one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, fixed separators) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_pretty_json(obj: Any) -> bytes:
    """Human-readable JSON with a trailing newline; key order is the writer's, so output is deterministic."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, to_pretty_json(obj))


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a staging folder next to `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the mode mkdir would
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions (plus visprune itself)."""
    names = ("visprune", *packages)
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# Schemas of the artifacts the stages hand to each other (name, version).
ONNX_SET_SCHEMA = ("visprune.onnx_set", 1)
ENGINE_SET_SCHEMA = ("visprune.engine_set", 1)
GRAPH_NAMES = ("vision", "prefill", "decode")
GRAPH_SET_FILES = tuple(f"{g}.onnx" for g in GRAPH_NAMES) + ("embed_tokens.npy", "processor")


def read_manifest(folder: Path, filename: str, schema: tuple[str, int], required: tuple[str, ...],
                  what: str, hint: str) -> dict[str, Any]:
    """A stage's manifest, after checking its schema and that every file the stage needs is in `folder`.

    Raises ArtifactMismatchError with `hint` (the command that recreates the artifact) otherwise.
    """
    from visprune.errors import ArtifactMismatchError

    folder = Path(folder)
    try:
        manifest = json.loads((folder / filename).read_text())
    except FileNotFoundError as e:
        raise ArtifactMismatchError(f"No {what} manifest at {folder / filename}.", hint) from e
    except ValueError as e:
        raise ArtifactMismatchError(f"The {what} manifest {folder / filename} is not valid JSON ({e}).", hint) from e
    if (manifest.get("schema"), manifest.get("schema_version")) != schema:
        raise ArtifactMismatchError(f"{folder} is not a visprune {what} of schema version {schema[1]}.", hint)
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise ArtifactMismatchError(f"{folder} lacks {', '.join(missing)}.", f"The folder is incomplete. {hint}")
    return manifest
