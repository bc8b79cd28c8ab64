"""Output locations that never lose a user's files.

Every command that writes (`--out`) first calls `check_output`, before any work:
- a missing location, or an empty folder, is fine;
- an artifact of the same kind that visprune wrote (its marker file names the kind's schema) is replaced;
- anything else (a folder with other files, another kind of artifact, a file where a folder goes) is refused
  unless `force`; an input of the command, a path inside an input or a folder holding an input is refused even
  with `force`.

Then `replacing(out)` writes into a staging sibling and swaps it in: the old artifact is renamed aside, the new
one renamed in, then the old one deleted, so a crash in between never leaves neither. Siblings left by a run
that was killed (`.NAME.visprune-ROLE.PID...`) are recognised by their dead PID and cleaned, or the old artifact
restored, by the next run into the same place.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from visprune.errors import ConfigError
from visprune.manifests import schema_ids as ids
from visprune.manifests.schema_ids import SchemaId


class OutputLocationError(ConfigError):
    """An output location cannot be written without losing files, or cannot be written at all."""


@dataclass(frozen=True)
class ArtifactKind:
    """What visprune writes at one `--out`: a file or a folder, recognised by a marker naming its schema."""

    name: str  # for messages: "recipe", "ONNX set", ...
    schemas: tuple[SchemaId, ...]  # their files are the markers; "" as the file: the artifact itself is the marker
    entries: tuple[str, ...] = ()  # folder kinds: glob patterns of the entries such a folder may hold
    command: str = ""  # what writes it, for hints
    flag: str = "--out"  # the option that says where it goes, for hints

    @property
    def is_dir(self) -> bool:
        return bool(self.entries)


RECIPE = ArtifactKind("recipe", (ids.RECIPE,), command="visprune calibrate")
ONNX_SET = ArtifactKind("ONNX set", (ids.ONNX_SET,),
                        (ids.ONNX_SET.file, "*.onnx", "*.data", "embed_tokens.npy", "processor"), "visprune export")
ENGINE_SET = ArtifactKind("engine", (ids.ENGINE_SET,),
                          (ids.ENGINE_SET.file, "*.onnx", "*.data", "*.plan", "timing.cache", "embed_tokens.npy",
                           "processor"), "visprune build")
REPORT = ArtifactKind("report folder", (ids.PARITY_REPORT, ids.LATENCY_REPORT),
                      ("parity.*", "latency.*", "kept_tokens.png"), "visprune report")
EVAL = ArtifactKind("evaluation", (ids.EVAL_REPORT,), ("eval.*",), "visprune eval")
TRADEOFF = ArtifactKind("trade-off study", (ids.TRADEOFF,), ("tradeoff.*", "recipes"), "visprune tradeoff")
PLOT = ArtifactKind("plot", (ids.PLOT,), command="visprune recipe --plot", flag="--plot")
PIPELINE_RUN = ArtifactKind("pipeline run", (ids.PIPELINE_RUN,),
                            (ids.PIPELINE_RUN.file, "recipe.*", "onnx", "onnx-unpruned", "engine", "engine-unpruned",
                             "sample.png", "report", "report.md"), "visprune pipeline")


def force_hint(flag: str = "--out") -> str:
    return f"Pass --force to replace it anyway (its contents are deleted), or choose another {flag}."


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.visprune-(?P<role>staging|old|writing)\.(?P<pid>\d+)(\..*)?$")


def check_output(out: Path, kind: ArtifactKind, inputs: Iterable[Path | None] = (), force: bool = False,
                 siblings: Iterable[Path] = ()) -> None:
    """Refuse `out` (OutputLocationError, exit 2) unless writing `kind` there loses nothing; see the module doc.

    `siblings` are files written next to `out` (calibrate's plot and run record): they follow the same rule.
    """
    out = Path(out)
    check_not_an_input(out, [Path(p) for p in inputs if p is not None], kind.flag)
    recover_interrupted(out, kind.flag)
    check_writable_parent(out, kind.flag)
    replaces_artifact = _check_existing(out, kind, force)
    for sibling in siblings:
        recover_interrupted(sibling, kind.flag)
        ours = replaces_artifact or (_schema_of(sibling) or "").startswith("visprune.")  # a plot or run record
        if (sibling.exists() or sibling.is_symlink()) and not (ours or force):
            raise OutputLocationError(f"{sibling} exists and is not part of a visprune {kind.name} at {out}.",
                                      force_hint(kind.flag))


def check_not_an_input(out: Path, inputs: list[Path], flag: str = "--out") -> None:
    """An output may not be, contain or lie inside an input of the same command: not even --force allows it."""
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = ("is" if target == source else "lies inside" if source in target.parents else "contains")
            raise OutputLocationError(f"The output {out} {relation} the input {source}; writing it would destroy "
                                      "what the command reads.", f"Choose a {flag} outside every input.")


def check_writable_parent(out: Path, flag: str = "--out") -> None:
    """The nearest existing ancestor must be a writable folder (missing folders below it are created)."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputLocationError(f"Cannot create {out}: {ancestor} is a file, not a folder.",
                                  f"Choose a {flag} whose parent folders are folders.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputLocationError(f"Cannot write {out}: the folder {ancestor} is not writable.",
                                  f"Choose a {flag} in a folder you can write, or fix its permissions.")


def _check_existing(out: Path, kind: ArtifactKind, force: bool) -> bool:
    """True when `out` holds an artifact of `kind` to replace; raises when replacing what is there would lose
    files (unless `force`)."""
    if not out.exists() and not out.is_symlink():
        return False
    found = artifact_kind_at(out)
    if kind.is_dir and out.is_dir() and not found and not any(out.iterdir()):
        return False
    if found is not kind:
        if force:
            return False
        what = f"a visprune {found.name}" if found else ("a folder with other files" if out.is_dir() else "a file")
        raise OutputLocationError(f"{out} already exists and is {what}, not a visprune {kind.name}.",
                                  force_hint(kind.flag))
    foreign = foreign_entries(out, kind) if kind.is_dir else []
    if foreign and not force:
        raise OutputLocationError(f"{out} is a visprune {kind.name} but also holds files visprune did not write: "
                                  f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}.",
                                  "Move those files elsewhere first, or " + force_hint(kind.flag)[0].lower() +
                                  force_hint(kind.flag)[1:])
    return True


def artifact_kind_at(path: Path) -> ArtifactKind | None:
    """The kind of visprune artifact at `path`, read from its marker file; None for anything else."""
    for kind in KINDS:
        for schema in kind.schemas:
            if path.is_dir() != bool(schema.file):
                continue
            if _schema_of(path / schema.file if schema.file else path) == schema.name:
                return kind
    return None


def _schema_of(path: Path) -> str | None:
    if path.suffix.lower() == ".png":
        return _png_schema_of(path)
    try:  # markers are small; a large file is no marker (and is not read whole)
        data = json.loads(path.read_bytes()) if path.stat().st_size <= 1 << 24 else None
    except (OSError, ValueError):
        return None
    return data.get("schema") if isinstance(data, dict) else None


def _png_schema_of(path: Path) -> str | None:
    """Plots carry their schema in a PNG text chunk (visprune/figures.py)."""
    from PIL import Image, UnidentifiedImageError

    from visprune.figures import PNG_SCHEMA_KEY

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(PNG_SCHEMA_KEY)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def foreign_entries(folder: Path, kind: ArtifactKind) -> list[str]:
    """Top-level entries of an artifact folder that its kind never writes."""
    return sorted(entry.name for entry in folder.iterdir()
                  if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in kind.entries))


# --- writing -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def replacing(out: Path, is_dir: bool = True) -> Iterator[Path]:
    """Yield a staging path next to `out` (a fresh folder, or a file path); it replaces `out` if the block ends
    without an error, and is removed otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _leftover_path(out, "staging")
    if is_dir:
        staging.mkdir(mode=0o777)
    try:
        yield staging
        if staging.exists():
            swap_in(staging, out)
    except BaseException:
        remove_path(staging)
        raise


@contextlib.contextmanager
def writing_in_place(out: Path) -> Iterator[Path]:
    """For a folder whose content records its own path (a pipeline run): the old one is moved aside, the new
    one is written at `out` itself, and the old one comes back if the block fails. A marker sibling says the
    folder is being written, so the next run can tell a killed run's partial folder from a finished one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = _leftover_path(out, "writing")
    marker.touch()
    aside = _move_aside(out)
    try:
        out.mkdir()
        yield out
    except BaseException:
        remove_path(out)
        if aside:
            os.replace(aside, out)
        marker.unlink()
        raise
    marker.unlink()
    if aside:
        remove_path(aside)


def swap_in(staging: Path, out: Path) -> None:
    """Rename the old `out` aside, rename `staging` in, then delete the old one."""
    aside = _move_aside(out)
    os.replace(staging, out)
    if aside:
        remove_path(aside)


def _move_aside(out: Path) -> Path | None:
    if not out.exists() and not out.is_symlink():
        return None
    aside = _leftover_path(out, "old")
    os.replace(out, aside)
    return aside


def _leftover_path(out: Path, role: str) -> Path:
    """A unique sibling `.NAME.visprune-ROLE.PID.XXXX` that `recover_interrupted` recognises."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.visprune-{role}.{os.getpid()}.", dir=out.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- recovery ------------------------------------------------------------------------------------------------


def recover_interrupted(out: Path, flag: str = "--out") -> None:
    """Clean what a killed run left next to `out`: staging copies go, a partial in-place folder goes, and an
    old artifact that was renamed aside comes back unless a complete new one took its place."""
    leftovers = _leftovers(Path(out))
    for role in ("writing", "staging", "old"):  # the partial folder must go before the old one can return
        for path, pid in leftovers.get(role, []):
            _check_not_running(out, pid, flag)
            _recover(Path(out), path, role)


def _leftovers(out: Path) -> dict[str, list[tuple[Path, int]]]:
    found: dict[str, list[tuple[Path, int]]] = {}
    if not out.parent.is_dir():
        return found
    for path in out.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == out.name:
            found.setdefault(match["role"], []).append((path, int(match["pid"])))
    return found


def _recover(out: Path, path: Path, role: str) -> None:
    if role == "writing":
        remove_path(out)
    elif role == "old" and not out.exists():
        os.replace(path, out)
        return
    remove_path(path)


def _check_not_running(out: Path, pid: int, flag: str) -> None:
    if pid == os.getpid() or not _alive(pid):
        return
    raise OutputLocationError(f"Another visprune process (PID {pid}) is writing {out} right now.",
                              f"Wait for it to finish, or choose another {flag}. If no such run is active, delete "
                              f"the hidden .{out.name}.visprune-* entries next to {out}.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


KINDS = (RECIPE, PLOT, ONNX_SET, ENGINE_SET, REPORT, EVAL, TRADEOFF, PIPELINE_RUN)


def atomic_directory(path: Path):
    """A staging folder next to `path` that replaces it only if the block succeeds; for the
    cache's own folders, so what a killed build left there is cleaned first."""
    recover_interrupted(Path(path))
    return replacing(Path(path), is_dir=True)
