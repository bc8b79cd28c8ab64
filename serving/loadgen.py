"""A closed-loop load generator for `visprune serve` (or any Triton serving our model): C client threads, each
sending its own list of requests one after the other over HTTP or gRPC, every answer checked against the one
expected. `bench/serve_load.py` runs it at several concurrencies; tests/serving/test_serving.py runs a small one.

A request is `LoadRequest`: the encoded image, the prompt, a token budget, and either the answer expected (greedy
answers are deterministic: the one-by-one answer of the same engine) or the 4xx status a request provoked on
purpose must get. The result counts answers that are right, wrong, refused as expected, failed otherwise and lost
(no response at all), and reports requests/s and latency percentiles over the answered requests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoadRequest:
    image: bytes
    prompt: str
    max_new_tokens: int = 8
    expected: str | None = None  # the right answer (None: not checked)
    expected_status: str | None = None  # a provoked error's status, e.g. "400"


@dataclass
class LoadResult:
    sent: int = 0
    right: int = 0
    wrong: list[tuple[str, str]] = field(default_factory=list)  # (expected, got)
    refused_as_expected: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (status, message) not provoked
    lost: int = 0
    latencies_s: list[float] = field(default_factory=list)  # answered requests
    wall_s: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1e3
        return {"sent": self.sent, "right": self.right, "wrong": len(self.wrong),
                "refused_as_expected": self.refused_as_expected, "errors": len(self.errors), "lost": self.lost,
                "wall_s": round(self.wall_s, 3), "requests_per_s": round(self.answered / self.wall_s, 2),
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


def run_load(url: str, model: str, clients: list[list[LoadRequest]], protocol: str = "http",
             timeout_s: float = 300.0) -> LoadResult:
    """Every client's requests in its own thread, all threads started together; returns when all are done."""
    result, lock = LoadResult(), threading.Lock()
    start = threading.Barrier(len(clients) + 1)
    threads = [threading.Thread(target=_client, args=(url, model, requests, protocol, timeout_s, result, lock, start))
               for requests in clients]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - began
    return result


def _client(url, model, requests, protocol, timeout_s, result: LoadResult, lock, start) -> None:
    client = _connect(url, protocol, timeout_s)
    start.wait()
    for request in requests:
        began = time.perf_counter()
        outcome = _send(client, model, request, protocol)
        with lock:
            _record(result, request, outcome, time.perf_counter() - began)


def _connect(url: str, protocol: str, timeout_s: float) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url)
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _send(client: Any, model: str, request: LoadRequest, protocol: str) -> tuple[str, str]:
    """("ok", answer), (status, message) for a refused request, or ("lost", why) for no response."""
    from tritonclient.utils import InferenceServerException

    module = __import__(f"tritonclient.{protocol}", fromlist=["InferInput"])
    inputs = infer_inputs(module, image=request.image, prompt=request.prompt, max_new_tokens=request.max_new_tokens)
    try:
        response = client.infer(model, inputs, outputs=[module.InferRequestedOutput("text")])
    except InferenceServerException as e:
        return _status(e), e.message() or str(e)
    except Exception as e:  # noqa: BLE001  (a dropped connection, a timeout: the request is lost)
        return "lost", f"{type(e).__name__}: {e}"
    return "ok", response.as_numpy("text").reshape(-1)[0].decode()


def infer_inputs(module: Any, rows: int = 1, **values: Any) -> list[Any]:
    """tritonclient InferInputs (`module`: tritonclient.http or .grpc) by input name, each value repeated over
    `rows`, typed as the model's config declares (serving/triton_repo.py INPUTS)."""
    from tritonclient.utils import np_to_triton_dtype

    from serving.triton_repo import INPUTS

    kinds = {spec.name: spec.numpy_type for spec in INPUTS}
    made = []
    for name, value in values.items():
        array = np.array([[value.encode() if isinstance(value, str) else value]] * rows, dtype=kinds[name])
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        made.append(tensor)
    return made


def _status(error: Any) -> str:
    """HTTP status ("400") or gRPC code ("StatusCode.INVALID_ARGUMENT"), as tritonclient reports it."""
    return str(error.status() or "error")


def _record(result: LoadResult, request: LoadRequest, outcome: tuple[str, str], seconds: float) -> None:
    status, text = outcome
    result.sent += 1
    if status == "lost":
        result.lost += 1
        result.errors.append((status, text))
        return
    result.latencies_s.append(seconds)
    if status == "ok" and request.expected_status is None:
        if request.expected is None or text == request.expected:
            result.right += 1
        else:
            result.wrong.append((request.expected, text))
    elif status == request.expected_status or (request.expected_status and request.expected_status in status):
        result.refused_as_expected += 1
    else:
        result.errors.append((status, text))
