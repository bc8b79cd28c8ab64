"""Calibration speed: the FitPrune reference loop (batch 1) against ours, on the same samples, same recipe.

What is compared, in one process, on one loaded model and one list of calibration samples:

(A) `ReferenceCalibration`: a standalone re-implementation of the reference calibration script
    (`statistical_analysis.py`, pruning_methods.md §1.2-1.3) with its *loop structure and costs* kept:
    * step 1: one full, unpruned Hugging Face forward per sample at batch size 1 with `output_attentions=True`
      (eager attention), reduced to per-layer S_ref / C_ref with a max over heads;
    * step 2, for every alpha of the bisection: layers OUTER, samples INNER, batch size 1. At every layer the
      "DataLoader" is re-iterated: every image is re-read from disk and re-run through the processor and
      tokenizer; at layer 0 the vision tower and projector run again for every sample. One hand-written Llama
      decoder layer (the HF module's weights, HF RoPE, causal mask, eager float32 softmax) gives the head-max
      attention, a scalar greedy rule in the reference's style picks k_S and k_C, T_S ∩ T_C is dropped before
      o_proj / MLP, and the survivors' hidden states and original position ids are carried to the next layer.
    Only the reference's *bugs* are replaced by our fixed semantics (pruning_methods.md §1.8 and
    calibrate/search.py's docstring), so that (A) and (B) must give the same recipe: the greedy count never goes
    stale, the budget test runs on the recipe built so far, the recipe of the smallest feasible alpha is kept.

(B) ours: `calibrate.stage.prepare_samples` (read, template, tokenize, encode every image once, batched) and
    `calibrate.search.RecipeSearch` (batched layer replay; while a sample has lost no token its scores and layer
    outputs are taken from the unpruned reference pass, the "trunk", instead of being recomputed).

The benchmark checks that both give the identical recipe (per-layer deletion counts) and alpha, and reports wall
times (A: step 1 / bisection; B: prepare / reference pass / search) and the speedup A / B. Both run after one
untimed warm-up (one sample encoded, one forward), under torch.no_grad, with the same torch thread count.

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/calibration_speed.py [--samples K] [--reduction 0.6]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibrate.data import CalibrationSet, default_calibration_set, select_samples
from calibrate.flops import visual_flops
from calibrate.replay import DecoderReplay
from calibrate.search import RecipeSearch
from calibrate.stage import prepare_samples, resolve_batch_size, resolve_device
from visprune.models import LlavaBundle, chat_prompt, encode_image_prompt, load_image, load_llava

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- (A) the reference calibration loop, batch 1 -------------------------------------------------------------

@dataclass
class RefState:
    """One sample's carried state between layers (the reference's residual_batch / position ids / counts)."""

    hidden: torch.Tensor  # [S, D] rows still present
    positions: torch.Tensor  # [S] original position ids
    start: int  # tokens before the image
    n: int  # visual tokens still present
    text: int  # tokens after the image


@dataclass
class RefOutcome:
    alpha: float
    feasible: bool
    recipe_removed: list[int]
    per_sample: list[list[int]]  # [sample][layer] deletions (0 for layers not run)
    layers_run: int


@dataclass
class RefTimings:
    step1_s: float = 0.0
    bisection_s: float = 0.0
    data_s: float = 0.0  # part of both: re-reading images + processor/tokenizer calls
    vision_s: float = 0.0  # part of the bisection: vision tower + projector at layer 0 of every alpha
    data_calls: int = 0
    vision_calls: int = 0
    sample_layers: int = 0  # single-layer passes in the bisection


def reference_greedy_count(scores: torch.Tensor, target: float) -> int:
    """The reference's scan, written as a scalar loop (with the stale-count bug fixed).

    Sort ascending; for k = 0, 1, ...: R(k) = total − (sum of the k smallest); at the first k with
    R(k) < target delete max(k − 1, 0). Nothing if total < target; n − 1 if the scan never drops below target.
    """
    scores = scores.double()
    total = scores.sum()
    if total < target:
        return 0
    total = float(total)
    smallest_first = torch.sort(scores).values
    cumulative = torch.cumsum(smallest_first, 0).tolist()  # cumulative[k-1] = sum of the k smallest
    n = len(cumulative)
    for k in range(n):
        remaining = total if k == 0 else total - cumulative[k - 1]
        if remaining < target:
            return max(k - 1, 0)
    return n - 1


class ReferenceCalibration:
    """FitPrune's calibration as the reference script runs it: batch 1, layers outer, samples inner."""

    def __init__(self, bundle: LlavaBundle, dataset: CalibrationSet):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        self.bundle = bundle
        self.model = bundle.model
        self.samples = list(dataset.samples)
        self.shape = bundle.shape
        self.language_model = self.model.model.language_model
        self.apply_rotary_pos_emb = apply_rotary_pos_emb
        self.repeat_kv = repeat_kv
        self.ref_self: list[list[float]] = []  # [sample][layer]
        self.ref_cross: list[list[float]] = []
        self.timings = RefTimings()

    # The DataLoader's __getitem__: read the image, build the prompt, run the processor and tokenizer.
    def load_sample(self, index: int):
        t0 = time.perf_counter()
        sample = self.samples[index]
        processor = self.bundle.processor
        prompt = sample.prompt if sample.prompt is not None else chat_prompt(processor, sample.question)
        encoded = encode_image_prompt(processor, load_image(sample.image), prompt, self.bundle.image_token_id)
        self.timings.data_s += time.perf_counter() - t0
        self.timings.data_calls += 1
        return encoded

    # Step 1 (compute_attention_weights): one unpruned forward per sample with output_attentions=True.
    @torch.no_grad()
    def compute_attention_weights(self) -> None:
        t0 = time.perf_counter()
        self.ref_self, self.ref_cross = [], []
        device, dtype = self.model.device, self.model.dtype
        for i in range(len(self.samples)):
            enc = self.load_sample(i)
            out = self.model(input_ids=enc.input_ids.to(device), pixel_values=enc.pixel_values.to(device, dtype),
                             output_attentions=True, use_cache=False)
            start, n = enc.image_start, enc.num_visual
            seq = enc.input_ids.shape[1]
            text = seq - start - n
            s_row, c_row = [], []
            for attentions in out.attentions:  # per layer [1, H, S, S]
                m = attentions[0].amax(dim=0).double()  # max over heads, [S, S]
                s_row.append(float(m[start:start + n, start:start + n].sum() / n))
                c_row.append(float(m[start + n:, start:start + n].sum() / text))
            self.ref_self.append(s_row)
            self.ref_cross.append(c_row)
            del out
        _sync(self.model)
        self.timings.step1_s += time.perf_counter() - t0

    @torch.no_grad()
    def embed(self, enc) -> RefState:
        """Layer-0 input of one sample: vision tower + projector, features spliced into the text embeddings."""
        t0 = time.perf_counter()
        model, device = self.model, self.model.device
        config = model.config
        out = model.model.get_image_features(
            pixel_values=enc.pixel_values.to(device, model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        feats = getattr(out, "pooler_output", out)
        feats = feats[0]  # [N, D] of the one image (a per-image list or a [1, N, D] tensor)
        ids = enc.input_ids[0].to(device)
        hidden = model.get_input_embeddings()(ids)
        start, n = enc.image_start, enc.num_visual
        assert feats.shape[0] == n, (feats.shape, n)
        hidden = torch.cat([hidden[:start], feats.to(hidden.dtype), hidden[start + n:]])
        self.timings.vision_s += time.perf_counter() - t0
        self.timings.vision_calls += 1
        return RefState(hidden=hidden, positions=torch.arange(ids.shape[0], device=device), start=start, n=n,
                        text=ids.shape[0] - start - n)

    @torch.no_grad()
    def decoder_layer(self, layer_idx: int, st: RefState, alpha: float, ref_self: float, ref_cross: float
                      ) -> tuple[int, RefState]:
        """One Llama decoder layer at batch 1 with FitPrune's pruning after attention."""
        layer = self.language_model.layers[layer_idx]
        attn = layer.self_attn
        seq = st.hidden.shape[0]
        x = layer.input_layernorm(st.hidden[None])  # [1, S, D]
        q = attn.q_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)  # [1, H, S, Dh]
        k = attn.k_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)
        cos, sin = self.language_model.rotary_emb(x, st.positions[None])
        q, k = self.apply_rotary_pos_emb(q, k, cos, sin)
        k = self.repeat_kv(k, attn.num_key_value_groups)
        v = self.repeat_kv(v, attn.num_key_value_groups)
        mask = torch.full((seq, seq), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
        logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [1, H, S, S]
        context = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(seq, -1)  # [S, H*Dh]

        m = probs[0].amax(dim=0).double()  # head max [S, S]
        vis0, vis1 = st.start, st.start + st.n
        a_self = (m[vis0:vis1, vis0:vis1].sum(dim=0) / st.n).cpu()
        a_cross = (m[vis1:, vis0:vis1].sum(dim=0) / st.text).cpu()
        k_self = reference_greedy_count(a_self, (1.0 - alpha) * ref_self)
        k_cross = reference_greedy_count(a_cross, (1.0 - alpha) * ref_cross)
        # T_S ∩ T_C: the reference concatenates both index lists and keeps the indices that occur twice.
        low_self = torch.argsort(a_self, stable=True)[:k_self]
        low_cross = torch.argsort(a_cross, stable=True)[:k_cross]
        both = torch.cat([low_self, low_cross])
        values, counts = torch.unique(both, return_counts=True)
        removed = values[counts == 2]

        keep = torch.ones(seq, dtype=torch.bool)
        keep[st.start + removed] = False
        rows = torch.nonzero(keep).flatten().to(st.hidden.device)
        hidden = st.hidden[rows] + attn.o_proj(context[rows])
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return int(removed.numel()), RefState(hidden=hidden, positions=st.positions[rows], start=st.start,
                                              n=st.n - int(removed.numel()), text=st.text)

    # Step 2 (fit_model) for one alpha.
    @torch.no_grad()
    def fit_model(self, alpha: float, reduction: float) -> RefOutcome:
        num_layers, num_samples = self.shape.num_layers, len(self.samples)
        budget = (1.0 - reduction) * visual_flops(self.shape, [])
        carried: list[RefState | None] = [None] * num_samples
        per_sample = [[0] * num_layers for _ in range(num_samples)]
        recipe: list[int] = []
        for layer in range(num_layers):  # layers outer
            if visual_flops(self.shape, recipe) <= budget:
                break
            for i in range(num_samples):  # samples inner; the DataLoader is re-iterated at every layer
                enc = self.load_sample(i)
                state = self.embed(enc) if layer == 0 else carried[i]
                per_sample[i][layer], carried[i] = self.decoder_layer(
                    layer, state, alpha, self.ref_self[i][layer], self.ref_cross[i][layer])
                self.timings.sample_layers += 1
            recipe.append(math.floor(sum(row[layer] for row in per_sample) / num_samples))
        layers_run = len(recipe)
        recipe += [0] * (num_layers - len(recipe))
        return RefOutcome(alpha=alpha, feasible=visual_flops(self.shape, recipe) <= budget,
                          recipe_removed=recipe, per_sample=per_sample, layers_run=layers_run)

    def bisect(self, reduction: float, tolerance: float = 0.01) -> tuple[RefOutcome, list[RefOutcome]]:
        t0 = time.perf_counter()
        low, high = 0.0, 1.0
        best: RefOutcome | None = None
        steps = []
        while high - low > tolerance + 1e-6:
            outcome = self.fit_model((low + high) / 2, reduction)
            steps.append(outcome)
            if outcome.feasible:
                high, best = outcome.alpha, outcome
            else:
                low = outcome.alpha
        if best is None:
            best = self.fit_model(1.0, reduction)
            steps.append(best)
            if not best.feasible:
                raise RuntimeError(f"(A) no alpha reaches a {reduction:.0%} visual-FLOPs reduction")
        _sync(self.model)
        self.timings.bisection_s += time.perf_counter() - t0
        return best, steps


# --- (B) ours -------------------------------------------------------------------------------------------------

class _RecordingSearch(RecipeSearch):
    """Diagnostics only (never timed): our search, recording per-sample deletions per layer."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.per_layer: list[list[int]] = []

    def _prune_layer(self, layer, states, alpha):
        removed = super()._prune_layer(layer, states, alpha)
        self.per_layer.append([len(r) for r in removed])
        return removed


def run_ours(bundle: LlavaBundle, dataset: CalibrationSet, reduction: float, batch_size: int):
    timings = {}
    t0 = time.perf_counter()
    states = prepare_samples(bundle, dataset, batch_size)
    _sync(bundle.model)
    t1 = time.perf_counter()
    search = RecipeSearch(DecoderReplay(bundle.model), states, bundle.shape, batch_size=batch_size)
    search.run_reference_pass()
    _sync(bundle.model)
    t2 = time.perf_counter()
    result = search.search(reduction)
    _sync(bundle.model)
    t3 = time.perf_counter()
    timings.update(prepare_s=t1 - t0, reference_pass_s=t2 - t1, search_s=t3 - t2, total_s=t3 - t0)
    return result, search, states, timings


# --- driver ---------------------------------------------------------------------------------------------------

def _sync(model: Any) -> None:
    if str(model.device).startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(bundle: LlavaBundle, dataset: CalibrationSet) -> None:
    sample = dataset.samples[0]
    prompt = sample.prompt if sample.prompt is not None else chat_prompt(bundle.processor, sample.question)
    enc = encode_image_prompt(bundle.processor, load_image(sample.image), prompt, bundle.image_token_id)
    with torch.no_grad():
        bundle.model(input_ids=enc.input_ids.to(bundle.model.device),
                     pixel_values=enc.pixel_values.to(bundle.model.device, bundle.model.dtype), use_cache=False)


def _diagnose(bundle, states, search, ref_steps, our_steps, reduction, batch_size):
    """At the first bisection step whose recipes differ: per-sample, per-layer deletions of (A) and (B)."""
    for a_step, b_step in zip(ref_steps, our_steps):
        if a_step.alpha != b_step.alpha or a_step.recipe_removed != b_step.recipe_removed:
            break
    else:
        return None
    recorder = _RecordingSearch(DecoderReplay(bundle.model), states, bundle.shape, batch_size=batch_size)
    recorder.trunk = search.trunk  # same reference pass
    recorder.evaluate(b_step.alpha, reduction)
    rows = []
    for layer, b_counts in enumerate(recorder.per_layer):
        for sample, b_count in enumerate(b_counts):
            a_count = a_step.per_sample[sample][layer]
            if a_count != b_count:
                rows.append({"layer": layer, "sample": sample, "A": a_count, "B": b_count})
    return {"alpha_A": a_step.alpha, "alpha_B": b_step.alpha, "recipe_A": a_step.recipe_removed,
            "recipe_B": b_step.recipe_removed, "differing_sample_layers": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="seeded subset of the default set (seed 0)")
    parser.add_argument("--reduction", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int,
                        help="batch size of (B); default: what `visprune calibrate` uses on --device. (A) runs batch 1")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for calibration_speed.{json,md}")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device)
    args.batch_size = args.batch_size or resolve_batch_size(device)
    bundle = load_llava(args.model, device=device, dtype=dtype)
    dataset = select_samples(default_calibration_set(), args.samples, seed=0)
    num_samples = len(dataset.samples)
    print(f"{num_samples} samples, reduction {args.reduction}, model {args.model} on {device}, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    _warm_up(bundle, dataset)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.2f} before the run; other processes may skew the timings "
              "(oversubscribed torch threads slow down badly)", flush=True)

    with torch.no_grad():
        reference = ReferenceCalibration(bundle, dataset)
        print("(A) reference loop, step 1 ...", flush=True)
        reference.compute_attention_weights()
        print(f"    {reference.timings.step1_s:.1f} s; bisection ...", flush=True)
        ref_best, ref_steps = reference.bisect(args.reduction)
        print(f"    {reference.timings.bisection_s:.1f} s", flush=True)

        print("(B) ours ...", flush=True)
        our_result, search, states, our_t = run_ours(bundle, dataset, args.reduction, args.batch_size)
        print(f"    {our_t['total_s']:.1f} s", flush=True)

        # Not timed: how far apart the two reference statistics are (full HF forward vs our layer replay).
        ref_rel = 0.0
        for i in range(num_samples):
            for layer in range(bundle.shape.num_layers):
                ours_s, ours_c = search.trunk.reference_mass(layer, i)
                for a, b in ((reference.ref_self[i][layer], ours_s), (reference.ref_cross[i][layer], ours_c)):
                    ref_rel = max(ref_rel, abs(a - b) / max(abs(a), 1e-300))
        diagnosis = None
        identical = (ref_best.recipe_removed == our_result.best.recipe_removed
                     and ref_best.alpha == our_result.best.alpha)
        steps_identical = ([(s.alpha, s.feasible, s.recipe_removed) for s in ref_steps]
                           == [(s.alpha, s.feasible, s.recipe_removed) for s in our_result.steps])
        if not steps_identical:
            diagnosis = _diagnose(bundle, states, search, ref_steps, our_result.steps,
                                  args.reduction, args.batch_size)

    load_after = os.getloadavg()
    rt = reference.timings
    a_total = rt.step1_s + rt.bisection_s
    speedup = a_total / our_t["total_s"]
    import transformers

    report = {
        "samples": num_samples,
        "calibration_set": dataset.description,
        "reduction": args.reduction,
        "batch_size_B": args.batch_size,
        "model": args.model,
        "device": device,
        "A_reference_loop": {
            "total_s": round(a_total, 3), "step1_s": round(rt.step1_s, 3), "bisection_s": round(rt.bisection_s, 3),
            "data_loading_s": round(rt.data_s, 3), "data_loading_calls": rt.data_calls,
            "vision_tower_s": round(rt.vision_s, 3), "vision_tower_calls": rt.vision_calls,
            "single_layer_passes": rt.sample_layers,
            "alpha": ref_best.alpha, "recipe_removed": ref_best.recipe_removed,
            "steps": [{"alpha": s.alpha, "feasible": s.feasible, "layers_run": s.layers_run,
                       "recipe_removed": s.recipe_removed} for s in ref_steps],
        },
        "B_ours": {
            "total_s": round(our_t["total_s"], 3), "prepare_s": round(our_t["prepare_s"], 3),
            "reference_pass_s": round(our_t["reference_pass_s"], 3), "search_s": round(our_t["search_s"], 3),
            "sample_layers_computed": search.layers_computed,
            "alpha": our_result.best.alpha, "recipe_removed": our_result.best.recipe_removed,
            "steps": [{"alpha": s.alpha, "feasible": s.feasible, "recipe_removed": s.recipe_removed}
                      for s in our_result.steps],
        },
        "speedup": round(speedup, 2),
        "recipes_identical": identical,
        "all_bisection_steps_identical": steps_identical,
        "max_rel_diff_reference_mass": ref_rel,
        "first_difference": diagnosis,
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
        },
        "created_unix": round(time.time(), 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(report)
    (args.out / "calibration_speed.md").write_text(markdown)
    print()
    print(markdown)
    if diagnosis:
        print(f"First differing bisection step: alpha A {diagnosis['alpha_A']}, B {diagnosis['alpha_B']}; "
              f"recipe A {diagnosis['recipe_A']}, B {diagnosis['recipe_B']}")
        rows = diagnosis["differing_sample_layers"]
        print(f"{len(rows)} (layer, sample) deletion counts differ" + (", the first 50:" if len(rows) > 50 else ":"))
        for row in rows[:50]:
            print(f"  layer {row['layer']:2d} sample {row['sample']:3d}: A {row['A']:4d}  B {row['B']:4d}")
    return 0 if identical else 1


def _markdown(r: dict) -> str:
    a, b, m = r["A_reference_loop"], r["B_ours"], r["machine"]
    lines = [
        "# Calibration speed: reference loop (A) vs ours (B)",
        "",
        f"{r['samples']} samples ({r['calibration_set']}), reduction {r['reduction']}, model `{r['model']}` on "
        f"{r['device']}; (A) batch 1, (B) batch {r['batch_size_B']}.",
        f"Machine: {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}; load average (1/5/15 min) "
        f"{m['loadavg_1_5_15_before']} before, {m['loadavg_1_5_15_after']} after.",
        "",
        "| | wall time (s) |",
        "|---|---:|",
        f"| **A total** | **{a['total_s']:.2f}** |",
        f"| A step 1 (unpruned HF forward, output_attentions, batch 1) | {a['step1_s']:.2f} |",
        f"| A bisection ({len(a['steps'])} alphas, {a['single_layer_passes']} single-layer passes) | "
        f"{a['bisection_s']:.2f} |",
        f"| &nbsp;&nbsp;of which image re-reading + processor ({a['data_loading_calls']} calls, steps 1+2) | "
        f"{a['data_loading_s']:.2f} |",
        f"| &nbsp;&nbsp;of which vision tower + projector ({a['vision_tower_calls']} calls) | "
        f"{a['vision_tower_s']:.2f} |",
        f"| **B total** | **{b['total_s']:.2f}** |",
        f"| B prepare_samples (read, tokenize, encode once) | {b['prepare_s']:.2f} |",
        f"| B reference pass | {b['reference_pass_s']:.2f} |",
        f"| B search ({len(b['steps'])} alphas, {b['sample_layers_computed']} sample-layers computed incl. "
        f"reference pass) | {b['search_s']:.2f} |",
        f"| **speedup A / B** | **{r['speedup']:.2f}x** |",
        "",
        f"Recipes identical: **{'yes' if r['recipes_identical'] else 'NO'}** "
        f"(all bisection steps identical: {'yes' if r['all_bisection_steps_identical'] else 'no'}).",
        "",
        f"- A: alpha {a['alpha']}, recipe {a['recipe_removed']}",
        f"- B: alpha {b['alpha']}, recipe {b['recipe_removed']}",
        f"- max relative difference of the reference masses S_ref/C_ref (HF forward vs our replay): "
        f"{r['max_rel_diff_reference_mass']:.2e}",
        "",
    ]
    if r["first_difference"]:
        d = r["first_difference"]
        lines += [f"First differing bisection step: alpha A {d['alpha_A']} / B {d['alpha_B']}, recipe A "
                  f"{d['recipe_A']} / B {d['recipe_B']}; {len(d['differing_sample_layers'])} (layer, sample) "
                  "deletion counts differ (listed in the JSON).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
