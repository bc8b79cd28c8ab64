"""Shared fixtures. The whole session uses a private cache, so the tiny model and the default calibration set
are built from scratch exactly as on a fresh machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# A second copy of this module (`import tests.conftest`) would switch the session to a second cache midway.
assert __name__ == "conftest", "import shared test helpers as `from conftest import ...`"
CACHE = tempfile.mkdtemp(prefix="visprune-test-cache-")
os.environ["VISPRUNE_CACHE"] = CACHE

REPO = Path(__file__).resolve().parents[1]


def pytest_unconfigure(config):
    """The private cache (~17 MB) goes with the session: CI machines run the suite many times on one disk."""
    shutil.rmtree(CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    from visprune.models import load_llava

    return load_llava("tiny")


@pytest.fixture(scope="session")
def default_set():
    from calibrate.data import default_calibration_set

    return default_calibration_set()


@pytest.fixture(scope="session")
def default_states(tiny, default_set):
    from calibrate.stage import prepare_samples

    return prepare_samples(tiny, default_set, batch_size=8)


@pytest.fixture(scope="session")
def default_search(tiny, default_states):
    """RecipeSearch over the 64-sample default set with its reference pass done (shared, read-only use)."""
    from calibrate.replay import DecoderReplay
    from calibrate.search import RecipeSearch

    search = RecipeSearch(DecoderReplay(tiny.model), default_states, tiny.shape, batch_size=8)
    search.run_reference_pass()
    return search


@pytest.fixture(scope="session")
def small_states(default_states):
    """Eight samples of the default set, for checks that replay the model several times."""
    return default_states[::8]


def make_search(tiny, states, **kwargs):
    from calibrate.replay import DecoderReplay
    from calibrate.search import RecipeSearch

    search = RecipeSearch(DecoderReplay(tiny.model), states, tiny.shape, **kwargs)
    search.run_reference_pass()
    return search


def snapshot(*roots) -> dict[str, str | None]:
    """Every path under the roots (the roots too) with its content hash (files) or None (folders): equal
    snapshots before and after a command mean it lost, changed and left nothing there."""
    import hashlib

    state = {}
    for root in map(Path, roots):
        for path in [root, *root.rglob("*")] if root.exists() else []:
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return state


def reseal_manifest(path: Path, change) -> None:
    """Apply `change` to the manifest JSON at `path` and seal it again: an artifact that visprune could have written
    this way (e.g. an engine of another model), not a tampered one."""
    import json

    from visprune.manifests.common import seal

    data = json.loads(path.read_text())
    change(data)
    if "onnx_set" in data:
        data["onnx_set"] = seal(data["onnx_set"])
    path.write_text(json.dumps(seal(data)))


# A realistic calibrated recipe for tiny (60 % on the default set), written down so fixtures need no search.
TINY_RECIPE_60 = [143, 101, 44, 41, 18, 28, 0, 0]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny):
    """Pruned and unpruned ONNX sets and ORT engines of tiny, exported once per session, the unpruned one in a
    second process meanwhile as `visprune pipeline` does (`tiny` is built first, so the two do not race)."""
    import json

    from exporter import ExportConfig
    from workflows.end_to_end import _export_and_build
    from two_processes import run_in_two_processes

    root = tmp_path_factory.mktemp("exported")
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60}))
    paths = {name: root / f"{name}-engine" for name in ("pruned", "unpruned")}
    paths.update({f"{name}-onnx": root / f"{name}-onnx" for name in ("pruned", "unpruned")}, recipe=recipe)
    def job(name: str, config: ExportConfig):
        return _export_and_build, (config, "onnxruntime", paths[f"{name}-onnx"], paths[name])

    run_in_two_processes([job("pruned", ExportConfig(model="tiny", recipe=recipe))],
                         [job("unpruned", ExportConfig(model="tiny"))])
    return paths


@pytest.fixture(scope="session")
def tiny_vqa_engines(tmp_path_factory):
    """tiny-vqa's unpruned ONNX Runtime engine and its DivPrune 60 % one (recipe from the library's calibrate),
    default configs, built once per session, the unpruned one in a second process meanwhile."""
    from calibrate import CalibrationConfig, calibrate
    from two_processes import export_and_build, run_in_two_processes

    root = tmp_path_factory.mktemp("tiny-vqa-engines")
    recipe = root / "divprune-60.json"
    calibrate(CalibrationConfig(model="tiny-vqa", method="divprune", reduction=0.6, device="cpu"), recipe,
              plot=False, progress=False)
    run_in_two_processes([(export_and_build, (recipe, root / "divprune-60", "tiny-vqa"))],
                         [(export_and_build, (None, root / "unpruned", "tiny-vqa"))])
    return {"unpruned": root / "unpruned" / "engine", "divprune-60": root / "divprune-60" / "engine",
            "recipe": recipe}


# ---- the pruned prefill module on tiny: one question about two images -------------------------------------


@pytest.fixture(scope="session")
def two_prompts(tiny, default_set):
    """inputs_embeds [2, S, D] of one question about two images (same layout), the image's start, and the
    vision graph's [CLS] scores [2, N]."""
    import torch

    from exporter.graphs import VisionFeatures
    from visprune.models import chat_prompt, encode_image_prompt, load_image

    prompt = chat_prompt(tiny.processor, "What is in the picture?")
    rows, scores, start = [], [], None
    for sample in default_set.samples[:2]:
        encoded = encode_image_prompt(tiny.processor, load_image(sample.image), prompt, tiny.image_token_id)
        with torch.no_grad():
            hidden = tiny.model.get_input_embeddings()(encoded.input_ids)
            features, score = VisionFeatures(tiny.model, cls_scores=True)(encoded.pixel_values)
        hidden[:, encoded.image_start:encoded.image_start + 576] = features
        rows.append(hidden[0])
        scores.append(score[0])
        start = encoded.image_start
    return torch.stack(rows), start, torch.stack(scores)


def plain_forward(model, hidden, positions):
    """The unpruned decoder over the given rows [B, S, D] at the given positions [B, S]: last logits and every
    layer's K/V."""
    from visprune.models.decoder import attend, causal_blocked, finish_layer

    lm = model.model.language_model
    kv = []
    for layer in lm.layers:
        context, _, key, value = attend(layer, lm.rotary_emb, hidden, positions, blocked=causal_blocked(hidden.shape[1]))
        kv += [key, value]
        hidden = finish_layer(layer, hidden, context)
    return model.lm_head(lm.norm(hidden[:, -1])), kv
