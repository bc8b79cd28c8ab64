"""Seeded fuzzing of the three artifacts the stages hand on: a recipe, an ONNX-set manifest and an engine manifest.

Each mutation (a key dropped, a value replaced by null, a bool, a negative or huge number, a string, a list or an
object, a list shortened or lengthened, a number nudged) goes through the artifact's loader and the first thing
the next stage does with it. Only the project's typed errors may come out, each with a hint; never another
exception. Most manifest mutations are sealed again (as if visprune had written them), so that the field checks
are what catches them, not only the seal.
"""

import copy
import json
import random
import shutil

import pytest

from conftest import TINY_RECIPE_60
from visprune.errors import VispruneError

MUTATIONS = 300
REPLACEMENTS = [None, True, False, -1, 0, 1, 10**12, 1.5, -0.5, "", "x", "sha256:" + "0" * 64, [], [1], {}, {"a": 1}]


def paths(node, prefix=()):
    """Every path to a value in a JSON tree."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from paths(child, (*prefix, key))


def mutate(data, rng):
    data = copy.deepcopy(data)
    path = rng.choice(list(paths(data))[1:])
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    operator = rng.randrange(5)
    if operator == 0 and isinstance(parent, dict):
        del parent[key]
    elif operator == 1 and isinstance(value, list):
        parent[key] = value[:-1] if value and rng.random() < 0.5 else value + value[-1:] or [0]
    elif operator == 2 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = value + rng.choice([-1, 1, -value - 1])
    else:
        parent[key] = copy.deepcopy(rng.choice(REPLACEMENTS))
    return data, ".".join(map(str, path))


def run_fuzz(base, load_and_use, seed):
    rng, outcomes = random.Random(seed), {"accepted": 0, "rejected": 0}
    for _ in range(MUTATIONS):
        data, where = mutate(base, rng)
        try:
            load_and_use(data, rng)
        except VispruneError as e:
            assert e.hint, where
            outcomes["rejected"] += 1
        except Exception as e:  # pragma: no cover - the failure this test exists to find
            pytest.fail(f"mutating {where} raised {type(e).__name__}: {e}")
        else:
            outcomes["accepted"] += 1
    return outcomes


def test_recipe_mutations_give_only_recipe_errors(tiny):
    from calibrate.recipe import Recipe, achieved_reductions, check_recipe_fits, recipe_from_dict

    base = Recipe("fitprune", 576, list(TINY_RECIPE_60), reduction_target=0.6, alpha=0.3, seed=0,
                  model={"name": "tiny", "fingerprint": tiny.fingerprint, "dtype": "float32"},
                  calibration={"num_samples": 64, "mean_text_tokens": 20.0}).to_dict()

    def load_and_use(data, rng):  # what `visprune export` and `visprune recipe --model` do first
        recipe = recipe_from_dict(data, "fuzzed recipe")
        check_recipe_fits(recipe, tiny.shape, tiny.fingerprint)
        achieved_reductions(recipe, tiny.shape, 20.0)

    outcomes = run_fuzz(base, load_and_use, seed=1)
    print(f"fuzz seed 1: {outcomes}")  # the closing note quotes these (pytest -s)
    assert outcomes["rejected"] >= MUTATIONS // 2, outcomes


def write_manifest(path, data, rng, nested=None):
    from visprune.manifests.common import seal

    if rng.random() < 0.8 and isinstance(data, dict):  # most are sealed again: the field checks must catch them
        if nested and isinstance(data.get(nested), dict):
            data[nested] = seal(data[nested])
        data = seal(data)
    path.write_text(json.dumps(data))


def test_onnx_set_manifest_mutations_give_only_typed_errors(exported, tmp_path):
    from visprune.manifests.onnx_set import read_onnx_set
    from engines.profiles import derive_profiles

    folder = tmp_path / "onnx"
    shutil.copytree(exported["pruned-onnx"], folder)
    base = json.loads((folder / "manifest.json").read_text())

    def load_and_use(data, rng):  # what `visprune build` does first (profiles: the TensorRT path)
        write_manifest(folder / "manifest.json", data, rng)
        derive_profiles(read_onnx_set(folder), max_prompt_tokens=1024, max_new_tokens=256)

    outcomes = run_fuzz(base, load_and_use, seed=2)
    print(f"fuzz seed 2: {outcomes}")  # the closing note quotes these (pytest -s)
    assert outcomes["rejected"] >= MUTATIONS * 3 // 4, outcomes


def test_engine_manifest_mutations_give_only_typed_errors(exported, tmp_path):
    import numpy as np

    from visprune.manifests.engine_set import read_engine_set
    from runtime.pipeline import Pipeline

    folder = tmp_path / "engine"
    shutil.copytree(exported["pruned"], folder)
    base = json.loads((folder / "engine.json").read_text())
    embeddings = np.load(folder / "embed_tokens.npy")

    def load_and_use(data, rng):  # what `visprune run` does before opening sessions
        write_manifest(folder / "engine.json", data, rng, nested="onnx_set")
        pipe = Pipeline(folder, read_engine_set(folder), runner=None, embeddings=embeddings, processor=None)
        pipe.check_request(600, 8)

    outcomes = run_fuzz(base, load_and_use, seed=3)
    print(f"fuzz seed 3: {outcomes}")  # the closing note quotes these (pytest -s)
    assert outcomes["rejected"] >= MUTATIONS * 3 // 4, outcomes
