"""`export_onnx(config, out_dir)`: the export stage, from checkpoint + recipe to a linted, self-describing ONNX set.

The set holds vision.onnx, prefill.onnx (the recipe baked in), decode.onnx, embed_tokens.npy (the token
embedding matrix, so the runtime needs no PyTorch), processor/ (the checkpoint's own tokenizer, chat template
and image processor) and manifest.json. It is written into a staging folder and renamed into place only when
every graph exported and passed the lint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibrate.recipe import Recipe, check_recipe_fits, counts_at, load_recipe, unpruned_recipe
from exporter.config import ExportConfig
from exporter.graphs import KERNELS, export_decode, export_prefill, export_vision
from exporter.lint import lint_onnx
from visprune.artifacts import tool_versions
from visprune.dtypes import host_dtype, torch_dtype
from visprune.errors import ConfigError, ExportError
from visprune.manifests.common import digest_files, sealed, write_model
from visprune.manifests.onnx_set import (
    ANYRES_NEWLINE_FILE,
    MANIFEST_FILE,
    AnyresLayout,
    Embeddings,
    GraphIO,
    ModelRef,
    OnnxSetManifest,
    PromptLayout,
    RecipeSummary,
    kv_stages_of,
)
from visprune.models import LlavaBundle, chat_prompt, encode_image_prompt, load_llava
from visprune.models.llava import LanguageModelShape, model_folder
from visprune.outputs import ONNX_SET, check_output, replacing
from visprune.tensor_names import GRAPH_NAMES


@dataclass
class ExportResult:
    out_dir: Path
    manifest: OnnxSetManifest


def export_onnx(config: ExportConfig, out_dir: Path, progress: bool = True, force: bool = False) -> ExportResult:
    """Export the vision, pruned prefill and decode graphs of `config.model` with `config.recipe` baked in.

    `out_dir` is checked before any work (visprune/outputs.py; `force` replaces what is not an ONNX set); the set
    is written into a staging folder and swapped in only when every graph exported and passed the lint.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_output(out_dir, ONNX_SET, inputs=[config.recipe, model_folder(config.model)], force=force)
    recipe = load_recipe(config.recipe) if config.recipe else None
    bundle = load_llava(config.model, device="cpu", dtype=torch_dtype(config.dtype))
    recipe = recipe or unpruned_recipe(bundle.shape)
    check_recipe_fits(recipe, bundle.shape, bundle.fingerprint, bundle.name, config.allow_other_model)
    config = replace(config, max_seq=config.max_seq or default_max_seq(bundle.shape))
    image_start = template_image_start(bundle)
    check_max_seq_fits(config.max_seq, image_start, bundle.shape.num_visual_tokens)
    with replacing(out_dir) as staging:
        for graph in _progress(GRAPH_NAMES, progress):
            _export_graph(graph, bundle, recipe, image_start, config, staging / f"{graph}.onnx")
        lint_exported_set(staging, recipe)
        embeddings = bundle.model.get_input_embeddings().weight.detach().float().numpy()
        np.save(staging / "embed_tokens.npy", embeddings.astype(host_dtype(config.dtype)))
        if bundle.shape.anyres:  # the host packs it after each grid row (visprune/models/anyres.py)
            newline = bundle.model.model.image_newline.detach().float().numpy()
            np.save(staging / ANYRES_NEWLINE_FILE, newline.astype(host_dtype(config.dtype)))
        bundle.processor.save_pretrained(staging / "processor")
        manifest = _manifest(config, bundle, recipe, image_start, staging, time.perf_counter() - start)
        write_model(staging / MANIFEST_FILE, manifest)
    return ExportResult(out_dir=out_dir, manifest=manifest)


def template_image_start(bundle: LlavaBundle) -> int:
    """Where the chat template puts the image: a property of the template and tokenizer, baked into prefill."""
    from PIL import Image

    size = bundle.config.vision_config.image_size
    blank = Image.new("RGB", (size, size))
    return encode_image_prompt(bundle.processor, blank, chat_prompt(bundle.processor, "?"), bundle.image_token_id).image_start


def default_max_seq(shape: LanguageModelShape) -> int:
    """--max-seq when none is given: 2048 for LLaVA-1.5 (576 image tokens); LLaVA-NeXT's images alone bring up to
    2928, so 4096 there (llava-v1.6-vicuna's context)."""
    return 4096 if shape.anyres else 2048


def check_max_seq_fits(max_seq: int, image_start: int, num_visual_tokens: int) -> None:
    """ConfigError unless max_seq holds the shortest prompt (text, the image, one token after it) plus one
    generated token; checked before tracing, which would otherwise fail deep inside torch.export."""
    minimum = image_start + num_visual_tokens + 2
    if max_seq < minimum:
        raise ConfigError(f"--max-seq {max_seq} is too short for this model's prompts: {image_start} template "
                          f"tokens and {num_visual_tokens} image tokens come before any question, so the shortest "
                          f"prompt plus one generated token needs {minimum}.",
                          f"Pass --max-seq {minimum} or more; 2048 (the default) fits typical questions and answers.")


def lint_exported_set(folder: Path, recipe: Recipe) -> None:
    """Run the TensorRT-readiness lint on every graph; one error lists every violation."""
    stages = kv_stages_of(recipe.removed)
    violations = [v for graph in GRAPH_NAMES
                  for v in lint_onnx(folder / f"{graph}.onnx", stages if graph != "vision" else None,
                                     _unfused_attention_allowed(graph, recipe))]
    if violations:
        listing = "\n".join(f"  - {v}" for v in violations)
        raise ExportError(f"The exported graphs are not TensorRT-ready ({len(violations)} problems):\n{listing}",
                          "This is a visprune bug unless you changed the export code; please report it with the list.")


def _unfused_attention_allowed(graph: str, recipe: Recipe) -> int | None:
    """Attentions that may compute context from explicit probabilities: none in the language model (a FitPrune
    layer's score is computed beside its fused attention); the vision tower keeps the checkpoint's own attention
    and is not checked."""
    return None if graph == "vision" else 0


def _export_graph(graph: str, bundle: LlavaBundle, recipe: Recipe, image_start: int, config: ExportConfig,
                  out: Path) -> None:
    if graph == "vision":
        export_vision(bundle.model, recipe, out, config.opset)
    elif graph == "prefill":
        export_prefill(bundle.model, recipe, image_start, config.max_seq, out, config.opset, KERNELS[config.target])
    else:
        export_decode(bundle.model, recipe, image_start, config.max_seq, out, config.opset, KERNELS[config.target])


def _manifest(config: ExportConfig, bundle: LlavaBundle, recipe: Recipe, image_start: int, folder: Path,
              seconds: float) -> OnnxSetManifest:
    tokenizer = bundle.processor.tokenizer
    return sealed(
        OnnxSetManifest,
        model=ModelRef(name=bundle.name, path=str(bundle.path.resolve()), fingerprint=bundle.fingerprint),
        recipe=RecipeSummary(sha256=recipe.content_hash(), method=recipe.method, removed=list(recipe.removed),
                             keep=recipe.keep, num_visual_tokens=recipe.num_visual_tokens, seed=recipe.seed,
                             removed_before_llm=recipe.removed_before_llm, budget_policy=recipe.budget_policy),
        prompt=PromptLayout(image_start=image_start, num_visual_tokens=bundle.shape.num_visual_tokens,
                            max_seq=config.max_seq, image_token_id=bundle.image_token_id,
                            eos_token_id=tokenizer.eos_token_id),
        dtype=config.dtype,
        target=config.target,
        language_model=bundle.shape,  # what FLOPs figures downstream need
        kv_stages=kv_stages_of(recipe.removed),
        graphs={graph: GraphIO(file=f"{graph}.onnx", **describe_io(folder / f"{graph}.onnx")) for graph in GRAPH_NAMES},
        embeddings=Embeddings(file="embed_tokens.npy", shape=list(bundle.model.get_input_embeddings().weight.shape)),
        processor="processor",
        anyres=_anyres_layout(bundle, recipe),
        config=config.to_dict(),
        tools=tool_versions("torch", "transformers", "onnx", "onnxscript"),
        export_seconds=round(seconds, 2),
        files=digest_files(folder, exclude=(MANIFEST_FILE,)),
    )


def _anyres_layout(bundle: LlavaBundle, recipe: Recipe) -> AnyresLayout | None:
    if not bundle.shape.anyres:
        return None
    fewest, most = bundle.shape.visual_token_range
    return AnyresLayout(image_newline=ANYRES_NEWLINE_FILE, image_grid_pinpoints=bundle.config.image_grid_pinpoints,
                        visual_token_range=[fewest, most], min_image_tokens=min_image_tokens(recipe, fewest, most))


def min_image_tokens(recipe: Recipe, fewest: int, most: int) -> int:
    """The smallest N in [fewest, most] an image can run this recipe with (calibrate.recipe.check_image_fits);
    ConfigError if none can."""
    before, removed = counts_at(recipe, recipe.num_visual_tokens)
    first = before or next((count for count in removed if count), 0)
    smallest = max(fewest, recipe.num_visual_tokens - first) if recipe.budget_policy == "absolute" else fewest
    if smallest > most:
        raise ConfigError(f"The recipe's absolute budget keeps {smallest} visual tokens at its first cut, more than "
                          f"any image of this model brings ({most}).", "Lower the kept counts of the recipe.")
    return smallest


def describe_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and dims (numbers or symbolic names) of a graph's inputs and outputs, read from the file."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}

    return {"inputs": [describe(v) for v in graph.input], "outputs": [describe(v) for v in graph.output]}


def _progress(items, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc="exporting graphs", disable=not enabled)
