"""The typed schemas of the artifacts the stages hand to each other, and the one reader of each.

- `OnnxSetManifest`: `manifest.json` of an ONNX set (`visprune export`);
- `EngineManifest`: `engine.json` of an engine folder (`visprune build`);
- `ParityReport`, `LatencyReport`, `EvalReport`: the reports' JSON files.
The recipe's schema is `calibrate.recipe.Recipe`, its reader `calibrate.recipe.load_recipe`.

Every field is type- and range-checked (pydantic, strict: `true` is not a count, `"3"` is not a number) and the
fields that must agree are checked together (a recipe's `removed` has one count per layer of the language model,
the graphs have exactly the inputs and outputs that recipe implies, ...). Manifests are sealed: `manifest_sha256`
is the hash of everything else in them, so an edited manifest is refused instead of building or running
something other than what was exported. They also record the size and sha256 of every file in their folder
(`files`); sizes are checked at every load, hashes at the first load of a folder's current files (a stamp in the
cache remembers it) or whenever `verify` is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visprune.methods import METHOD_NAMES, method
from visprune.artifacts import canonical_json, sha256_bytes, sha256_file
from visprune.errors import ArtifactMismatchError
from visprune.models.cache import cache_root
from visprune.models.llava import LanguageModelShape
from visprune.tensor_names import (
    GRAPH_NAMES,
    graph_io_names,
    input_dim_names,
    kv_names,
    past_len_dim,
    pruning_layers,
)

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Sha256 = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _inside_folder(name: str) -> str:
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError("must be a relative path inside the artifact folder")
    return name


RelativeFile = Annotated[str, AfterValidator(_inside_folder)]
DTYPES = ("float32", "float16", "bfloat16")
# Export targets (flavours) -> their default opset. "tensorrt": standard opset-18 ops only, attention in the
# pre-scaled MatMul -> Softmax -> MatMul form TensorRT fuses; every backend runs it. "onnxruntime": opset 23's
# Attention, RMSNormalization and RotaryEmbedding, which ONNX Runtime runs as fused kernels and TensorRT's parser
# does not promise. exporter/graphs.py maps each to its decoder kernels.
EXPORT_TARGETS = {"onnxruntime": 23, "tensorrt": 18}
TARGET_BACKENDS = {"onnxruntime": ("onnxruntime", "pytorch"), "tensorrt": ("tensorrt", "onnxruntime", "pytorch")}
METHODS = METHOD_NAMES  # the registry (visprune/methods.py)
BACKENDS = ("onnxruntime", "tensorrt", "pytorch")
ONNX_SET_SCHEMA = ("visprune.onnx_set", 3)  # 3: batched graphs (image_starts, pad_lengths inputs)
ENGINE_SET_SCHEMA = ("visprune.engine_set", 4)  # 4: the PyTorch engine's static shapes


class Strict(BaseModel):
    """Strict types, unknown keys ignored (a newer minor writer may add some), read-only."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


# --- the ONNX set ------------------------------------------------------------------------------------------------


class ModelRef(Strict):
    name: str
    path: str
    fingerprint: Sha256


class RecipeSummary(Strict):
    """What the engines need of the recipe an ONNX set was exported with (its full hash for provenance)."""

    sha256: Sha256
    method: Literal[METHODS]
    removed: list[NonNegInt]
    keep: list[NonNegInt]
    num_visual_tokens: PosInt
    seed: int | None = None
    removed_before_llm: NonNegInt = 0

    @model_validator(mode="after")
    def _counts_agree(self) -> "RecipeSummary":
        keep, left = [], self.num_visual_tokens - self.removed_before_llm
        for removed in self.removed:
            left -= removed
            keep.append(left)
        if self.keep != keep or (keep and keep[-1] < 1):
            raise ValueError("keep must be num_visual_tokens minus the running sum of removed, and stay >= 1")
        if method(self.method).needs_seed and self.seed is None:
            raise ValueError(f"a {self.method} recipe needs a seed")
        if (self.removed_before_llm > 0) != method(self.method).pre_llm:
            raise ValueError(f"removed_before_llm is {self.removed_before_llm}, which method {self.method} contradicts")
        return self

    @property
    def pruning_layers(self) -> list[int]:
        """Where tokens go: PRE_LLM (-1) for before the first layer, then decoder layer indices."""
        return pruning_layers(self.removed, self.removed_before_llm)


class PromptLayout(Strict):
    image_start: NonNegInt  # the chat template's image position; each request brings its own (image_starts)
    num_visual_tokens: PosInt
    max_seq: PosInt
    image_token_id: NonNegInt
    eos_token_id: NonNegInt


class TensorSpec(Strict):
    name: str
    dtype: str
    shape: list[NonNegInt | str]  # sizes, or the names of dynamic dims


class GraphIO(Strict):
    file: RelativeFile
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def spec(self, name: str) -> TensorSpec:
        return next(v for v in (*self.inputs, *self.outputs) if v.name == name)


class Embeddings(Strict):
    file: RelativeFile
    shape: Annotated[list[PosInt], Field(min_length=2, max_length=2)]  # [V, D]


class FileDigest(Strict):
    bytes: NonNegInt
    sha256: Sha256


class OnnxSetManifest(Strict):
    schema_: Literal["visprune.onnx_set"] = Field(alias="schema")
    schema_version: Literal[ONNX_SET_SCHEMA[1]]
    model: ModelRef
    recipe: RecipeSummary
    prompt: PromptLayout
    dtype: Literal[DTYPES]
    target: Literal[tuple(EXPORT_TARGETS)] = "tensorrt"  # sets from before targets were standard opset 18
    language_model: LanguageModelShape
    kv_stages: list[NonNegInt]
    graphs: dict[Literal[GRAPH_NAMES], GraphIO]
    embeddings: Embeddings
    processor: RelativeFile
    config: dict[str, Any]
    tools: dict[str, str]
    export_seconds: Annotated[float, Field(ge=0.0)]
    files: dict[RelativeFile, FileDigest]
    manifest_sha256: Sha256

    @field_validator("language_model", mode="before")
    @classmethod
    def _shape_from_dict(cls, value: Any) -> Any:
        """The FLOPs model's own dataclass, from a dict of exactly its fields, each a positive integer."""
        fields = LanguageModelShape.__dataclass_fields__
        if not isinstance(value, dict):
            return value
        if set(value) != set(fields) or not all(type(v) is int and v >= 1 for v in value.values()):
            raise ValueError(f"must hold exactly {', '.join(fields)}, each a positive integer")
        return LanguageModelShape(**value)

    @model_validator(mode="after")
    def _parts_agree(self) -> "OnnxSetManifest":
        lm, recipe, prompt = self.language_model, self.recipe, self.prompt
        if not len(recipe.removed) == lm.num_layers == len(self.kv_stages):
            raise ValueError(f"recipe.removed has {len(recipe.removed)} counts and kv_stages {len(self.kv_stages)}; "
                             f"the language model has {lm.num_layers} layers")
        if not recipe.num_visual_tokens == prompt.num_visual_tokens == lm.num_visual_tokens:
            raise ValueError("recipe, prompt and language_model disagree on num_visual_tokens")
        if self.kv_stages != kv_stages_of(recipe.removed):
            raise ValueError("kv_stages do not follow from recipe.removed")
        if prompt.max_seq < prompt.image_start + prompt.num_visual_tokens + 1:
            raise ValueError("prompt.max_seq is shorter than the shortest prompt")
        if self.embeddings.shape[1] != lm.hidden_size or max(prompt.image_token_id, prompt.eos_token_id) >= \
                self.embeddings.shape[0]:
            raise ValueError("embeddings.shape does not fit the language model's hidden size and token ids")
        _check_graph_io(self.graphs, recipe)
        _check_input_dims(self.graphs, self.kv_stages)
        return self

    @property
    def num_layers(self) -> int:
        return self.language_model.num_layers

    def io_shape(self, graph: str, name: str) -> list[int | str]:
        return self.graphs[graph].spec(name).shape


def recipe_io_names(graph: str, recipe: Any) -> tuple[list[str], list[str]]:
    """`graph_io_names` for a recipe (a Recipe or a RecipeSummary): its counts and its method's vision score."""
    return graph_io_names(graph, list(recipe.removed), recipe.removed_before_llm, method(recipe.method).vision_score)


def kv_stages_of(removed: list[int]) -> list[int]:
    """Stage of each layer's KV cache: how many pruning layers come before it."""
    stages, stage = [], 0
    for count in removed:
        stages.append(stage)
        stage += 1 if count else 0
    return stages


def _check_graph_io(graphs: dict[str, GraphIO], recipe: RecipeSummary) -> None:
    for graph in GRAPH_NAMES:
        if graph not in graphs:
            raise ValueError(f"graphs lacks {graph}")
        inputs, outputs = recipe_io_names(graph, recipe)
        if [v.name for v in graphs[graph].inputs] != inputs or [v.name for v in graphs[graph].outputs] != outputs:
            raise ValueError(f"graphs.{graph} does not have the inputs and outputs the recipe implies")


def _check_input_dims(graphs: dict[str, GraphIO], kv_stages: list[int]) -> None:
    """Inputs carry sizes >= 1 or known dynamic dims; each layer's past KV has its own stage's length dim."""
    names = input_dim_names(kv_stages)
    for graph, io in graphs.items():
        for spec in io.inputs:
            if any(dim not in names if isinstance(dim, str) else dim < 1 for dim in spec.shape):
                raise ValueError(f"graphs.{graph} input {spec.name} has shape {spec.shape}")
    past = kv_names("past", len(kv_stages))
    for index, spec in enumerate(graphs["decode"].inputs[3:]):
        length = past_len_dim(kv_stages[index // 2])
        if spec.name != past[index] or len(spec.shape) != 4 or spec.shape[2] != length:
            raise ValueError(f"graphs.decode input {spec.name} must be [batch, heads, {length}, head_dim]")


# --- the engine folder -----------------------------------------------------------------------------------------


class GpuIdentity(Strict):
    name: str
    compute_capability: str


class Limits(Strict):
    max_prompt_tokens: PosInt
    max_new_tokens: PosInt
    max_batch: PosInt = 1


class StaticShapesRecord(Strict):
    """The PyTorch engine's fixed shapes (runtime/static_torch_runner.py): prompts padded to a bucket, batches
    filled to a size; one compiled, CUDA-graph-captured prefill per (bucket, size) and one decode per size."""

    prompt_buckets: Annotated[list[PosInt], Field(min_length=1)]
    batch_sizes: Annotated[list[PosInt], Field(min_length=1)]
    cuda_graphs: bool

    @model_validator(mode="after")
    def _ascending(self) -> "StaticShapesRecord":
        for name in ("prompt_buckets", "batch_sizes"):
            values = getattr(self, name)
            if values != sorted(set(values)):
                raise ValueError(f"{name} must be strictly ascending")
        return self


class EngineManifest(Strict):
    schema_: Literal["visprune.engine_set"] = Field(alias="schema")
    schema_version: Literal[ENGINE_SET_SCHEMA[1]]
    backend: Literal[BACKENDS]
    device: Literal["cpu", "cuda"]
    upstream: dict[str, str]  # onnx_dir, manifest_sha256
    onnx_set: OnnxSetManifest
    config: dict[str, Any]
    tools: dict[str, str]
    files: dict[RelativeFile, FileDigest]
    manifest_sha256: Sha256
    tf32: bool  # float32 matmuls and convolutions may run in TF32 (CUDA, only when built with --allow-tf32)
    # onnxruntime
    providers: list[str] | None = None
    onnxruntime_version: str | None = None
    optimization_level: str | None = None
    session_options: dict[str, Any] | None = None  # intra_op_threads (0: one per core the process may use), spinning
    # tensorrt
    tensorrt_version: str | None = None
    gpu: GpuIdentity | None = None
    precision: str | None = None
    strongly_typed: bool | None = None
    limits: Limits | None = None
    profiles: dict[str, Any] | None = None
    kv_capacity: list[PosInt] | None = None
    # pytorch
    torch_compile: bool | None = None
    static_shapes: StaticShapesRecord | None = None
    compile_seconds: float | None = None

    @model_validator(mode="after")
    def _backend_facts_present(self) -> "EngineManifest":
        needed = {"onnxruntime": ("providers", "onnxruntime_version"),
                  "tensorrt": ("tensorrt_version", "gpu", "limits", "profiles", "kv_capacity"),
                  "pytorch": ("torch_compile", "static_shapes", "limits", "kv_capacity")}[self.backend]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.backend} engine needs {', '.join(missing)}")
        if self.kv_capacity is not None and len(self.kv_capacity) != self.onnx_set.num_layers:
            raise ValueError("kv_capacity needs one length per layer")
        if self.providers is not None and not self.providers:
            raise ValueError("providers is empty")
        if self.static_shapes and (self.static_shapes.prompt_buckets[-1] != self.limits.max_prompt_tokens or
                                   self.static_shapes.batch_sizes[-1] != self.limits.max_batch):
            raise ValueError("static_shapes' largest bucket and batch size must be the limits")
        return self


# --- reports -----------------------------------------------------------------------------------------------------


class EngineVsReference(Strict):
    passed: bool
    failures: list[str]
    criteria: dict[str, float]
    reference: dict[str, str]  # device, dtype
    tolerance: Annotated[float, Field(ge=0.0)]  # the logits atol floor; each step's own atol: cases[].logits_atol
    near_tie_factor: Annotated[float, Field(ge=0.0)]  # a top-1 flip fails only above this many step atols of margin
    max_abs_logits_error: Annotated[float, Field(ge=0.0)]  # over every step, judged or not
    max_logits_error_over_atol: Annotated[float, Field(ge=0.0)] | None  # over judged steps; None: none judged
    logits_judged_prompts: NonNegInt  # prompts whose kept sets agree, so their logits were judged
    min_kept_overlap: Fraction
    max_kept_mismatches: NonNegInt  # most reference-kept indices of one layer that the engine did not keep
    tied_swaps: NonNegInt = 0  # swaps at a TopK tie (the reference's scores): counted as agreement
    min_teacher_forced_top1: Fraction
    decisive_flips: NonNegInt
    near_tie_flips: NonNegInt  # reported, not failed
    prompts: PosInt


class PrunedVsUnpruned(Strict):
    first_token_top1_agreement: Fraction
    mean_first_token_kl: float
    answer_exact_match_rate: Fraction


class ParityReport(Strict):
    schema_: Literal["visprune.parity_report"] = Field(alias="schema")
    schema_version: Literal[3]  # 3: per-step scaled logits atol, near-tie flips, logits_judged, kept mismatches
    engine: dict[str, str]
    engine_vs_reference: EngineVsReference
    pruned_vs_unpruned: PrunedVsUnpruned
    cases: list[dict[str, Any]]


class LatencyRatios(Strict):
    lm_flops_ratio: float
    visual_flops_ratio: float
    prefill_latency_ratio: float
    prefill_latency_over_flops: float
    prefill_speedup: float
    ttft_ratio: float
    decode_latency_ratio: float | None
    kv_bytes_ratio: float
    lm_flops_text_tokens: int


class LatencyReport(Strict):
    schema_: Literal["visprune.latency_report"] = Field(alias="schema")
    schema_version: Literal[2]
    request: dict[str, Any]
    engines: dict[Literal["pruned", "baseline"], dict[str, Any]]
    method: dict[str, Any]
    ratios: LatencyRatios


class TypeAccuracy(Strict):
    accuracy: Fraction
    n: NonNegInt
    ci95: list[Fraction]  # [low, high], the Wilson score interval (visprune/tasks/shapes_vqa.py)


class Accuracy(Strict):
    overall: Fraction
    n: PosInt
    ci95: list[Fraction]
    per_type: dict[str, TypeAccuracy]


class EvalReport(Strict):
    schema_: Literal["visprune.eval_report"] = Field(alias="schema")
    schema_version: Literal[1]
    subject: str
    path: str
    model: str
    task: str
    config: dict[str, Any]
    accuracy: Accuracy
    examples: list[dict[str, str]]


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


def read_sealed(model: type[Strict], folder: Path, filename: str, schema: tuple[str, int], what: str,
                hint: str) -> Any:
    """A folder's manifest: schema and version first (a clear message for old artifacts), then the seal, then
    every field."""
    where = Path(folder) / filename
    if not Path(folder).is_dir():
        raise ArtifactMismatchError(f"{folder} is not a folder (expected a visprune {what}).", hint)
    data = read_json(where, f"{what} manifest", hint)
    check_schema(data, schema, where, what, hint)
    if not is_sealed(data):
        raise ArtifactMismatchError(f"{where} was edited after visprune wrote it (its manifest_sha256 does not match "
                                    "its content).", f"Do not edit manifests; {hint[0].lower()}{hint[1:]}")
    return parse(model, data, str(where), hint)


def check_schema(data: Any, schema: tuple[str, int], where: Any, what: str, hint: str) -> None:
    if not isinstance(data, dict) or data.get("schema") != schema[0]:
        raise ArtifactMismatchError(f"{where} is not a visprune {what} manifest.", hint)
    if data.get("schema_version") != schema[1]:
        raise ArtifactMismatchError(f"{where} has schema version {data.get('schema_version')!r}; this visprune "
                                    f"reads version {schema[1]}.",
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

