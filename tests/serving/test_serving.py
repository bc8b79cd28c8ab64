"""`visprune serve` / `export-triton`: a real tritonserver (the one nvidia-pytriton bundles) serving the tiny
FitPrune-60 % engine, spoken to over real HTTP and gRPC with tritonclient.

One server per module, started from a repository that `export_triton` wrote (the engine copied inside), so
the deployable artifact is what is tested; the CLI test starts `visprune serve --engine` in a subprocess.
Dynamic batching waits up to 300 ms here, so requests sent together are batched deterministically."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import snapshot
from serving.loadgen import infer_inputs
from serving.triton_repo import INPUTS, ModelSettings, export_triton
from visprune.errors import BackendUnavailableError, ConfigError, ImageLoadError, InputDataError, PromptError
from visprune.outputs import OutputLocationError

QUESTIONS = ["What animal is this?", "What colors are visible?", "Is there a person?"]
PHOTOS = ["cat.png", "coffee.png", "astronaut.png", "rocket.png"]
NEW_TOKENS = 6


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def engine(exported):
    return exported["pruned"]


@pytest.fixture(scope="module")
def pipe(engine):
    from runtime import Pipeline

    return Pipeline.from_engine_dir(engine)


@pytest.fixture(scope="module")
def photos(default_set) -> dict[str, Path]:
    return {s.image.name: s.image for s in default_set.samples if s.image.name in PHOTOS}


@pytest.fixture(scope="module")
def tritonclient():
    """Parsing an exported config.pbtxt needs tritonclient's compiled model_config.proto (the `serve` extra);
    without it those tests skip (exporting itself needs neither tritonclient nor pytriton)."""
    return pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def repository(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    export_triton(engine, out, ModelSettings(max_batch=4, max_queue_delay_us=300_000))
    return out


@pytest.fixture(scope="module")
def server(repository):
    pytest.importorskip("pytriton")
    from serving.server import ServeConfig, start_server

    with start_server(ServeConfig(*free_ports(3)), repository=repository) as running:
        yield running


# --- talking to it ----------------------------------------------------------------------------------------


def ask_http(server, rows: int = 1, options: dict | None = None, **values) -> list[str]:
    """The answers (one per row) over HTTP; raises tritonclient's InferenceServerException for an error.
    `options`: more keyword arguments of tritonclient's `infer` (request `parameters`, `priority`, ...)."""
    import tritonclient.http as http

    with http.InferenceServerClient(server.http_url.removeprefix("http://")) as client:
        result = client.infer(server.models[0], infer_inputs(http, rows, **values), **(options or {}))
    return [t.decode() for t in result.as_numpy("text").reshape(-1)]


def ask_grpc(server, options: dict | None = None, **values) -> str:
    import tritonclient.grpc as grpc

    with grpc.InferenceServerClient(server.grpc_url.removeprefix("grpc://")) as client:
        result = client.infer(server.models[0], infer_inputs(grpc, **values), **(options or {}))
    return result.as_numpy("text")[0, 0].decode()


def http_error(server, **values) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        ask_http(server, **values)
    return caught.value.status(), caught.value.message()


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=10).read().decode()
    return float(re.search(rf'^{name}{{model="{server.models[0]}",version="1"}} (\S+)$', text, re.M)[1])


def together(calls: list) -> list:
    """Run the calls at the same moment, one thread each (tritonclient's HTTP client is not thread-safe, so
    each call makes its own); results (or exceptions) in order."""
    start, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(index, call):
        start.wait()
        try:
            results[index] = call()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[index] = e

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def expected(pipe, image: Path, question: str, **kwargs) -> str:
    """The pipeline's own answer to a question (or a full prompt with `<image>`), as the server words it."""
    prompt = question if "<image>" in question else pipe.chat_prompt(question)
    return pipe.generate(image, prompt, max_new_tokens=NEW_TOKENS, **kwargs).text


# --- the model logic without Triton ------------------------------------------------------------------------


def test_answer_batch_answers_good_requests_and_returns_each_bad_ones_error(pipe, photos):
    from serving.server import answer_batch, error_status

    def request(image=None, prompt=None, **extra):
        values = {"image": image, "prompt": prompt, "max_new_tokens": NEW_TOKENS, **extra}
        return {k: np.array([[v]], dtype=object if isinstance(v, bytes) else None) for k, v in values.items()
                if v is not None}

    cat, coffee = photos["cat.png"], photos["coffee.png"]
    full_prompt = pipe.chat_prompt(QUESTIONS[1])
    answers = answer_batch(pipe, [request(cat.read_bytes(), QUESTIONS[0].encode()), request(None, b"Hi"),
                                  request(coffee.read_bytes(), full_prompt.encode()),
                                  request(b"not an image", b"Hi"), request(cat.read_bytes(), b"<image><image>"),
                                  request(cat.read_bytes(), b"Hi", temperature=np.float32(-1))])
    assert answers[0] == [expected(pipe, cat, QUESTIONS[0])]
    assert answers[2] == [expected(pipe, coffee, QUESTIONS[1])]
    assert [type(a) for a in answers[1:2] + answers[3:]] == [InputDataError, ImageLoadError, PromptError, ConfigError]
    assert {error_status(a) for a in answers[1:2] + answers[3:]} == {"INVALID_ARG"}
    assert error_status(RuntimeError("a bug")) == "INTERNAL"
    two_rows = {"image": np.array([[cat.read_bytes()], [b"broken"]], dtype=object),
                "prompt": np.array([[b"Hi"], [b"Hi"]], dtype=object)}
    (error,) = answer_batch(pipe, [two_rows])
    assert isinstance(error, ImageLoadError) and error.message.startswith("Row 1 of the request: ")


# --- the server ------------------------------------------------------------------------------------------


def test_greedy_answers_over_http_and_grpc_equal_the_pipelines(server, pipe, photos):
    cat = photos["cat.png"]
    assert ask_http(server, image=cat.read_bytes(), prompt=QUESTIONS[0],
                    max_new_tokens=NEW_TOKENS) == [expected(pipe, cat, QUESTIONS[0])]
    full_prompt = pipe.chat_prompt(QUESTIONS[2])  # a prompt with <image> is used as it is
    assert ask_grpc(server, image=cat.read_bytes(), prompt=full_prompt,
                    max_new_tokens=NEW_TOKENS) == expected(pipe, cat, QUESTIONS[2])


def test_sampling_and_stop_inputs_reach_the_pipeline(server, pipe, photos):
    from runtime.generation import Sampling

    coffee, sampling = photos["coffee.png"], Sampling(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    free = expected(pipe, coffee, QUESTIONS[1], sampling=sampling)
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip()
    got = ask_grpc(server, image=coffee.read_bytes(), prompt=QUESTIONS[1], max_new_tokens=NEW_TOKENS,
                   temperature=0.9, top_k=20, top_p=0.95, seed=11, stop=stop)
    assert got == expected(pipe, coffee, QUESTIONS[1], sampling=sampling, stop=(stop,)) and len(got) < len(free)


def test_a_request_of_several_rows_gets_one_answer_per_row(server, pipe, photos):
    cat = photos["cat.png"]
    assert ask_http(server, rows=2, image=cat.read_bytes(), prompt=QUESTIONS[0],
                    max_new_tokens=NEW_TOKENS) == [expected(pipe, cat, QUESTIONS[0])] * 2


BAD_REQUESTS = {  # what is wrong -> (the request's values, words its message must hold)
    "no image": ({"prompt": "Hi"}, "no image input"),
    "no prompt": ({"image": b"IMAGE"}, "no prompt input"),
    "an image that does not decode": ({"image": b"GIF89a and nothing else", "prompt": "Hi"}, "does not decode"),
    "two <image>": ({"image": b"IMAGE", "prompt": "USER: <image> <image> ASSISTANT:"}, "exactly one"),
    "too long": ({"image": b"IMAGE", "prompt": "Hi", "max_new_tokens": 100_000}, "exceeds"),
    "no new tokens": ({"image": b"IMAGE", "prompt": "Hi", "max_new_tokens": 0}, "at least 1"),
    "negative temperature": ({"image": b"IMAGE", "prompt": "Hi", "temperature": -1.0}, "temperature"),
    "top_p above 1": ({"image": b"IMAGE", "prompt": "Hi", "top_p": 1.5}, "top_p"),
    "a prompt that is not UTF-8": ({"image": b"IMAGE", "prompt": b"\xff\xfe"}, "not UTF-8"),
    "an empty prompt": ({"image": b"IMAGE", "prompt": ""}, "prompt input is empty"),
    "a blank prompt": ({"image": b"IMAGE", "prompt": " \n"}, "prompt input is empty"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_400_with_the_hint_and_the_server_keeps_serving(server, pipe, photos, case):
    values, words = BAD_REQUESTS[case]
    cat = photos["cat.png"]
    values = {k: cat.read_bytes() if v == b"IMAGE" else v for k, v in values.items()}
    status, message = http_error(server, **values)
    assert status == "400" and words in message and "\nHint: " in message
    assert ask_http(server, image=cat.read_bytes(), prompt="Hi", max_new_tokens=2) == [
        pipe.generate(cat, pipe.chat_prompt("Hi"), max_new_tokens=2).text]


def test_the_http_status_is_400_on_the_wire_and_grpc_says_invalid_argument(server):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["Hi"]}]})
    request = urllib.request.Request(f"{server.http_url}/v2/models/{server.models[0]}/infer", body.encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400 and "Hint:" in json.loads(caught.value.read())["error"]
    with grpc.InferenceServerClient(server.grpc_url.removeprefix("grpc://")) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer(server.models[0], infer_inputs(grpc, prompt="Hi"))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "Hint:" in error.value.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_empty_prompt_and_an_unknown_request_parameter_are_refused_naming_the_fix(server, pipe, photos, protocol):
    """From outside, as a KServe v2 client sends them: a request-level `parameters` the model does not know is
    refused (ignored, the client would believe its limit applied); Triton's own (priority, timeout) still work."""
    from tritonclient.utils import InferenceServerException

    ask, refused = {"http": (ask_http, "400"), "grpc": (ask_grpc, "StatusCode.INVALID_ARGUMENT")}[protocol]
    cat = photos["cat.png"]
    values = {"image": cat.read_bytes(), "prompt": "Hi", "max_new_tokens": 2}
    with pytest.raises(InferenceServerException) as empty:
        ask(server, **{**values, "prompt": ""})
    assert empty.value.status() == refused and "The prompt input is empty" in empty.value.message()
    assert "Hint: Send a question about the image" in empty.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        ask(server, options={"parameters": {"max_tokens": 4}}, **values)
    message = unknown.value.message()
    assert unknown.value.status() == refused and "no request parameter, got max_tokens" in message
    assert "Hint: Send generation settings as inputs instead: max_new_tokens, temperature, top_k, top_p, seed, " \
           "stop" in message
    answer = pipe.generate(cat, pipe.chat_prompt("Hi"), max_new_tokens=2).text
    got = ask(server, options={"priority": 1, "timeout": 60_000_000}, **values)
    assert got == ([answer] if protocol == "http" else answer)


def test_requests_sent_together_run_as_one_batch_and_bad_ones_fail_alone(server, pipe, photos):
    # Triton batches only requests that send the same set of inputs, so the bad ones send all three as well
    cat, coffee = photos["cat.png"], photos["coffee.png"]
    executions, answered = metric(server, "nv_inference_exec_count"), metric(server, "nv_inference_count")
    sent = [(cat.read_bytes(), QUESTIONS[0]), (b"broken", QUESTIONS[0]), (coffee.read_bytes(), QUESTIONS[1]),
            (cat.read_bytes(), "USER: <image><image> ASSISTANT:")]
    results = together([lambda image=image, prompt=prompt: ask_http(server, image=image, prompt=prompt,
                                                                    max_new_tokens=NEW_TOKENS)
                        for image, prompt in sent])
    assert results[0] == [expected(pipe, cat, QUESTIONS[0])]
    assert results[2] == [expected(pipe, coffee, QUESTIONS[1])]
    assert [e.status() for e in (results[1], results[3])] == ["400", "400"]
    assert "does not decode" in results[1].message() and "exactly one" in results[3].message()
    assert metric(server, "nv_inference_count") - answered == 4
    assert metric(server, "nv_inference_exec_count") - executions == 1  # one model execution for all four


def test_health_and_metrics_endpoints_respond(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{server.models[0]}/ready"):
        assert urllib.request.urlopen(server.http_url + path, timeout=10).status == 200
    model = json.loads(urllib.request.urlopen(f"{server.http_url}/v2/models/{server.models[0]}", timeout=10).read())
    assert [i["name"] for i in model["inputs"]] == [spec.name for spec in INPUTS]
    assert metric(server, "nv_inference_request_success") >= 1


def test_a_small_load_test_loses_nothing_and_answers_right(server, pipe, photos):
    """bench/serve_load.py in small: 4 clients x 5 requests (serving/loadgen.py), mixed images and prompt layouts
    (a system prompt, a chat turn before the image), one provoked bad request per client."""
    from serving.loadgen import LoadRequest, run_load

    layouts = list(QUESTIONS) + ["SYSTEM: Be brief.\n" + pipe.chat_prompt(QUESTIONS[0]),
                                        "USER: Hi.\nASSISTANT: Hello!\nUSER: <image>\nWhat is it? ASSISTANT:"]
    clients = []
    for c in range(4):
        requests = []
        for r in range(5):
            photo, prompt = photos[PHOTOS[(c + r) % len(PHOTOS)]], layouts[(c * 5 + r) % len(layouts)]
            if r == 2:
                requests.append(LoadRequest(b"not an image", prompt, NEW_TOKENS, expected_status="400"))
            else:
                requests.append(LoadRequest(photo.read_bytes(), prompt, NEW_TOKENS, expected(pipe, photo, prompt)))
        clients.append(requests)
    result = run_load(server.http_url.removeprefix("http://"), "visprune", clients)
    assert (result.sent, result.right, result.refused_as_expected) == (20, 16, 4), result.wrong
    assert result.errors == [] and result.lost == 0 and not result.wrong


def test_clients_that_disconnect_mid_request_do_not_disturb_the_others(server, pipe, photos):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    cat = photos["cat.png"]
    values = {"image": cat.read_bytes(), "prompt": QUESTIONS[0], "max_new_tokens": NEW_TOKENS}

    def hang_up_http():  # sends a whole request, then closes the connection without reading the answer
        body, json_size = http.InferenceServerClient.generate_request_body(infer_inputs(http, **values))
        head = (f"POST /v2/models/{server.models[0]}/infer HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {json_size}\r\n\r\n")
        with socket.create_connection(("localhost", int(server.http_url.rsplit(":", 1)[1]))) as connection:
            connection.sendall(head.encode() + body)
        return "hung up"

    def cancel_grpc():
        with grpc.InferenceServerClient(server.grpc_url.removeprefix("grpc://")) as client:
            call = client.async_infer(server.models[0], infer_inputs(grpc, **values), callback=lambda *_: None)
            time.sleep(0.05)
            call.cancel()
        return "cancelled"

    results = together([hang_up_http, cancel_grpc, lambda: ask_http(server, **values),
                        lambda: ask_grpc(server, **values)])
    answer = expected(pipe, cat, QUESTIONS[0])
    assert results == ["hung up", "cancelled", [answer], answer]
    assert ask_http(server, **values) == [answer]


# --- the command line --------------------------------------------------------------------------------------


def test_serve_command_starts_prints_its_endpoints_and_stops_on_sigterm(engine, pipe, photos):
    pytest.importorskip("pytriton")
    http_port, grpc_port, metrics_port = free_ports(3)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--engine", str(engine),
                                "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                "--metrics-port", str(metrics_port), "--no-dynamic-batching"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines(process.stdout)
        printed = _read_until(lines, "Ctrl-C stops it.", deadline=started + 120)
        ready_s = time.perf_counter() - started
        print(f"\n`visprune serve` ready {ready_s:.1f} s after the command started")
        assert f"http://localhost:{http_port}" in printed and f"grpc://localhost:{grpc_port}" in printed
        assert f"http://localhost:{metrics_port}/metrics" in printed and "/v2/health/ready" in printed
        server = SimpleNamespace(http_url=f"http://localhost:{http_port}", models=["visprune"],
                                 metrics_url=f"http://localhost:{metrics_port}")
        cat = photos["cat.png"]
        executions = metric(server, "nv_inference_exec_count")
        answers = together([lambda q=q: ask_http(server, image=cat.read_bytes(), prompt=q, max_new_tokens=NEW_TOKENS)
                            for q in QUESTIONS[:2]])
        assert answers == [[expected(pipe, cat, q)] for q in QUESTIONS[:2]]
        assert metric(server, "nv_inference_exec_count") - executions == 2  # no dynamic batching: one at a time
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:  # on a failure: SIGTERM first, so the server still cleans up after itself
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "stopped" in process.stderr.read()
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://localhost:{http_port}/v2/health/live", timeout=5)


# The library's server in a process of its own, stopped by SIGTERM as `visprune serve` is; a 1 s exit timeout,
# so that tritonserver exits while its Python-backend stub still runs a batch (with 10 s that takes more load).
SERVE_SCRIPT = """
import signal, sys
from pathlib import Path
from serving.server import ServeConfig, serve

def interrupt(*_):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, interrupt)
config = ServeConfig(*map(int, sys.argv[2:5]), exit_timeout_s=1)
serve(config, engine_dir=Path(sys.argv[1]), on_ready=lambda server: print(server.describe(), flush=True))
"""


def test_sigterm_under_load_leaves_no_process_of_the_servers_tree(engine, photos):
    pytest.importorskip("pytriton")
    ports = free_ports(3)
    process = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(engine), *map(str, ports)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = SimpleNamespace(http_url=f"http://localhost:{ports[0]}", models=["visprune"])
    answered, stop, image = [], threading.Event(), photos["cat.png"].read_bytes()

    def client():
        while not stop.is_set():
            try:
                answered.append(ask_http(server, image=image, prompt=QUESTIONS[0], max_new_tokens=120))
            except Exception:  # noqa: BLE001 - the server stopped under it
                return

    clients = [threading.Thread(target=client) for _ in range(8)]
    try:
        _read_until(_lines(process.stdout), "Ctrl-C stops it.", deadline=time.perf_counter() + 120)
        tree = _descendants(process.pid)
        names = sorted(name for name, _ in tree.values())
        assert names == ["triton_python_b", "tritonserver"], names  # the stub of the one model instance
        for thread in clients:
            thread.start()
        deadline = time.perf_counter() + 120
        while len(answered) < 2 and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert len(answered) >= 2  # under load: batches keep running
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        left = {pid: name for pid, (name, start) in tree.items() if _stat(pid)[2:] == (start,)}
        assert left == {}, f"still there after the server exited: {left}"
    finally:
        stop.set()
        process.terminate()
        process.wait(60)
        for thread in clients:
            thread.join(60)


def _descendants(root: int) -> dict[int, tuple[str, int]]:
    """pid -> (command name, start time) of every process below `root`, from /proc."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (name, ppid, start) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = (name, start)
                frontier.append(pid)
    return found


def _stat(pid: int) -> tuple:
    """(command name, parent pid, start time) of a process, any state (a zombie counts); () if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ()
    fields = text[text.rindex(")") + 2:].split()
    return text[text.index("(") + 1:text.rindex(")")], int(fields[1]), int(fields[19])


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def _read_until(lines: queue.Queue, marker: str, deadline: float) -> str:
    text = ""
    while marker not in text:
        text += lines.get(timeout=max(0.1, deadline - time.perf_counter()))
    return text


# --- export-triton -----------------------------------------------------------------------------------------


def test_exported_config_parses_as_tritons_model_config(repository, tritonclient):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / "visprune" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("visprune", "python", 4)
    assert config.dynamic_batching.max_queue_delay_microseconds == 300_000
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), i.optional) for i in config.input] == [
        (spec.name, spec.triton_type, True) for spec in INPUTS]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type)) for o in config.output] == [("text", "TYPE_STRING")]
    assert config.parameters["engine_dir"].string_value == "engine"
    assert "TritonPythonModel" in (repository / "visprune" / "1" / "model.py").read_text()


def test_export_copies_the_engine_and_without_batching_writes_no_batcher(engine, tritonclient, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from visprune.manifests.engine_set import read_engine_set

    model = export_triton(engine, tmp_path / "repo", ModelSettings(name="vqa", dynamic_batching=False, instances=2))
    read_engine_set(model / "engine", verify=True)  # every file re-hashed against the engine's manifest
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert not config.HasField("dynamic_batching") and config.instance_group[0].count == 2


def test_export_replaces_its_own_repository_but_nothing_else_without_force(engine, tmp_path):
    out = tmp_path / "repo"
    export_triton(engine, out)
    export_triton(engine, out)  # its own, holding nothing else: replaced
    (out / "ensemble").mkdir()  # a model someone added next to ours
    before = snapshot(out)
    with pytest.raises(OutputLocationError, match="--force"):
        export_triton(engine, out)
    assert snapshot(out) == before
    export_triton(engine, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["visprune", "visprune-triton.json"]


def test_export_of_a_broken_engine_writes_nothing(engine, tmp_path):
    import shutil

    broken = tmp_path / "engine"
    shutil.copytree(engine, broken)
    (broken / "prefill.onnx").unlink()
    with pytest.raises(Exception, match="prefill.onnx"):
        export_triton(broken, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and [p.name for p in tmp_path.iterdir()] == ["engine"]


def test_export_writes_the_repository_without_tritonclient_or_pytriton(engine, tmp_path):
    """Writing a repository needs neither of the serving extra's packages: a process where importing them fails
    writes the same repository as this one."""
    script = ("import sys\n"
              "for name in ('tritonclient', 'pytriton'):\n"
              "    sys.modules[name] = None  # importing it (or anything under it) raises ImportError\n"
              "from pathlib import Path\n"
              "from serving.triton_repo import export_triton\n"
              "export_triton(Path(sys.argv[1]), Path(sys.argv[2]))\n")
    result = subprocess.run([sys.executable, "-c", script, str(engine), str(tmp_path / "blocked")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    export_triton(engine, tmp_path / "here")
    for path in ("visprune/config.pbtxt", "visprune/1/model.py"):
        assert (tmp_path / "blocked" / path).read_text() == (tmp_path / "here" / path).read_text()
    assert (tmp_path / "blocked" / "visprune" / "engine" / "engine.json").is_file()


def test_bad_settings_are_config_errors():
    for settings in ({"max_batch": 0}, {"instances": 0}, {"max_queue_delay_us": -1}, {"name": "a/b"}):
        with pytest.raises(ConfigError):
            ModelSettings(**settings)


def test_without_pytriton_serving_says_how_to_install_it(engine, monkeypatch):
    from serving.server import ServeConfig, start_server

    monkeypatch.setitem(sys.modules, "pytriton.triton", None)  # what an environment without the extra sees
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[serve\]'"):
        with start_server(ServeConfig(*free_ports(3)), engine_dir=engine):
            pass
