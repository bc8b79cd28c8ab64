"""`visprune serve`: a real Triton Inference Server in front of the runtime, with dynamic batching, HTTP and
gRPC endpoints, health and Prometheus metrics.

The server is the tritonserver binary that nvidia-pytriton bundles (CPU or GPU, its Python backend included),
started and stopped through pytriton. The model it serves is a Triton model repository (serving/triton_repo.py;
its docstring lists the tensors) whose Python-backend model is `TritonPythonModel` below: the same repository
`visprune export-triton` writes for NVIDIA's containers. pytriton's own `bind()` path is not used because it
fails a whole dynamic batch, with HTTP 500, when one request in it is bad; a Python-backend model answers each
request on its own.

Per request, inside one batch: a request that cannot be served as given (no image, an image that does not
decode, a prompt without exactly one `<image>` or too long for the engine, a bad sampling value) gets
INVALID_ARG, which Triton sends as HTTP 400 / gRPC INVALID_ARGUMENT with visprune's message and `Hint:`; the
batch's other requests run as one `Pipeline.generate_encoded` call. Anything else (a bug, a failing engine)
fails the batch's requests with INTERNAL (HTTP 500) and is logged with its traceback; the server keeps serving.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import socket
import sysconfig
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from serving.triton_repo import (INPUTS, OUTPUT, REQUIRED_INPUTS, SERVE_HINT, ModelSettings, engine_dir_of,
                                 write_repository)
from visprune.errors import BackendUnavailableError, ConfigError, InputDataError, VispruneError

DEFAULT_MAX_NEW_TOKENS = 32
SETTING_INPUTS = tuple(spec.name for spec in INPUTS if spec.name not in REQUIRED_INPUTS)
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37  # prctl(2)
_KILL_GRACE_S = 2.0  # how long a process left after tritonserver stopped gets between SIGTERM and SIGKILL


# --- the model: requests in, answers out (Triton-independent, so it is tested directly too) -------------------


def encode_rows(pipe: Any, inputs: dict[str, np.ndarray]) -> list[Any]:
    """One request's rows (Triton's batch dimension) as the pipeline's checked EncodedRequests; raises the
    VispruneError that makes the request a bad one."""
    missing = [name for name in REQUIRED_INPUTS if name not in inputs]
    if missing:
        raise InputDataError(f"The request has no {' and no '.join(missing)} input.",
                             "Send `image` (the image file's bytes) and `prompt` (UTF-8 text), both BYTES of "
                             "shape [1, 1]; README: Serve lists the other inputs.")
    rows = len(inputs["prompt"])
    return [_encode_row(pipe, inputs, row, rows) for row in range(rows)]


def _encode_row(pipe: Any, inputs: dict[str, np.ndarray], row: int, rows: int) -> Any:
    """One row's EncodedRequest; the error of a bad row of a request of several names its row."""
    try:
        return pipe.encode_request(_request(pipe, inputs, row))
    except VispruneError as e:
        if rows == 1:
            raise
        raise type(e)(f"Row {row} of the request: {e.message}", e.hint) from e


def _request(pipe: Any, inputs: dict[str, np.ndarray], row: int) -> Any:
    from runtime.generation import Sampling
    from runtime.pipeline import Request
    from visprune.models.inputs import IMAGE_PLACEHOLDER

    value = lambda name, default=None: _value(inputs, name, row, default)  # noqa: E731
    question = _text(value("prompt"), "prompt")
    if not question.strip():
        raise InputDataError("The prompt input is empty.", "Send a question about the image, e.g. \"What is in "
                             "the image?\", or a full prompt with exactly one <image>.")
    prompt = question if IMAGE_PLACEHOLDER in question else pipe.chat_prompt(question)
    sampling = Sampling(float(value("temperature", 0.0)), int(value("top_k", 0)), float(value("top_p", 1.0)),
                        None if value("seed") is None else int(value("seed")))
    stop = _text(value("stop", b""), "stop")
    return Request(bytes(value("image")), prompt, int(value("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), sampling,
                   (stop,) if stop else ())


def _value(inputs: dict[str, np.ndarray], name: str, row: int, default: Any) -> Any:
    """Row `row` of input `name` (each row holds one element: the config's dims are [1])."""
    tensor = inputs.get(name)
    return default if tensor is None else tensor.reshape(-1)[row]


def _text(value: Any, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputDataError(f"The {name} input is not UTF-8 text ({e}).", "Send the text encoded as UTF-8.") from e


def answer_batch(pipe: Any, batch: list[dict[str, np.ndarray]]) -> list[list[str] | VispruneError]:
    """Per request (a dict of its input arrays): its rows' answers, or the error that makes it a bad request.
    Every good request's rows run as ONE `generate_encoded` call (chunked by the engine's max batch)."""
    encoded = [_attempt(encode_rows, pipe, inputs) for inputs in batch]
    good = [row for rows in encoded if not isinstance(rows, VispruneError) for row in rows]
    texts = iter([g.text for g in pipe.generate_encoded(good)] if good else [])
    return [rows if isinstance(rows, VispruneError) else [next(texts) for _ in rows] for rows in encoded]


def _attempt(function: Callable, *args: Any) -> Any:
    try:
        return function(*args)
    except VispruneError as e:
        return e


def check_parameters(parameters: dict[str, Any]) -> None:
    """A request's KServe v2 `parameters` (those Triton itself acts on, such as priority and timeout, never reach
    the model): the model knows none, so any is refused; ignored, a client would believe e.g. its limit applied."""
    if parameters:
        raise InputDataError(f"This model knows no request parameter, got {', '.join(sorted(parameters))}.",
                             f"Send generation settings as inputs instead: {', '.join(SETTING_INPUTS)} (e.g. "
                             "max_new_tokens for a token limit); README: Serve lists them. Triton's own "
                             "parameters (priority, timeout) are accepted.")


def error_status(error: BaseException) -> str:
    """The pb_utils.TritonError code for a request's error: the client's mistake, or ours."""
    return "INVALID_ARG" if isinstance(error, (InputDataError, ConfigError)) else "INTERNAL"


def error_message(error: BaseException) -> str:
    if isinstance(error, VispruneError):
        return str(error)  # the message and its Hint
    return (f"internal error in visprune ({type(error).__name__}: {error}); the server log has the traceback.\n"
            "Hint: please report it; the server keeps serving other requests.")


class TritonPythonModel:
    """What Triton's Python backend runs (each instance in its own process): `initialize` loads the pipeline
    once, `execute` gets each batch the scheduler formed. The backend calls `execute` one batch at a time per
    instance, so the pipeline (not thread-safe) is never entered twice."""

    def initialize(self, args: dict[str, str]) -> None:
        from runtime.pipeline import Pipeline

        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.pipe = Pipeline.from_engine_dir(engine_dir_of(Path(args["model_repository"]), parameters))

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        live = [r for r in requests if not r.is_cancelled()]  # a client that gave up costs no generation
        answers = {id(r): e for r in live if (e := _attempt(check_parameters, json.loads(r.parameters())))}
        live = [r for r in live if id(r) not in answers]
        try:
            answers.update(zip(map(id, live), answer_batch(self.pipe, [_inputs(pb_utils, r) for r in live])))
        except Exception as e:  # the batch itself failed, not one request: all of them get the error
            pb_utils.Logger.log_error(traceback.format_exc())
            answers.update({id(r): e for r in live})
        return [_response(pb_utils, answers.get(id(r))) for r in requests]


def _inputs(pb_utils: Any, request: Any) -> dict[str, np.ndarray]:
    tensors = {spec.name: pb_utils.get_input_tensor_by_name(request, spec.name) for spec in INPUTS}
    return {name: tensor.as_numpy() for name, tensor in tensors.items() if tensor is not None}


def _response(pb_utils: Any, answer: list[str] | BaseException | None) -> Any:
    if answer is None:  # cancelled before it ran
        error = pb_utils.TritonError("The request was cancelled.", pb_utils.TritonError.CANCELLED)
        return pb_utils.InferenceResponse(error=error)
    if isinstance(answer, BaseException):
        code = getattr(pb_utils.TritonError, error_status(answer))
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(answer), code))
    text = np.array([[t.encode("utf-8")] for t in answer], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT.name, text)])


# --- the server ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Ports of the three endpoints (on every interface) and, when serving an engine folder, how Triton
    schedules it (an exported repository brings its own config.pbtxt)."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    settings: ModelSettings | None = None  # None: ModelSettings()'s defaults (an engine) or the repository's
    log_file: Path | None = None  # tritonserver's log (default: a temporary file, quoted in startup errors)
    exit_timeout_s: int = 10  # how long a stopping tritonserver lets requests in flight finish

    def ports(self) -> dict[str, int]:
        """{CLI flag: port} of the three endpoints."""
        return {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}

    def __post_init__(self) -> None:
        ports = self.ports()
        for flag, port in ports.items():
            if not 0 < port < 65536:
                raise ConfigError(f"{flag} must be a port number (1-65535), got {port}.", f"Pass e.g. {flag} 8000.")
        if self.exit_timeout_s < 0:
            raise ConfigError(f"The exit timeout must be at least 0 s, got {self.exit_timeout_s}.",
                              "Pass e.g. exit_timeout_s=10.")
        if len(set(ports.values())) < 3:
            raise ConfigError(f"The three endpoints need three ports, got {ports}.", "Give each its own port.")


@dataclass
class Server:
    """A running server: where to reach it, which models it serves, and how long it took to become ready."""

    http_url: str
    grpc_url: str
    metrics_url: str
    models: list[str]
    start_seconds: float
    triton: Any = field(repr=False)
    log_file: Path = field(repr=False)
    log_hint: str = field(repr=False, default="")

    def describe(self) -> str:
        lines = [f"Triton Inference Server ready in {self.start_seconds:.1f} s, serving {', '.join(self.models)}",
                 f"  HTTP     {self.http_url}   (POST /v2/models/{self.models[0]}/infer)",
                 f"  gRPC     {self.grpc_url}",
                 f"  health   {self.http_url}/v2/health/ready",
                 f"  metrics  {self.metrics_url}/metrics",
                 f"  log      {self.log_file}",
                 "Ctrl-C stops it."]
        return "\n".join(lines)

    def wait(self, poll_s: float = 0.5) -> None:
        """Block while tritonserver runs; its exiting on its own is an error (its log says why)."""
        while self.triton.is_alive():
            time.sleep(poll_s)
        raise BackendUnavailableError(f"Triton Inference Server exited.{_log_errors(self.log_file)}", self.log_hint)


def serve(config: ServeConfig, engine_dir: Path | None = None, repository: Path | None = None,
          on_ready: Callable[[Server], None] = lambda server: None) -> None:
    """Serve `engine_dir` (or an exported `repository`) until Ctrl-C or SIGTERM, which stop it cleanly."""
    with contextlib.suppress(KeyboardInterrupt):
        with start_server(config, engine_dir, repository) as server:
            on_ready(server)
            server.wait()


@contextlib.contextmanager
def start_server(config: ServeConfig, engine_dir: Path | None = None,
                 repository: Path | None = None) -> Iterator[Server]:
    """A tritonserver serving `engine_dir` (through a temporary repository that points at it) or `repository`
    (one `export-triton` wrote), ready when this yields; stopped, and its temporary files gone, on exit."""
    if (engine_dir is None) == (repository is None):
        raise ConfigError("Serve either an engine folder or a model repository.", "Pass --engine or --repo.")
    if repository is not None and config.settings is not None:
        raise ConfigError("A model repository is served as its config.pbtxt says; the scheduling flags apply to "
                          "--engine.", "Drop them, or write the repository again with them (export-triton).")
    triton_class, triton_config = _pytriton()
    for flag, port in config.ports().items():
        _check_port_free(flag, port)
    with tempfile.TemporaryDirectory(prefix="visprune-serve-") as tmp:
        settings = config.settings or ModelSettings()
        repo = Path(repository) if repository else _temporary_repository(Path(engine_dir), settings, tmp)
        log_file = Path(config.log_file or Path(tmp) / "tritonserver.log").resolve()
        log_hint = (f"tritonserver's log {log_file} says why." if config.log_file else
                    "Pass --log-file PATH to keep tritonserver's whole log (the lines above are its errors).")
        triton = triton_class(config=triton_config(
            model_repository=repo.resolve(), http_port=config.http_port, grpc_port=config.grpc_port,
            metrics_port=config.metrics_port, log_file=log_file, exit_timeout_secs=config.exit_timeout_s))
        started, tritonserver = time.perf_counter(), set()
        try:
            _run_until_ready(triton, log_file, log_hint, tritonserver)
            yield Server(f"http://localhost:{config.http_port}", f"grpc://localhost:{config.grpc_port}",
                         f"http://localhost:{config.metrics_port}", models_in(repo),
                         time.perf_counter() - started, triton, log_file, log_hint)
        finally:
            _stop(triton, tritonserver)


def _stop(triton: Any, tritonserver: set[int]) -> None:
    """Stop tritonserver and every process under it. A tritonserver whose exit timeout ends while a Python-backend
    stub still runs a batch exits without it: the stub, orphaned, would run on. So this process adopts orphans
    meanwhile (a child subreaper), and ends and reaps whatever of the tree outlives tritonserver."""
    tree = {pid: start for root in tritonserver for pid, start in _process_tree(root).items()}
    adopting = _subreaper(True)
    try:
        triton.stop()
        _end(tree, spare=tritonserver)
    finally:
        _subreaper(adopting)


def _pytriton() -> tuple[Any, Any]:
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise BackendUnavailableError(f"nvidia-pytriton is not installed ({e}); it provides tritonserver.",
                                      SERVE_HINT) from e
    return Triton, TritonConfig


def _check_port_free(flag: str, port: int) -> None:
    """A port something listens on fails here, not as a tritonserver that exits half-started."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no user
        try:
            probe.bind(("", port))
        except OSError as e:
            raise ConfigError(f"Port {port} ({flag}) is not free: {e.strerror}.",
                              f"Stop what listens there, or choose another port with {flag}.") from e


def _temporary_repository(engine_dir: Path, settings: ModelSettings, tmp: str) -> Path:
    from visprune.manifests.engine_set import read_engine_set

    read_engine_set(engine_dir)  # a missing or broken engine fails here, not in tritonserver's log
    repo = Path(tmp) / "repository"
    write_repository(repo, engine_dir, settings, copy_engine=False)
    return repo


def models_in(repository: Path) -> list[str]:
    models = sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))
    if not models:
        raise ConfigError(f"{repository} holds no Triton model (no */config.pbtxt).",
                          "Pass a folder written by `visprune export-triton`, or serve an engine with --engine.")
    return models


def _run_until_ready(triton: Any, log_file: Path, log_hint: str, started: set[int]) -> None:
    """pytriton's `run()` (start tritonserver, wait until it and every model are ready), except that a
    tritonserver that exits while starting (a model that fails to load) ends the wait at once with the log's
    errors, where pytriton would wait its full 120 s. Adds the tritonserver's pid to `started`."""
    starting, exited, lock = threading.Event(), threading.Event(), threading.Lock()
    starting.set()
    before = _tritonserver_children()
    threading.Thread(target=_watch_start, args=(before, starting, exited, lock), daemon=True).start()
    try:
        with _python_library_first():
            try:
                triton.run()
            finally:
                started.update(_tritonserver_children() - before)
    except BaseException as e:  # the watchdog's interrupt can surface as pytriton's timeout, so ask it first
        if exited.is_set():
            raise BackendUnavailableError(f"Triton Inference Server exited while starting.{_log_errors(log_file)}",
                                          f"{log_hint} `visprune run --engine` on the same engine shows whether "
                                          "the engine itself loads.") from e
        if not isinstance(e, Exception):  # Ctrl-C
            raise
        raise BackendUnavailableError(f"Triton Inference Server did not become ready ({e}).{_log_errors(log_file)}",
                                      log_hint) from e
    finally:
        with lock:
            starting.clear()


def _watch_start(before: set[int], starting: threading.Event, exited: threading.Event,
                 lock: threading.Lock) -> None:
    """Interrupt the main thread's wait when the tritonserver it started exits. The process is watched in /proc:
    pytriton's `is_alive()` would run pytriton's exit handler in this thread, which waits for the very lock
    that the main thread's wait holds."""
    pid = None
    while starting.is_set():
        pid = pid or next(iter(_tritonserver_children() - before), None)
        if pid is not None and _process_state(pid) in (None, "Z"):
            with lock:
                if starting.is_set():
                    exited.set()
                    _thread.interrupt_main()
            return
        time.sleep(0.05)


def _tritonserver_children() -> set[int]:
    return {pid for pid, (name, parent) in _processes().items() if name == "tritonserver" and parent == os.getpid()}


def _process_tree(root: int) -> dict[int, int]:
    """`root` and every process below it: pid -> start time (which tells a pid reused since from the process)."""
    children: dict[int, list[int]] = {}
    for pid, (_, parent) in _processes().items():
        children.setdefault(parent, []).append(pid)
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        start = _start_time(pid)
        if start is not None:
            tree[pid] = start
            frontier += children.get(pid, [])
    return tree


def _end(tree: dict[int, int], spare: set[int]) -> None:
    """SIGTERM every process of `tree` still running, SIGKILL any left after a grace, and reap those that are our
    children (adopted orphans) until none is left, not even as a zombie; `spare`: pids pytriton waits for itself
    (reaping them here would race it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _left(tree):
            if _process_state(pid) != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + _KILL_GRACE_S
        while _left(tree) and time.monotonic() < deadline:
            for pid in set(_left(tree)) - spare:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)


def _left(tree: dict[int, int]) -> list[int]:
    """The processes of `tree` that still exist, running or exited but not yet reaped."""
    return [pid for pid, start in tree.items() if _start_time(pid) == start]


def _start_time(pid: int) -> int | None:
    try:
        return int(_after_name(Path(f"/proc/{pid}/stat").read_text())[19])
    except (OSError, IndexError, ValueError):
        return None


def _subreaper(on: bool) -> bool:
    """Make this process adopt its orphaned descendants (Linux), or stop; returns whether it did before."""
    import ctypes

    libc, was = ctypes.CDLL(None, use_errno=True), ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(was.value)


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (command name, parent pid), from /proc/PID/stat ("pid (name) state ppid ...")."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            found[int(stat.parent.name)] = (text[text.index("(") + 1:text.rindex(")")], int(_after_name(text)[1]))
    return found


def _process_state(pid: int) -> str | None:
    """'R', 'S', ... or 'Z' (exited, not yet reaped); None: gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return _after_name(text)[0]


def _after_name(stat: str) -> list[str]:
    """The fields of a /proc/PID/stat line after "(name)": state, ppid, ... (a name may hold spaces and ")")."""
    return stat[stat.rindex(")") + 2:].split()


@contextlib.contextmanager
def _python_library_first() -> Iterator[None]:
    """The Python backend's stub links libpython3.X.so; the loader would find the system's copy, whose standard
    library differs from this interpreter's (pyenv, a venv) and breaks the model's imports (e.g. `'_thread.RLock'
    object has no attribute '_recursion_count'`). tritonserver and its stubs inherit the environment pytriton
    copies when it starts them, so this interpreter's library folder goes first just for that."""
    previous = os.environ.get("LD_LIBRARY_PATH")
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, previous) if p)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = previous


def _log_errors(log_file: Path, lines: int = 6) -> str:
    """The last error lines of tritonserver's log (Triton starts them with 'E' and the date), less the one every
    start without a GPU logs."""
    try:
        text = Path(log_file).read_text(errors="replace")
    except OSError:
        return ""
    errors = [line for line in text.splitlines()
              if line[:1] == "E" and line[1:5].isdigit() and "CudaDriverHelper has not been initialized" not in line]
    return "\n" + "\n".join(errors[-lines:]) if errors else ""
