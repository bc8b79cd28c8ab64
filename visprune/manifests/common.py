"""What every artifact schema shares: the strict base model, parsing with messages that list what is wrong,
sealing, and the size and sha256 of every file of an artifact folder.

Every field is type- and range-checked (pydantic, strict: `true` is not a count, `"3"` is not a number) and the
fields that must agree are checked together. Manifests are sealed: `manifest_sha256` is the hash of everything
else in them, so an edited manifest is refused instead of building or running something other than what was
exported. They also record the size and sha256 of every file in their folder (`files`); sizes are checked at
every load, hashes at the first load of a folder's current files (a stamp in the cache remembers it) or whenever
`verify` is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from visprune.artifacts import atomic_write_json, canonical_json, sha256_bytes, sha256_file
from visprune.errors import ArtifactMismatchError
from visprune.manifests.schema_ids import SchemaId
from visprune.models.cache import cache_root

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Sha256 = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
UNSEALED = "sha256:" + "0" * 64  # the placeholder a manifest carries while its seal is computed


def _inside_folder(name: str) -> str:
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError("must be a relative path inside the artifact folder")
    return name


RelativeFile = Annotated[str, AfterValidator(_inside_folder)]


class Strict(BaseModel):
    """Strict types, unknown keys ignored (a newer minor writer may add some), read-only."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


M = TypeVar("M", bound=Strict)


class FileDigest(Strict):
    bytes: NonNegInt
    sha256: Sha256


# --- writing ---------------------------------------------------------------------------------------------------


def sealed(schema: type[M], /, **fields: Any) -> M:
    """A manifest of type `schema` built from `fields` (typed parts or plain values; all but `manifest_sha256`),
    validated, then sealed: `manifest_sha256` becomes the hash of the JSON of all its other fields."""
    draft = schema(**fields, manifest_sha256=UNSEALED)
    return draft.model_copy(update={"manifest_sha256": seal(model_dump(draft))["manifest_sha256"]})


def write_model(path: Path, model: Strict) -> None:
    """A schema's JSON file, atomically, with the model's own key names."""
    atomic_write_json(path, model_dump(model))


# --- reading and sealing -----------------------------------------------------------------------------------------


def seal(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with `manifest_sha256`: the hash of all its other fields."""
    body = {k: v for k, v in body.items() if k != "manifest_sha256"}
    return {**body, "manifest_sha256": sha256_bytes(canonical_json(body))}


def is_sealed(data: dict[str, Any]) -> bool:
    return isinstance(data, dict) and seal(data).get("manifest_sha256") == data.get("manifest_sha256")


def parse(model: type, data: Any, where: str, hint: str, error: type = ArtifactMismatchError) -> Any:
    """`data` as `model` (a schema here, or a pydantic dataclass), or `error` listing (up to five of) the fields
    that are wrong and why."""
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data)
        if not isinstance(data, dict):  # strict dataclasses take their fields as arguments, not a dict
            raise error(f"{where} is not a JSON object.", hint)
        return model(**data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in x['loc']) or '(top level)'}: {x['msg']}" for x in e.errors()]
        listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise error(f"{where} is not a valid {model.__name__}: {listing}.", hint) from None


def read_json(path: Path, what: str, hint: str, error: type = ArtifactMismatchError) -> Any:
    """JSON from a file, with every way that can fail (missing, a folder, unreadable, not JSON) as `error`."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise error(f"No {what} at {path}.", hint) from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a {what} file.", hint) from None
    except OSError as e:
        raise error(f"Cannot read the {what} {path}: {e.strerror}.", hint) from None
    except ValueError as e:
        raise error(f"The {what} {path} is not valid JSON ({e}).", hint) from None


def read_sealed(model: type[M], folder: Path, schema: SchemaId, what: str, hint: str) -> M:
    """A folder's manifest (`schema.file`): schema and version first (a clear message for old artifacts), then the
    seal, then every field."""
    where = Path(folder) / schema.file
    if not Path(folder).is_dir():
        raise ArtifactMismatchError(f"{folder} is not a folder (expected a visprune {what}).", hint)
    data = read_json(where, f"{what} manifest", hint)
    check_schema(data, schema, where, what, hint)
    if not is_sealed(data):
        raise ArtifactMismatchError(f"{where} was edited after visprune wrote it (its manifest_sha256 does not match "
                                    "its content).", f"Do not edit manifests; {hint[0].lower()}{hint[1:]}")
    return parse(model, data, str(where), hint)


def check_schema(data: Any, schema: SchemaId, where: Any, what: str, hint: str) -> None:
    if not isinstance(data, dict) or data.get("schema") != schema.name:
        raise ArtifactMismatchError(f"{where} is not a visprune {what} manifest.", hint)
    if data.get("schema_version") != schema.version:
        raise ArtifactMismatchError(f"{where} has schema version {data.get('schema_version')!r}; this visprune "
                                    f"reads version {schema.version}.",
                                    f"It was written by another visprune version. {hint}")


# --- file digests ----------------------------------------------------------------------------------------------


def digest_files(folder: Path, exclude: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file below `folder`, except `exclude` (the manifest itself)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in exclude)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def check_files(folder: Path, files: dict[str, FileDigest], manifest_sha256: str, what: str, hint: str,
                verify: bool = False) -> None:
    """Sizes always; hashes when `verify` or when this folder's current files were not verified before."""
    folder = Path(folder)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ArtifactMismatchError(f"The {what} {folder} lacks {', '.join(missing)}.",
                                    f"The folder is incomplete. {hint}")
    for name, digest in files.items():
        path = folder / name
        if path.stat().st_size != digest.bytes:
            raise ArtifactMismatchError(f"{path} has {path.stat().st_size} bytes; the manifest recorded "
                                        f"{digest.bytes}.", f"The file was changed or truncated. {hint}")
    stamp = _verification_stamp(folder, files, manifest_sha256)
    if verify or not stamp.exists():
        _check_hashes(folder, files, hint)
        _write_stamp(stamp)


def _check_hashes(folder: Path, files: dict[str, FileDigest], hint: str) -> None:
    for name, digest in files.items():
        if sha256_file(folder / name) != digest.sha256:
            raise ArtifactMismatchError(f"{folder / name} does not have the content the manifest recorded "
                                        "(sha256 differs).", f"The file was changed or corrupted. {hint}")


def _verification_stamp(folder: Path, files: dict[str, FileDigest], manifest_sha256: str) -> Path:
    """A cache path naming this folder, its manifest and its files' current sizes and modification times: it
    exists once these exact files were hashed and matched."""
    state = [[name, (folder / name).stat().st_mtime_ns] for name in sorted(files)]
    key = sha256_bytes(canonical_json([str(folder.resolve()), manifest_sha256, state])).removeprefix("sha256:")
    return cache_root() / "verified" / key


def _write_stamp(stamp: Path) -> None:
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:  # a read-only cache only costs the hashing again next time
        pass


def model_dump(model: Strict) -> dict[str, Any]:
    """The JSON dict of a parsed model, with its original key names."""
    return model.model_dump(by_alias=True, mode="json")



def check_artifact_kind(folder: Path, expected: Any, fallback_hint: str) -> None:
    """ArtifactMismatchError naming what `folder` is when it holds another visprune artifact: an ONNX set where
    an engine belongs (or the reverse) is a mix-up with its own fix, not a broken artifact to make again."""
    from visprune.outputs import ENGINE_SET, ONNX_SET, artifact_kind_at

    found = artifact_kind_at(Path(folder)) if Path(folder).is_dir() else None
    if found is None or found is expected:
        return
    if (found, expected) == (ONNX_SET, ENGINE_SET):
        hint = f"Build an engine from it with `visprune build --onnx {folder} --out ENGINE` and pass that engine."
    elif (found, expected) == (ENGINE_SET, ONNX_SET):
        hint = "Pass the ONNX set this engine was built from (`visprune export` writes one), not the engine."
    else:
        hint = fallback_hint
    article = "an" if expected.name[0] in "aeiouAEIOU" else "a"
    raise ArtifactMismatchError(f"{folder} is a visprune {found.name} (written by `{found.command}`), not "
                                f"{article} {expected.name}.", hint)
