"""The reports' schemas: parity (`parity.json`), latency (`latency.json`) and evaluation (`eval.json`).

The report functions (reports/parity.py, latency.py, evaluate.py) build these models, write them and return them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from visprune.manifests import schema_ids
from visprune.manifests.common import Fraction, NonNegInt, PosInt, Strict

PARITY_SCHEMA, LATENCY_SCHEMA, EVAL_SCHEMA = schema_ids.PARITY_REPORT, schema_ids.LATENCY_REPORT, schema_ids.EVAL_REPORT


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
    schema_: Literal[PARITY_SCHEMA.name] = Field(PARITY_SCHEMA.name, alias="schema")
    schema_version: Literal[PARITY_SCHEMA.version] = PARITY_SCHEMA.version
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
    schema_: Literal[LATENCY_SCHEMA.name] = Field(LATENCY_SCHEMA.name, alias="schema")
    schema_version: Literal[LATENCY_SCHEMA.version] = LATENCY_SCHEMA.version
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
    schema_: Literal[EVAL_SCHEMA.name] = Field(EVAL_SCHEMA.name, alias="schema")
    schema_version: Literal[EVAL_SCHEMA.version] = EVAL_SCHEMA.version
    subject: str
    path: str
    model: str
    task: str
    config: dict[str, Any]
    accuracy: Accuracy
    examples: list[dict[str, str]]

