"""The static-shape PyTorch engine (engines/torch_static.py) on the CPU: what CUDA-graph capture needs (no graph
break, so no host round trip; no tensor built on the host inside prefill or decode), what the selection costs
(TopK per pruning layer), and that the compiled engine computes what the eager model computes.

The graph checks trace a two-layer cut of tiny (every layer of a Llama is the same code, so two layers show what
32 do, and tracing stays cheap); the compiled-engine check runs inductor on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from calibrate.recipe import Recipe
from calibrate.stage import budget_recipe
from engines.torch_static import StaticShapes, StaticTorchEngine, cache_shift, configure_dynamo, default_buckets
from exporter.pruned_lm import LlamaDecodeStep, PrunedLlamaPrefill, StaticCacheDecodeStep
from visprune.errors import PromptError
from visprune.methods import METHODS, PRUNING_METHODS
from visprune.models.decoder import EAGER, SDPA
from visprune.models.llava import LanguageModelShape

START = 5
SCORE_BASED = [m for m in PRUNING_METHODS if METHODS[m].selection not in ("dart", "divprune")]


@pytest.fixture(scope="module")
def two_layers(tiny):
    """tiny cut to its first two decoder layers: a real (smaller) Llama, cheap to trace."""
    model = copy.deepcopy(tiny.model)
    lm = model.model.language_model
    lm.layers = lm.layers[:2]
    model.config.text_config.num_hidden_layers = lm.config.num_hidden_layers = 2
    return model


def recipe_for(model, method: str) -> Recipe:
    """`method` at 60 % on `model`: FitPrune-like counts at both layers, or the method's own schedule."""
    if METHODS[method].needs_calibration:
        return Recipe(method, 576, [300, 100], seed=0 if METHODS[method].needs_seed else None)
    if METHODS[method].cuts_after_layer:  # one cut after layer 0: two layers cannot reach 60 % that way
        return Recipe(method, 576, [300, 0])
    return budget_recipe(LanguageModelShape.from_config(model.config), 0.6, method)


def prefill_inputs(model, batch: int = 2, seq: int = 600):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, model.config.text_config.hidden_size, generator=g)
    scores = torch.rand(batch, 576, generator=g)
    return embeds, torch.tensor([START, START + 4])[:batch], torch.tensor([0, 4])[:batch], scores


def captured_graphs(module, *inputs, outputs: list | None = None) -> list[torch.fx.GraphModule]:
    """The FX graphs torch.compile(fullgraph=True) captures (a graph break raises) with the engine's settings; the
    compiled call's outputs (the graphs run eagerly) go to `outputs`."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    configure_dynamo()  # the engine's settings
    with torch.no_grad():
        result = torch.compile(module, backend=backend, fullgraph=True, dynamic=True)(*inputs)
    if outputs is not None:
        outputs.append(result)
    return graphs


HOST_BUILDERS = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.Tensor.tolist, torch.Tensor.item,
                 torch.Tensor.cpu, torch.Tensor.numpy}


def host_work(graphs: list[torch.fx.GraphModule]) -> list[str]:
    """Nodes that build a tensor from host data or read one back (what a CUDA graph cannot replay)."""
    found = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_method") and (node.target in HOST_BUILDERS or
                                                                node.target in ("cpu", "item", "tolist", "numpy")):
                found.append(node.format_node())
            if node.op == "get_attr" and "tensor_constant" in str(node.target):
                found.append(node.format_node())
    return found


def topk_count(graphs: list[torch.fx.GraphModule]) -> int:
    return sum(node.target in (torch.topk, "topk") for gm in graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_every_method_prefill_compiles_whole_with_no_host_work(two_layers, method):
    """One graph (fullgraph would raise at a break), nothing built on or read back to the host, the eager results;
    and a score-based method's pruning point runs at most two TopK: the selection and the ordering of the kept
    tokens, nothing per head or per term (the 7B FitPrune prefill ran 52 for its 26 pruning layers before and
    still does; DART and DivPrune are greedy by design, a TopK or ArgMax per pivot or pick)."""
    recipe = recipe_for(two_layers, method)
    embeds, starts, pads, scores = prefill_inputs(two_layers)
    module = PrunedLlamaPrefill(two_layers, recipe, START, SDPA).eval()
    args = (embeds, starts, pads, scores if METHODS[method].vision_score else None)
    compiled = []
    graphs = captured_graphs(module, *args, outputs=compiled)
    assert len(graphs) == 1 and host_work(graphs) == []
    with torch.no_grad():
        logits, _, kept = module(*args)
    assert (logits - compiled[0][0]).abs().max() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(kept, compiled[0][2]))
    points = sum(1 for r in recipe.removed if r) + bool(recipe.removed_before_llm)
    if method in SCORE_BASED:
        assert 1 <= points and topk_count(graphs) <= 2 * points


def test_the_static_decode_step_compiles_whole_with_no_host_work(two_layers):
    recipe = recipe_for(two_layers, "fitprune")
    shift = cache_shift(recipe)
    cache = [torch.zeros(2, 4, 700 - s, 16) for s in shift for _ in "kv"]
    module = StaticCacheDecodeStep(two_layers, shift, SDPA).eval()
    args = (torch.randn(2, 1, 64), torch.tensor([[600], [596]]), torch.tensor([0, 4]), torch.tensor([600]), cache)
    graphs = captured_graphs(module, *args)
    assert len(graphs) == 1 and host_work(graphs) == []


def test_fitprune_scores_without_an_eager_attention_at_its_pruning_layers(two_layers):
    """Under fused kernels a FitPrune layer keeps scaled_dot_product_attention for its output and computes only
    the visual keys' probabilities beside it: no probabilities-times-values product."""
    recipe = recipe_for(two_layers, "fitprune")
    embeds, starts, pads, _ = prefill_inputs(two_layers)
    graphs = captured_graphs(PrunedLlamaPrefill(two_layers, recipe, START, SDPA).eval(), embeds, starts, pads, None)
    sdpa = sum(node.target is torch._C._nn.scaled_dot_product_attention for node in graphs[0].graph.nodes)
    assert sdpa == two_layers.config.text_config.num_hidden_layers


@pytest.fixture(scope="module")
def compiled_engine(two_layers):
    """The engine with inductor's regional compile on the CPU (batch sizes 1 and 2, two buckets)."""
    recipe = recipe_for(two_layers, "fitprune")
    return StaticTorchEngine(two_layers, recipe, START, "cpu", StaticShapes((600, 640), (1, 2), 5), compile=True,
                             cuda_graphs=False), recipe


def test_the_compiled_engine_computes_what_the_eager_model_computes(two_layers, compiled_engine):
    engine, recipe = compiled_engine
    embeds, starts, pads, _ = prefill_inputs(two_layers, seq=590)
    with torch.no_grad():
        reference, past, reference_kept = PrunedLlamaPrefill(two_layers, recipe, START, EAGER)(embeds, starts, pads)
        extra = 600 - 590  # the engine's bucket: 10 more pads on the left
        padded = torch.cat([torch.zeros(2, extra, embeds.shape[2]), embeds], dim=1)
        logits, kept = engine.prefill(2, 600, padded, starts + extra, pads + extra, None)
        assert (logits - reference).abs().max() <= 1e-4
        assert all(torch.equal(a, b) for a, b in zip(kept, reference_kept))
        decode, token = LlamaDecodeStep(two_layers, EAGER), torch.randn(2, 1, embeds.shape[2])
        for step in range(4):
            position = torch.tensor([[590 + step], [586 + step]])
            reference, past = decode(token, position, pads, past)
            got = engine.decode(2, token, position, pads + extra, torch.tensor([600 + step]))
            assert (got - reference).abs().max() <= 1e-4


def test_the_batch_sizes_share_nothing_but_the_weights(compiled_engine, two_layers):
    """A batch-1 prefill after a batch-2 one leaves the batch-2 cache as it was (each size has its buffers)."""
    engine, _ = compiled_engine
    embeds, starts, pads, _ = prefill_inputs(two_layers, batch=2, seq=600)
    with torch.no_grad():
        engine.prefill(2, 600, embeds, starts, pads, None)
        before = [t.clone() for t in engine.caches[2]]
        engine.prefill(1, 640, torch.randn(1, 640, embeds.shape[2]), starts[:1], pads[:1], None)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.caches[2]))


def test_prompts_pick_the_smallest_bucket_and_too_long_ones_are_refused():
    shapes = StaticShapes(default_buckets(577, 1024), (1, 8), 64)
    assert shapes.prompt_buckets == (608, 640, 704, 832, 1024)
    assert shapes.bucket(577) == 608 and shapes.bucket(641) == 704 and shapes.bucket(1024) == 1024
    assert shapes.batch_size(1) == 1 and shapes.batch_size(3) == 8
    with pytest.raises(PromptError, match="at most 1024") as error:
        shapes.bucket(1025)
    assert "--max-prompt-tokens" in error.value.hint
    with pytest.raises(PromptError, match="more than the 8"):
        shapes.batch_size(9)
