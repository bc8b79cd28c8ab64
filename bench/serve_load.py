"""Load test of `visprune serve` (issue 14, section 4): a real Triton Inference Server on loopback, in front of
the tiny engines, with dynamic batching on and off: FitPrune 60 %, DivPrune 60 % (the demo's method) and
unpruned.

For each engine and scheduling: start `visprune serve` as its own process (the start time, command to ready, is
recorded), then at concurrency 1, 4 and 16 run C clients x `--requests` requests each (serving/loadgen.py: one
thread per client, HTTP, closed loop). Requests mix eight images of the default calibration set with four prompt
layouts (the template, a system prompt, a chat turn before the image, a long question), greedy, `--new-tokens`
tokens; one request per client in ten is provoked bad on purpose (an image that does not decode: HTTP 400
expected). Every answer must equal the same engine's one-by-one answer (`Pipeline.generate`, computed here
first); nothing may be lost; no error but the provoked ones may occur.

Results: bench/results/serve_load.{json,md,png}.

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/serve_load.py --work /tmp/sl      # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 4, 16)
BAD_EVERY = 10  # one provoked bad request per client per ten
PORTS = (18600, 18601, 18602)


def request_mix(pipe, new_tokens: int) -> list[tuple[bytes, str, str]]:
    """(image bytes, prompt, expected greedy answer) for 8 images x 4 prompt layouts."""
    from batch_prefill import layouts
    from calibrate.data import default_calibration_set

    images = [s.image for s in default_calibration_set().samples[:8]]
    mix = []
    for image in images:
        for prompt in layouts(pipe):
            answer = pipe.generate(image, prompt, max_new_tokens=new_tokens).text
            mix.append((image.read_bytes(), prompt, answer))
    return mix


def clients_for(mix, concurrency: int, per_client: int, new_tokens: int) -> list[list[Any]]:
    from serving.loadgen import LoadRequest

    clients = []
    for c in range(concurrency):
        requests = []
        for r in range(per_client):
            image, prompt, answer = mix[(c * 7 + r * 3) % len(mix)]
            if r % BAD_EVERY == BAD_EVERY // 2:
                requests.append(LoadRequest(b"not an image", prompt, new_tokens, expected_status="400"))
            else:
                requests.append(LoadRequest(image, prompt, new_tokens, expected=answer))
        clients.append(requests)
    return clients


def start_server(engine: Path, batching: bool, max_batch: int) -> tuple[subprocess.Popen, float]:
    """`visprune serve` in its own process; returns it and the seconds from the command to ready."""
    import tritonclient.http as httpclient

    http, grpc, metrics = PORTS
    command = [str(Path(sys.executable).parent / "visprune"), "serve", "--engine", str(engine), "--http-port",
               str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", str(max_batch)]
    command += [] if batching else ["--no-dynamic-batching"]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = httpclient.InferenceServerClient(f"localhost:{http}")
    while time.perf_counter() - began < 180:
        if process.poll() is not None:
            raise RuntimeError(f"visprune serve exited: {process.stderr.read()[-2000:]}")
        try:
            if client.is_server_ready() and client.is_model_ready("visprune"):
                return process, time.perf_counter() - began
        except Exception:  # noqa: BLE001  (not listening yet)
            pass
        time.sleep(0.1)
    raise RuntimeError("visprune serve did not become ready in 180 s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def run_config(engine: Path, batching: bool, mix, args) -> dict[str, Any]:
    from serving.loadgen import run_load

    process, start_s = start_server(engine, batching, args.max_batch)
    try:
        run_load(f"localhost:{PORTS[0]}", "visprune", clients_for(mix, 2, 2, args.new_tokens))  # warm-up
        levels = {}
        for concurrency in CONCURRENCY:
            result = run_load(f"localhost:{PORTS[0]}", "visprune",
                              clients_for(mix, concurrency, args.requests, args.new_tokens))
            levels[concurrency] = result.summary() | {"wrong_examples": result.wrong[:3],
                                                      "error_examples": result.errors[:3]}
            print(f"  {engine.name} batching={batching} c={concurrency}: {levels[concurrency]}", flush=True)
    finally:
        stop_server(process)
    return {"server_start_s": round(start_s, 2), "levels": levels}


def markdown(report: dict[str, Any]) -> str:
    model = "tiny" if report["model"] == "tiny" else "the d = 1024 bench checkpoint"
    lines = [f"# `visprune serve` under load ({model}, ONNX Runtime, CPU, loopback HTTP)", "",
             f"{report['machine']}; {report['requests']} requests per client, {report['new_tokens']} new tokens, "
             f"greedy; one request in {BAD_EVERY} provoked bad (undecodable image, 400 expected); Triton "
             f"max batch {report['max_batch']}, 10 ms queue delay when batching.", "",
             "| engine | dynamic batching | server start s | clients | requests | right | wrong | refused as "
             "provoked | other errors | lost | requests/s | p50 ms | p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, config in report["configs"].items():
        engine, batching = key.split("/")
        for concurrency, r in config["levels"].items():
            lines.append(f"| {engine} | {batching} | {config['server_start_s']} | {concurrency} | {r['sent']} | "
                         f"{r['right']} | {r['wrong']} | {r['refused_as_expected']} | {r['errors']} | {r['lost']} | "
                         f"{r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} |")
    lines += ["", "Goals at 16 clients:", ""] + [f"- {line}" for line in goal_lines(report)]
    return "\n".join(lines) + "\n"


def goal_lines(report: dict[str, Any]) -> list[str]:
    rate = lambda key: report["configs"][key]["levels"][16]["requests_per_s"]  # noqa: E731
    lines = []
    for pruned in (k.split("/")[0] for k in report["configs"] if k.endswith("/on") and "unpruned" not in k):
        batched, versus = rate(f"{pruned}/on") / rate(f"{pruned}/off"), rate(f"{pruned}/on") / rate("unpruned/on")
        lines += [f"{pruned}: batched vs batch-1 serving {batched:.2f}x (goal >= 2x: "
                  f"{'met' if batched >= 2 else 'missed'}); vs unpruned, both batched, {versus:.2f}x (goal >= 1.5x: "
                  f"{'met' if versus >= 1.5 else 'missed'}); vs unpruned, batch-1 serving, "
                  f"{rate(f'{pruned}/off') / rate('unpruned/off'):.2f}x"]
    return lines


def plot(report: dict[str, Any], out: Path) -> None:
    from visprune.figures import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, config in report["configs"].items():
        levels = config["levels"]
        axis.plot(list(map(int, levels)), [r["requests_per_s"] for r in levels.values()], marker="o",
                  label=key.replace("/on", ", dynamic batching").replace("/off", ", batch 1"))
    axis.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s",
             title=f"visprune serve ({report['model']}, 2-core CPU): throughput")
    axis.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
    axis.legend()
    save_figure(figure, out)


def main() -> None:
    from batch_prefill import build_engines
    from runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--model", choices=("tiny", "bench"), default="tiny",
                        help="bench: prefill_latency.py's d = 1024 checkpoint (results get a -bench suffix)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{os.cpu_count()} CPUs ({platform.machine()})", "model": args.model,
              "requests": args.requests, "new_tokens": args.new_tokens, "max_batch": args.max_batch, "configs": {}}
    for name, engine in build_engines(args.work, args.model).items():
        mix = request_mix(Pipeline.from_engine_dir(engine), args.new_tokens)
        for batching in (True, False):
            report["configs"][f"{name}/{'on' if batching else 'off'}"] = run_config(engine, batching, mix, args)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = "serve_load" if args.model == "tiny" else "serve_load-bench"
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(markdown(report))
    plot(report, RESULTS_DIR / f"{stem}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
