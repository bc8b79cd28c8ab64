"""Latency reports: the timing method on a fake clock, and a real side-by-side report's schema and figures."""

import json

import pytest

from conftest import reseal_manifest

from runtime import Pipeline
from reports.latency import LatencyStats, Request, latency_report, measure, time_request
from reports.report import ReportConfig
from visprune.errors import ArtifactMismatchError, ConfigError
from visprune.manifests.common import model_dump


class FakeClock:
    """A clock that moves only when told to: `advance(seconds)`; reading it costs nothing."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_measure_times_only_the_iterations_after_warm_up():
    clock = FakeClock()
    durations = iter([9.0, 9.0] + [0.001 * k for k in range(1, 11)])  # two slow warm-ups, then 1..10 ms
    stats = measure(lambda: clock.advance(next(durations)), warmup=2, iterations=10, clock=clock)
    assert stats.n == 10 and stats.min_ms == pytest.approx(1.0) and stats.max_ms == pytest.approx(10.0)
    assert stats.p50_ms == pytest.approx(5.5) and stats.p90_ms == pytest.approx(9.1)
    assert stats.mean_ms == pytest.approx(5.5)


def test_latency_stats_of_one_sample_have_no_spread():
    assert LatencyStats.from_seconds([0.002]) == LatencyStats(1, 2.0, 2.0, 2.0, 0.0, 2.0, 2.0)


class SteppingClock(FakeClock):
    """Every read moves time forward by one millisecond, so each phase lasts exactly (reads inside it + 1) ms."""

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@pytest.fixture(scope="module")
def pruned(exported):
    return Pipeline.from_engine_dir(exported["pruned"])


def test_a_timed_request_separates_its_phases(pruned, default_set):
    input_ids, pixel_values = pruned.encode(default_set.samples[0].image, pruned.chat_prompt("What?"))
    timing = time_request(pruned, Request(input_ids, pixel_values, new_tokens=4), clock=SteppingClock())
    assert timing["vision_s"] == pytest.approx(0.001) and timing["prefill_s"] == pytest.approx(0.001)
    assert timing["ttft_s"] == pytest.approx(0.003)  # vision, embed and prefill: three clock reads apart
    assert timing["decode_step_s"] == pytest.approx([0.001] * 3)  # new_tokens - 1 decode steps
    assert timing["kv_bytes_final"] > timing["kv_bytes_prefill"] > 0


@pytest.fixture(scope="module")
def report(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    return out, latency_report(exported["pruned"], exported["unpruned"], out, new_tokens=4, warmup=1, rounds=3)


def test_latency_report_schema_and_files(report):
    out, latency = report
    data = model_dump(latency)
    assert json.loads((out / "latency.json").read_text()) == data
    assert data["schema"] == "visprune.latency_report" and data["schema_version"] == 2
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "Prefill latency ratio" in (out / "latency.md").read_text()
    for name in ("pruned", "baseline"):
        engine = data["engines"][name]
        assert engine["prefill"]["n"] == 3 and engine["decode_per_token"]["n"] == 9
        assert engine["prefill"]["p50_ms"] <= engine["prefill"]["p90_ms"] <= engine["prefill"]["max_ms"]
        assert engine["ttft"]["p50_ms"] > 0 and engine["decode_tokens_per_s"] > 0
    assert data["method"]["rounds"] == 3 and data["method"]["warmup_requests"] == 1
    assert data["method"]["device"]["kind"] == "cpu" and "onnxruntime" in data["method"]["versions"]


def test_latency_report_says_what_memory_it_measured(report, exported):
    _, data = report
    for name, folder in (("pruned", exported["pruned"]), ("baseline", exported["unpruned"])):
        memory = data.engines[name]["memory"]
        assert memory["engine_file_bytes"] == sum(p.stat().st_size for p in folder.glob("*.onnx"))
        assert isinstance(memory["load_bytes"], int) and memory["working_bytes"] >= 0
        assert memory["method"].startswith("process resident memory")
    assert "memory taken by loading (MiB)" in (report[0] / "latency.md").read_text()


def test_loading_memory_is_measured_in_a_started_runtime_for_both_engines(exported, tmp_path):
    """In a fresh process the first open pays for starting the runtime (imports, ONNX Runtime's environment:
    ~360 MiB) while tiny's engines are 5 MiB of files: neither figure may carry that cost."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = (f"from reports.latency import latency_report; latency_report({str(exported['pruned'])!r}, "
              f"{str(exported['unpruned'])!r}, {str(tmp_path)!r}, new_tokens=1, warmup=0, rounds=1)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)
    engines = json.loads((tmp_path / "latency.json").read_text())["engines"]
    loads = [engines[name]["memory"]["load_bytes"] for name in ("pruned", "baseline")]
    assert all(load < 64 << 20 for load in loads), [f"{load / 2**20:.1f} MiB" for load in loads]


def test_latency_report_figures_are_sane(report):
    _, data = report
    ratios = data.ratios
    assert 0 < ratios.lm_flops_ratio < 1 and 0 < ratios.visual_flops_ratio < ratios.lm_flops_ratio
    assert ratios.visual_flops_ratio == pytest.approx(0.4, abs=0.01)  # TINY_RECIPE_60
    # KV bytes: the pruned cache holds (prompt - pruned) tokens per layer; both float32 with the same heads
    pruned, base = data.engines["pruned"], data.engines["baseline"]
    prompt = data.request["prompt_tokens"]
    expected = sum(prompt - p for p in (0, 143, 244, 288, 329, 347, 375, 375)) / (8 * prompt)
    assert pruned["kv_bytes_prefill"] / base["kv_bytes_prefill"] == pytest.approx(expected)
    assert ratios.prefill_latency_ratio > 0
    assert ratios.prefill_speedup == pytest.approx(1 / ratios.prefill_latency_ratio)


def test_engines_of_different_models_are_not_compared(exported, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(exported["unpruned"], other)
    reseal_manifest(other / "engine.json",
                    lambda m: m["onnx_set"]["model"].update(fingerprint="sha256:" + "0" * 64))
    with pytest.raises(ArtifactMismatchError, match="different models"):
        latency_report(exported["pruned"], other, tmp_path / "out", rounds=1, warmup=0)
    assert not (tmp_path / "out" / "latency.json").exists()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"latency": True}, "--baseline"),
    ({"parity": False}, "Nothing to report"),
])
def test_bad_report_configs_are_rejected(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ReportConfig(**kwargs)
