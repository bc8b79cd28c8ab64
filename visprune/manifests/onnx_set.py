"""The ONNX set's manifest (`manifest.json`, written by `visprune export`), its schema and its one reader.

Beyond each field's type and range, the parts are checked together: a recipe's `removed` has one count per layer
of the language model, the graphs have exactly the inputs and outputs that recipe implies, each layer's past KV
has its own stage's length dim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from visprune.backends import EXPORT_TARGETS
from visprune.dtypes import DTYPES
from visprune.manifests import schema_ids
from visprune.manifests.common import (
    check_artifact_kind,
    FileDigest,
    NonNegInt,
    PosInt,
    RelativeFile,
    Sha256,
    Strict,
    check_files,
    read_sealed,
)
from visprune.methods import METHOD_NAMES, method
from visprune.models.llava import LanguageModelShape
from visprune.tensor_names import (
    GRAPH_NAMES,
    graph_io_names,
    input_dim_names,
    kv_names,
    past_len_dim,
    pruning_layers,
)

SCHEMA = schema_ids.ONNX_SET
MANIFEST_FILE = SCHEMA.file
ONNX_HINT = "Export it again with `visprune export ...`."


class ModelRef(Strict):
    name: str
    path: str
    fingerprint: Sha256


class RecipeSummary(Strict):
    """What the engines need of the recipe an ONNX set was exported with (its full hash for provenance)."""

    sha256: Sha256
    method: Literal[METHOD_NAMES]
    removed: list[NonNegInt]
    keep: list[NonNegInt]
    num_visual_tokens: PosInt
    seed: int | None = None
    removed_before_llm: NonNegInt = 0
    budget_policy: Literal["fixed", "ratio", "absolute"] = "fixed"  # calibrate/recipe.py: N per image (NeXT)

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



_RANGE = "visual_token_range"
_SHAPE_COUNTS = tuple(name for name in LanguageModelShape.__dataclass_fields__ if name != _RANGE)


def _token_range(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value)
            and 1 <= value[0] <= value[1]):
        raise ValueError(f"{_RANGE} must be [min_N, max_N] with 1 <= min_N <= max_N")
    return int(value[0]), int(value[1])


ANYRES_NEWLINE_FILE = "image_newline.npy"  # LLaVA-NeXT: the row-end embedding the host packs after each grid row


class AnyresLayout(Strict):
    """LLaVA-NeXT's anyres image handling, which runs on the host (visprune/models/anyres.py): the vision graph
    encodes the base view and the crops as a batch; the host unpads the grid and appends `image_newline` per row."""

    image_newline: RelativeFile
    image_grid_pinpoints: list[Annotated[list[PosInt], Field(min_length=2, max_length=2)]]  # [H, W] each
    visual_token_range: Annotated[list[PosInt], Field(min_length=2, max_length=2)]  # [fewest, most] N per image
    # the fewest an image may bring for this recipe: more than its first cut keeps under an `absolute` budget
    min_image_tokens: PosInt


class OnnxSetManifest(Strict):
    schema_: Literal[SCHEMA.name] = Field(SCHEMA.name, alias="schema")
    schema_version: Literal[SCHEMA.version] = SCHEMA.version
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
    anyres: AnyresLayout | None = None  # LLaVA-NeXT sets only
    config: dict[str, Any]
    tools: dict[str, str]
    export_seconds: Annotated[float, Field(ge=0.0)]
    files: dict[RelativeFile, FileDigest]
    manifest_sha256: Sha256

    @field_validator("language_model", mode="before")
    @classmethod
    def _shape_from_dict(cls, value: Any) -> Any:
        """The FLOPs model's own dataclass, from a dict of exactly its fields, each a positive integer; the
        LLaVA-NeXT-only `visual_token_range` ([min_N, max_N]) may be absent (LLaVA-1.5 manifests omit it)."""
        if not isinstance(value, dict):
            return value
        counts = {k: v for k, v in value.items() if k != _RANGE}
        if set(counts) != set(_SHAPE_COUNTS) or not all(type(v) is int and v >= 1 for v in counts.values()):
            raise ValueError(f"must hold exactly {', '.join(_SHAPE_COUNTS)}, each a positive integer, "
                             f"and optionally {_RANGE}")
        return LanguageModelShape(**counts, visual_token_range=_token_range(value.get(_RANGE)))

    @field_serializer("language_model")
    def _shape_to_dict(self, shape: LanguageModelShape) -> dict[str, Any]:
        """LLaVA-1.5 manifests stay as they were: `visual_token_range` is written only for NeXT."""
        body = {name: getattr(shape, name) for name in LanguageModelShape.__dataclass_fields__}
        if body[_RANGE] is None:
            del body[_RANGE]
        else:
            body[_RANGE] = list(body[_RANGE])
        return body

    @model_validator(mode="after")
    def _parts_agree(self) -> "OnnxSetManifest":
        lm, recipe, prompt = self.language_model, self.recipe, self.prompt
        if not len(recipe.removed) == lm.num_layers == len(self.kv_stages):
            raise ValueError(f"recipe.removed has {len(recipe.removed)} counts and kv_stages {len(self.kv_stages)}; "
                             f"the language model has {lm.num_layers} layers")
        if not prompt.num_visual_tokens == lm.num_visual_tokens or (
                recipe.budget_policy == "fixed" and recipe.num_visual_tokens != lm.num_visual_tokens):
            raise ValueError("recipe, prompt and language_model disagree on num_visual_tokens")
        if (self.anyres is None) != (recipe.budget_policy == "fixed"):
            raise ValueError("an anyres (LLaVA-NeXT) set needs a NeXT recipe (budget_policy ratio or absolute), and "
                             "only it")
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
    return graph_io_names(graph, list(recipe.removed), recipe.removed_before_llm, method(recipe.method).vision_score,
                          recipe.budget_policy != "fixed")


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



def read_onnx_set(onnx_dir: Path, verify: bool = False) -> OnnxSetManifest:
    """The ONNX set's manifest after checking its schema, seal, fields and files (hashes: see check_files)."""
    from visprune.outputs import ONNX_SET

    check_artifact_kind(onnx_dir, ONNX_SET, ONNX_HINT)
    manifest = read_sealed(OnnxSetManifest, onnx_dir, SCHEMA, "ONNX set", ONNX_HINT)
    check_files(onnx_dir, manifest.files, manifest.manifest_sha256, "ONNX set", ONNX_HINT, verify)
    return manifest
