"""Servers that flywheel starts itself: an OpenAI-compatible server (llama.cpp's today, `vllm
serve` later) run as a process group that is started, waited for and always stopped.

    port = free_port()
    argv = llama_cpp_argv(gguf, port=port, alias="smollm2")
    with ManagedServer(argv, port=port, headers={"Authorization": f"Bearer {key}"},
                       env=llama_cpp_env(key), log_path=Path("server.log")) as server:
        ...  # server.base_url == f"http://127.0.0.1:{port}/v1"

`python -m flywheel.servers llama-cpp [OPTIONS] -- CMD ARGS...` serves a GGUF file with
llama.cpp's server, runs CMD against it (every `{base_url}` in its arguments replaced, the key
in its environment) and stops the server, also on Ctrl-C and SIGTERM.

llama-cpp-python's server answers one request at a time (it has no parallel slots); several
replicas behind a `Balancer` (least busy first) serve requests side by side: `--parallel N`.

Stdlib only at import time: `flywheel --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import importlib.util
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

from flywheel.errors import FlywheelError

#: Command-line flags whose value is a secret: shown as REDACTED in every message.
SECRET_FLAGS = ("--api_key", "--api-key")
REDACTED = "***"
LOG_TAIL_LINES = 20
#: Modules of `llama-cpp-python[server]` that its server imports.
LLAMA_CPP_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette",
                            "starlette_context", "pydantic_settings")
NOT_INSTALLED = "llama-cpp-python is not installed: run make setup"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redact_argv(argv: Iterable[str]) -> list[str]:
    """`argv` with the value of every secret flag (`--api_key KEY`, `--api-key=KEY`) replaced
    by REDACTED."""
    out: list[str] = []
    hide = False
    for arg in map(str, argv):
        flag, eq, _ = arg.partition("=")
        if hide:
            out.append(REDACTED)
            hide = False
        elif flag in SECRET_FLAGS and eq:
            out.append(f"{flag}={REDACTED}")
        else:
            out.append(arg)
            hide = arg in SECRET_FLAGS
    return out


def secret_values(argv: Iterable[str]) -> list[str]:
    """The values of the secret flags in `argv` (what `redact_argv` hides)."""
    argv = [str(a) for a in argv]
    values = [a.partition("=")[2] for a in argv if a.partition("=")[0] in SECRET_FLAGS]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in SECRET_FLAGS]
    return [v for v in values if v]


def redact(text: str, secrets_: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by REDACTED."""
    for value in sorted(set(secrets_), key=len, reverse=True):
        if value:
            text = text.replace(value, REDACTED)
    return text


# -- process groups ---------------------------------------------------------------------------

def _libc():
    """libc for prctl, loaded before any fork (None off Linux or where it cannot be loaded)."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def child_setup(*, new_group: bool = False, unblock: Iterable[int] = ()):
    """A `preexec_fn` for a child that must not outlive flywheel: on Linux it gets SIGTERM when
    the thread that started it ends (prctl PR_SET_PDEATHSIG; start children from the main
    thread), and exits at once if its parent already died. `new_group` puts it in a process
    group of its own (the terminal's Ctrl-C then reaches flywheel only); `unblock` unblocks
    signals that the parent blocked around the fork."""
    libc = _libc()
    parent = os.getpid()
    unblock = set(unblock)

    def setup() -> None:
        if new_group:
            os.setpgid(0, 0)
        if unblock:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)
        if libc is not None:
            libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return setup


_SPAWNER = None
_SPAWNER_LOCK = threading.Lock()


def spawn(*args, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(*args, **kwargs)` from a thread that lives as long as this process:
    the main thread, or else one spawning thread kept for the purpose. A child set up by
    `child_setup` gets its parent-death signal when the thread that started it ends, and a
    Prefect task's worker thread can end long before flywheel does."""
    global _SPAWNER
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            from concurrent.futures import ThreadPoolExecutor

            _SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="flywheel-spawn")
    return _SPAWNER.submit(subprocess.Popen, *args, **kwargs).result()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid` (Linux: from /proc; elsewhere
    `[pgid]` while the group can be signalled)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- the managed server -----------------------------------------------------------------------

class ManagedServer:
    """An OpenAI-compatible server process that flywheel starts, waits for and always stops.

    `argv` runs in a session (and process group) of its own, its stdout and stderr appended to
    `log_path`, with `env` added to the current environment; on Linux it dies with the thread
    that started it (start it from the main thread). Ready when
    `http://127.0.0.1:{port}{health_path}` answers 200 to a GET with `headers` (e.g. the bearer
    key); otherwise a `FlywheelError` after `startup_timeout` seconds or as soon as the process
    exits, naming the command (secret flags redacted), the log and its last lines.

    Leaving the `with` block (normally, by an exception or by Ctrl-C) or `stop()` sends
    SIGTERM to the whole process group, waits up to `stop_timeout` seconds for it to end, then
    SIGKILLs what is left. `secrets` are values (beyond those of `--api_key`) that never appear
    in a message, e.g. a key passed in `env`.
    """

    def __init__(self, argv: list[str], *, port: int, health_path: str = "/v1/models",
                 headers: dict | None = None, log_path: Path, env: dict | None = None,
                 startup_timeout: float = 120, stop_timeout: float = 10,
                 secrets: Iterable[str] = ()):
        self.argv = [str(a) for a in argv]
        self.port = int(port)
        self.health_path = health_path if health_path.startswith("/") else "/" + health_path
        self.headers = dict(headers or {})
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.startup_timeout = float(startup_timeout)
        self.stop_timeout = float(stop_timeout)
        self.secrets = secret_values(self.argv) + [str(s) for s in secrets if s]
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # also the process group's id; kept after `stop()`
        self.returncode: int | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """The server's root URL, `http://127.0.0.1:PORT`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, `http://127.0.0.1:PORT/v1`."""
        return self.url + "/v1"

    @property
    def command(self) -> str:
        """The command line as shown in messages: secret flags redacted."""
        return shlex.join(redact_argv(self.argv))

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ManagedServer:
        """Start the process and wait until it answers; on any failure (or Ctrl-C) stop it."""
        try:
            self.launch()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (`wait_ready` waits)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.command}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} flywheel starts: {self.command}\n".encode())
            log.flush()
            try:
                self.proc = spawn(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env} if self.env else None,
                    start_new_session=True, preexec_fn=child_setup())
                self.pid = self.proc.pid
            except OSError as exc:
                raise FlywheelError(f"cannot start the server: {exc.strerror or exc}", details=[
                    f"command: {self.command}",
                    "check that the program exists and is executable"]) from None

    def wait_ready(self) -> None:
        """Poll the health URL until it answers 200; a FlywheelError if the process exits, the
        URL answers 401/403/404, or `startup_timeout` passes."""
        url = self.url + self.health_path
        deadline = time.monotonic() + self.startup_timeout
        pause = 0.05
        while True:
            code = self.proc.poll()
            if code is not None:
                raise self._failure(f"the server exited with code {code} before answering "
                                    f"{url}", "read the log above: it says why")
            status = _probe(url, self.headers, timeout=max(0.1, min(5.0, deadline -
                                                                     time.monotonic())))
            if status == 200:
                return
            if status in (401, 403, 404):
                raise self._failure(
                    f"the server answered {status} at {url}",
                    "401/403: the key in the headers was not accepted; "
                    "404: the health path is wrong for this server")
            if time.monotonic() >= deadline:
                raise self._failure(
                    f"the server did not answer {url} within {self.startup_timeout:g} s",
                    "read the log above; a large model may need a longer startup timeout")
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines this start wrote to the log, secrets redacted."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [redact(line, self.secrets) for line in text.splitlines()[-lines:]]

    def _failure(self, what: str, fix: str) -> FlywheelError:
        tail = self.log_tail()
        shown = "\n".join(f"    {line}" for line in tail) or "    (nothing)"
        return FlywheelError(
            f"{what}\n  command: {self.command}\n  log: {self.log_path}\n"
            f"  last {len(tail)} lines of the log:\n{shown}\n  what to do: {fix}")

    def stop(self) -> None:
        """SIGTERM to the process group, up to `stop_timeout` s to end, then SIGKILL. Safe to
        call more than once."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # the leader of a session of its own
        try:
            if proc.poll() is None or group_members(pgid):
                _signal_group(pgid, signal.SIGTERM)
                deadline = time.monotonic() + self.stop_timeout
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=self.stop_timeout)
                while group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:  # also when a second Ctrl-C cuts the wait short
            if proc.poll() is None or group_members(pgid):
                _signal_group(pgid, signal.SIGKILL)
            self.returncode = proc.wait()
            self.proc = None


def _probe(url: str, headers: dict, *, timeout: float) -> int | None:
    """The HTTP status of a GET of `url`, or None when nothing answers (yet)."""
    request = urllib.request.Request(url, headers=headers)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
    try:
        with direct.open(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, half an answer
        return None


# -- llama.cpp --------------------------------------------------------------------------------

def llama_cpp_argv(gguf: Path, *, port: int, alias: str, n_ctx: int = 2048,
                   threads: int | None = None, python: str = sys.executable) -> list[str]:
    """The command that serves `gguf` with llama-cpp-python's OpenAI-compatible server on
    127.0.0.1:`port` as model `alias`. The key it requires goes in its environment
    (`llama_cpp_env`), not on its command line, where any user of the machine could read it.
    `threads`: CPU threads for generation and prompt processing (None: llama.cpp's defaults,
    half the cores for generation). One request at a time: run replicas for more."""
    argv = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(int(port)), "--model_alias", alias, "--n_ctx", str(int(n_ctx))]
    if threads is not None:
        argv += ["--n_threads", str(int(threads)), "--n_threads_batch", str(int(threads))]
    return argv


def llama_cpp_env(api_key: str | None) -> dict[str, str]:
    """The environment that makes llama-cpp-python's server require `api_key` as a bearer
    token (its settings read API_KEY); empty for no key."""
    return {"API_KEY": api_key} if api_key else {}


def llama_cpp_missing() -> list[str]:
    """The modules of `llama-cpp-python[server]` that this interpreter cannot import."""
    return [m for m in LLAMA_CPP_SERVER_MODULES if importlib.util.find_spec(m) is None]


@contextlib.contextmanager
def llama_cpp_servers(gguf: Path, *, api_key: str | None, alias: str, log_path: Path,
                      port: int = 0, parallel: int = 1, n_ctx: int = 2048,
                      threads: int | None = None, startup_timeout: float = 120,
                      python: str = sys.executable) -> Iterator[str]:
    """Serve `gguf` and yield the base URL (`http://127.0.0.1:PORT/v1`) until the block ends.
    `parallel` > 1: that many servers (each `threads` threads, by default the cores shared
    out), logs `NAME.1.log`, `NAME.2.log`... beside `log_path`, behind a `Balancer` on
    `port`."""
    port = port or free_port()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if parallel <= 1:
        argv = llama_cpp_argv(gguf, port=port, alias=alias, n_ctx=n_ctx, threads=threads,
                              python=python)
        with ManagedServer(argv, port=port, headers=headers, log_path=log_path,
                           env=llama_cpp_env(api_key),
                           startup_timeout=startup_timeout) as server:
            yield server.base_url
        return
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    with contextlib.ExitStack() as stack:
        servers = []
        for i in range(1, parallel + 1):
            own = free_port()
            argv = llama_cpp_argv(gguf, port=own, alias=alias, n_ctx=n_ctx, threads=threads,
                                  python=python)
            log = log_path.with_name(f"{log_path.stem}.{i}{log_path.suffix or '.log'}")
            server = ManagedServer(argv, port=own, headers=headers, log_path=log,
                                   env=llama_cpp_env(api_key),
                                   startup_timeout=startup_timeout)
            stack.callback(server.stop)
            server.launch()
            servers.append(server)
        for server in servers:  # they load side by side
            server.wait_ready()
        balancer = stack.enter_context(Balancer([s.url for s in servers], port=port))
        yield balancer.url + "/v1"


# -- forwarding HTTP (the balancer here, the fault proxy of the tests) ------------------------

#: Headers that concern one connection, not the request: never forwarded.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
               "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
               "content-length", "host"}


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that reads a request whole and can forward it to an upstream server
    and relay the answer (HTTP/1.1, keep-alive; the answer is relayed once complete, so
    streamed answers arrive in one piece). Subclasses define `handle_request(body)`."""

    protocol_version = "HTTP/1.1"
    upstream_timeout = 600.0

    def log_message(self, format, *args) -> None:  # quiet: tests and the CLI own the output
        pass

    def do_GET(self) -> None:
        self.handle_request(self.read_body())

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def handle_request(self, body: bytes) -> None:
        raise NotImplementedError

    def read_body(self) -> bytes:
        """The request body (Content-Length or chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def forward(self, upstream: str, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send this request to `upstream` ("http://HOST:PORT"): (status, headers, body)."""
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=self.upstream_timeout)
        try:
            conn.request(self.command, self.path, body=body if body or self.command in (
                "POST", "PUT", "PATCH") else None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_HEADERS]
            return response.status, kept, data
        finally:
            conn.close()

    def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Answer with `status`, `headers` and the whole `body`."""
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_error(self, status: int, message: str, kind: str,
                    headers: list[tuple[str, str]] = ()) -> None:
        """Answer with an OpenAI-style JSON error body."""
        body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                     "code": None}}).encode()
        self.reply(status, [("Content-Type", "application/json"), *headers], body)


class ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a held request never blocks closing
    allow_reuse_address = True


class Balancer:
    """An HTTP front on 127.0.0.1:`port` (0: a free one) that sends each request to the
    upstream with the fewest requests in flight (ties in turn). A context manager; `.url`."""

    def __init__(self, upstreams: list[str], *, port: int = 0):
        if not upstreams:
            raise ValueError("Balancer: give at least one upstream")
        self.upstreams = list(upstreams)
        self.in_flight = dict.fromkeys(self.upstreams, 0)
        self.served = dict.fromkeys(self.upstreams, 0)
        self._lock = threading.Lock()
        self._turn = 0
        self._port = port
        self._server: ProxyServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _take(self) -> str:
        with self._lock:
            self._turn += 1
            n = len(self.upstreams)
            order = [self.upstreams[(self._turn + i) % n] for i in range(n)]
            upstream = min(order, key=self.in_flight.__getitem__)
            self.in_flight[upstream] += 1
            self.served[upstream] += 1
            return upstream

    def _release(self, upstream: str) -> None:
        with self._lock:
            self.in_flight[upstream] -= 1

    def __enter__(self) -> Balancer:
        balancer = self

        class Handler(ProxyHandler):
            def handle_request(self, body: bytes) -> None:
                upstream = balancer._take()
                try:
                    answer = self.forward(upstream, body)
                except (OSError, http.client.HTTPException) as exc:
                    answer = None
                    failure = f"upstream {upstream} failed: {exc!r}"
                finally:
                    # the upstream is free once it has answered: before the client has it
                    balancer._release(upstream)
                if answer is None:
                    self.reply_error(502, failure, "server_error")
                else:
                    self.reply(*answer)

        self._server = ProxyServer(("127.0.0.1", self._port), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                         name="flywheel-balancer").start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# -- the command line -------------------------------------------------------------------------

class _Stop(BaseException):
    """A SIGINT/SIGTERM received while no command runs: stop the server and exit."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class _Signals:
    """SIGINT and SIGTERM: forwarded to the command while it runs (once: it runs in a process
    group of its own, which the terminal's Ctrl-C does not reach); before it starts they stop
    the start; after it ends they are only recorded (the server is being stopped)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self.received: list[int] = []
        self._old = {}

    def __enter__(self) -> _Signals:
        self._old = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def handle(self, signum, frame=None) -> None:
        self.received.append(signum)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        elif not self.stopping and self.child is None:
            raise _Stop(signum)


def _say(message: str) -> None:
    print(f"flywheel.servers: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel.servers",
        description="Start a local OpenAI-compatible server, run a command against it, stop "
                    "the server.")
    sub = parser.add_subparsers(dest="server", required=True, metavar="SERVER")
    p = sub.add_parser(
        "llama-cpp", help="llama.cpp's server (llama-cpp-python) serving a GGUF file",
        usage="python -m flywheel.servers llama-cpp [OPTIONS] -- CMD ARGS...",
        description="Serve a GGUF file with llama-cpp-python's OpenAI-compatible server on "
                    "127.0.0.1, requiring a key; run CMD with every {base_url} in its "
                    "arguments replaced by the server's base URL (http://127.0.0.1:PORT/v1) "
                    "and the key in its environment; stop the server when CMD ends (also on "
                    "Ctrl-C and SIGTERM, which are passed on to CMD). Exits with CMD's code.")
    p.add_argument("--gguf", type=Path, default=None,
                   help="the model file (default: the bundled SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--alias", default=None,
                   help="the model name the server serves (default: the GGUF file's name "
                        "without .gguf)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--api-key-env", default="FLYWHEEL_API_KEY", metavar="VAR",
                   help="environment variable holding the key (default: FLYWHEEL_API_KEY); "
                        "unset: a random key for this run, given to CMD in VAR")
    p.add_argument("--log", type=Path, default=None,
                   help="server log, appended to (default: llama-cpp-PORT.log in the "
                        "temporary folder)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="N servers behind one port, least busy first (llama-cpp-python's "
                        "server answers one request at a time; default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per server (default: llama.cpp's own with one server, "
                        "the cores shared out with several)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context size (default 2048)")
    p.add_argument("--startup-timeout", type=float, default=120, metavar="S",
                   help="seconds to wait for the server to answer (default 120)")
    return parser


def _check_args(args, cmd: list[str]) -> None:
    problems = []
    if not cmd:
        problems.append("give the command to run after --, e.g. -- flywheel iterate ...")
    if args.parallel < 1:
        problems.append(f"--parallel {args.parallel}: give 1 or more servers")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: give 1 or more")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port}: give a port from 1 to 65535 (0: a free one)")
    if args.n_ctx < 1:
        problems.append(f"--n-ctx {args.n_ctx}: give a positive context size")
    if args.startup_timeout <= 0:
        problems.append(f"--startup-timeout {args.startup_timeout:g}: give seconds > 0")
    if not args.api_key_env.isidentifier():
        problems.append(f"--api-key-env {args.api_key_env!r}: give an environment variable "
                        "name such as FLYWHEEL_API_KEY")
    if args.gguf is not None and not args.gguf.is_file():
        problems.append(f"--gguf {args.gguf}: no such file; give the path of a .gguf model")
    if problems:
        raise FlywheelError("python -m flywheel.servers llama-cpp: bad arguments",
                            details=problems)


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def llama_cpp_main(args, cmd: list[str]) -> int:
    """Serve, run `cmd`, stop; CMD's exit code (or 128 + a signal that stopped the start)."""
    _check_args(args, cmd)
    missing = llama_cpp_missing()
    if "llama_cpp" in missing:
        raise FlywheelError(NOT_INSTALLED)
    if missing:
        raise FlywheelError(f"llama-cpp-python's server extra is incomplete (missing: "
                            f"{', '.join(missing)}): run make setup")
    if args.gguf is None:
        from flywheel.modelprep import bundled_gguf

        args.gguf = bundled_gguf()
    alias = args.alias or args.gguf.name.removesuffix(".gguf")
    var = args.api_key_env
    key = os.environ.get(var) or secrets.token_urlsafe(24)
    given = "the key in" if os.environ.get(var) else "a random key for this run, in"
    port = args.port or free_port()
    log = args.log or Path(tempfile.gettempdir()) / f"llama-cpp-{port}.log"
    with _Signals() as signals:
        try:
            _say(f"starting llama.cpp's server: {args.gguf.name} as {alias!r}, "
                 f"{args.parallel} server(s), log {log}")
            with llama_cpp_servers(args.gguf, api_key=key, alias=alias, log_path=log,
                                   port=port, parallel=args.parallel, n_ctx=args.n_ctx,
                                   threads=args.threads,
                                   startup_timeout=args.startup_timeout) as base_url:
                _say(f"serving at {base_url} ({given} ${var})")
                code = _run_child([a.replace("{base_url}", base_url) for a in cmd],
                                  {**os.environ, var: key}, signals)
                signals.stopping = True
                _say(f"command exited with {code}; stopping the server")
            _say("server stopped")
            return code
        except _Stop as stop:
            signals.stopping = True
            _say(f"{stop}: server stopped")
            return 128 + stop.signum


def _run_child(cmd: list[str], env: dict, signals: _Signals) -> int:
    """Run `cmd` in a process group of its own (dies with this process on Linux), signals
    passed on; its exit code."""
    blocked = set(_Signals.SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # a signal now waits for `child` below
    try:
        signals.child = subprocess.Popen(
            cmd, env=env, preexec_fn=child_setup(new_group=True, unblock=blocked))
    except OSError as exc:
        signals.child = None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        _say(f"cannot run {shlex.join(cmd[:1])}: {exc.strerror or exc}")
        return 127
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    return _exit_code(signals.child.wait())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    try:
        return llama_cpp_main(args, cmd)
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
