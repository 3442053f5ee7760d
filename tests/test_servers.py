"""flywheel.servers: a managed server's start, wait and stop (its whole process group), the
messages when it does not come up, the least-busy balancer, and the `python -m
flywheel.servers llama-cpp -- CMD` entry against the real llama.cpp server."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flywheel.errors import FlywheelError
from flywheel.servers import (
    Balancer,
    ManagedServer,
    free_port,
    main,
    redact_argv,
    secret_values,
)

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def live(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (read from /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in "ZX"


def group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (read from /proc, independently of the module)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def get(url: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_server(tmp_path: Path, port: int, *, grandchild: bool = True) -> list[str]:
    """A real HTTP server (`python -m http.server`) started by a shell that first puts a
    `sleep` in the background: a process group of two."""
    serve = f"exec {sys.executable} -m http.server --bind 127.0.0.1 --directory {tmp_path} {port}"
    return ["sh", "-c", f"sleep 300 & {serve}" if grandchild else serve]


# -- helpers ----------------------------------------------------------------------------------

def test_free_port_can_be_bound():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redact_argv_hides_both_flag_spellings():
    argv = ["srv", "--api_key", "S1", "--api-key=S2", "--port", "80", "--api-key", "S3"]
    assert redact_argv(argv) == ["srv", "--api_key", "***", "--api-key=***", "--port", "80",
                                 "--api-key", "***"]
    assert sorted(secret_values(argv)) == ["S1", "S2", "S3"]


# -- the managed server -----------------------------------------------------------------------

@linux_only
@pytest.mark.parametrize("how", ["normal", "exception", "ctrl-c"])
def test_process_group_is_gone_after_the_block(tmp_path, how):
    port = free_port()
    server = ManagedServer(http_server(tmp_path, port), port=port, health_path="/",
                           log_path=tmp_path / "log.txt")
    expected = {"normal": contextlib.nullcontext(), "ctrl-c": pytest.raises(KeyboardInterrupt),
                "exception": pytest.raises(RuntimeError, match="boom")}[how]
    with expected:
        with server:
            assert server.base_url == f"http://127.0.0.1:{port}/v1"
            assert get(server.url + "/")[0] == 200
            assert len(group(server.pid)) == 2  # the shell's sleep and the server
            if how == "exception":
                raise RuntimeError("boom")
            if how == "ctrl-c":
                raise KeyboardInterrupt
    assert group(server.pid) == []
    assert server.proc is None and server.returncode is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.stop()  # a second stop does nothing


def test_startup_timeout_names_the_command_and_log_and_redacts_the_key(tmp_path):
    log = tmp_path / "server.log"
    script = "import sys, time; print('starting with', sys.argv[1:], flush=True); time.sleep(60)"
    argv = [sys.executable, "-c", script, "--api_key", "SECRET-abc-123"]
    server = ManagedServer(argv, port=free_port(), log_path=log, startup_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(FlywheelError) as err:
        server.start()
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert 1.5 <= elapsed < 5, elapsed
    assert message.startswith(f"the server did not answer http://127.0.0.1:{server.port}"
                              f"/v1/models within 1.5 s\n")
    assert "  command: " in message and "time.sleep(60)" in message
    assert "--api_key '***'" in message
    assert f"  log: {log}\n" in message
    assert "starting with ['--api_key', '***']" in message  # the log's tail, redacted
    assert "SECRET-abc-123" not in message
    assert "SECRET-abc-123" in log.read_text()  # what the process itself printed
    assert not live(server.pid)


def test_early_exit_shows_the_code_and_the_log_tail(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("an older run\n" * 50)
    lines = "; ".join(f"print('line {i}')" for i in range(25))
    argv = [sys.executable, "-c", f"{lines}; raise SystemExit(3)"]
    with pytest.raises(FlywheelError) as err:
        with ManagedServer(argv, port=free_port(), log_path=log, startup_timeout=30):
            pass
    message = str(err.value)
    assert message.startswith("the server exited with code 3 before answering http://")
    assert "last 20 lines of the log:\n    line 5\n" in message  # this start's lines only
    assert message.count("\n    line ") == 20 and "an older run" not in message
    assert "line 24\n  what to do: " in message


def test_a_missing_program_is_a_clear_error(tmp_path):
    server = ManagedServer(["/nonexistent/server", "--api-key=K-1"], port=free_port(),
                           log_path=tmp_path / "log")
    with pytest.raises(FlywheelError, match="cannot start the server: No such file") as err:
        server.start()
    assert "--api-key=***" in str(err.value) and "K-1" not in str(err.value)


def test_a_rejected_key_fails_at_once(llama_server, tmp_path):
    """A health URL that answers 401 (here: the running llama.cpp server, asked without its
    key) fails without waiting for the timeout."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = ManagedServer(argv, port=int(llama_server.url.rsplit(":", 1)[1]),
                           headers={"Authorization": "Bearer wrong"},
                           log_path=tmp_path / "log", startup_timeout=60)
    start = time.monotonic()
    with pytest.raises(FlywheelError, match=r"the server answered 401 at http://127.0.0.1:"):
        server.start()
    assert time.monotonic() - start < 10
    assert not live(server.pid)


@linux_only
def test_a_server_that_ignores_sigterm_is_killed(tmp_path):
    port = free_port()
    script = ("import http.server, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), "
              "bind='127.0.0.1')")
    server = ManagedServer([sys.executable, "-c", script, str(port)], port=port,
                           health_path="/", log_path=tmp_path / "log", stop_timeout=1)
    with server:
        start = time.monotonic()
    assert 1 <= time.monotonic() - start < 5
    assert server.returncode == -signal.SIGKILL
    assert group(server.pid) == []


@linux_only
def test_the_server_dies_with_its_parent(tmp_path):
    """SIGKILL the process that started the server: the server gets SIGTERM (prctl
    PR_SET_PDEATHSIG) and ends."""
    port = free_port()
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from flywheel.servers import ManagedServer
        argv = {http_server(tmp_path, port, grandchild=False)!r}
        log = Path({str(tmp_path)!r}) / "log"
        with ManagedServer(argv, port={port}, health_path="/", log_path=log) as server:
            print(os.getpid(), server.pid, flush=True)
            time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        parent_pid, server_pid = map(int, parent.stdout.readline().split())
        assert parent_pid == parent.pid and live(server_pid)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not live(server_pid), 10)
    finally:
        parent.kill()
        parent.wait()


# -- the balancer -----------------------------------------------------------------------------

def test_balancer_sends_each_request_to_the_least_busy_upstream():
    names = {}

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.4)
            body = json.dumps({"upstream": names[self.server.server_address[1]],
                               "auth": self.headers.get("Authorization")}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstreams = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow) for _ in range(2)]
    for i, up in enumerate(upstreams):
        names[up.server_address[1]] = f"u{i}"
        threading.Thread(target=up.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{up.server_address[1]}" for up in upstreams]
    answers = []

    def post():
        request = urllib.request.Request(balancer.url + "/v1/x", data=b"{}",
                                         headers={"Authorization": "Bearer k"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answers.append(json.loads(response.read()))

    try:
        with Balancer(urls) as balancer:
            threads = [threading.Thread(target=post) for _ in range(4)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            for t in threads:
                t.join()
            assert sorted(a["upstream"] for a in answers) == ["u0", "u0", "u1", "u1"]
            assert {a["auth"] for a in answers} == {"Bearer k"}
            assert balancer.served == {urls[0]: 2, urls[1]: 2}
            assert balancer.in_flight == {urls[0]: 0, urls[1]: 0}
            upstreams[0].shutdown()
            upstreams[0].server_close()
            statuses = [get(balancer.url + "/v1/models")[0] for _ in range(2)]
            assert sorted(statuses) == [501, 502]  # u1 has no GET; u0 is gone
    finally:
        for up in upstreams:
            up.shutdown()
            up.server_close()


# -- llama.cpp --------------------------------------------------------------------------------

def test_llama_server_serves_the_alias_with_the_key(llama_server):
    status, body = get(llama_server.base_url + "/models", llama_server.api_key)
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["smollm2"]


def test_llama_server_refuses_requests_without_the_key(llama_server):
    assert get(llama_server.base_url + "/models")[0] == 401
    assert get(llama_server.base_url + "/models", "not-the-key")[0] == 401


# -- the command line -------------------------------------------------------------------------

def test_cli_without_llama_cpp_says_how_to_install_it():
    code = ("import sys; sys.modules['llama_cpp'] = None; from flywheel.servers import main; "
            "sys.exit(main(['llama-cpp', '--', 'true']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "error: llama-cpp-python is not installed: run make setup\n"


def test_cli_reports_bad_arguments_together(tmp_path, capsys):
    assert main(["llama-cpp", "--parallel", "0", "--gguf", str(tmp_path / "no.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m flywheel.servers llama-cpp: bad arguments\n")
    assert "  - give the command to run after --" in err
    assert "  - --parallel 0: give 1 or more servers" in err
    assert f"  - --gguf {tmp_path / 'no.gguf'}: no such file" in err


#: The command the CLI tests run: records its arguments, the key it was given, the llama.cpp
#: servers started by its parent, and what the served endpoint answers; then exits with 3
#: (`sleep` as 2nd argument: waits to be stopped instead).
CHILD = textwrap.dedent("""
    import json, os, sys, threading, time, urllib.request
    from pathlib import Path
    out, mode, base_url, var = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    key = os.environ[var]
    def servers():
        found = []
        for e in Path("/proc").iterdir():
            try:
                if (e.name.isdigit() and e.name != str(os.getpid()) and
                        (e / "stat").read_text().rpartition(")")[2].split()[1] == str(os.getppid())
                        and b"llama_cpp.server" in (e / "cmdline").read_bytes()):
                    found.append(int(e.name))
            except OSError:
                pass
        return found
    def call(path, body=None):
        req = urllib.request.Request(base_url + path, headers={"Authorization": "Bearer " + key,
                                     "Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    record = {"argv": sys.argv[1:], "key": key, "pid": os.getpid(), "servers": servers(),
              "models": [m["id"] for m in call("/models")["data"]]}
    if mode == "chat":
        chat = {"model": "smollm2", "max_tokens": 8, "seed": 1,
                "messages": [{"role": "user", "content": "Say hi"}]}
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(call("/chat/completions", chat)))
                   for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        record["answers"] = len(answers)
    Path(out).write_text(json.dumps(record))
    if mode == "sleep":
        time.sleep(120)
    sys.exit(3)
""")


def cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_API_KEY"}
    return subprocess.Popen([sys.executable, "-m", "flywheel.servers", "llama-cpp", *args],
                            cwd=ROOT, env={**full_env, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@linux_only
def test_cli_runs_the_command_against_two_servers_and_stops_them(tmp_path, llama_server):
    """`--parallel 2`: two llama.cpp servers behind one port; the command gets `{base_url}`
    replaced and a random key in FLYWHEEL_API_KEY, both concurrent requests are served by
    different servers; the CLI exits with the command's code, prints no key and leaves no
    server behind. (llama_server: llama.cpp is installed.)"""
    out, log = tmp_path / "child.json", tmp_path / "llama.log"
    proc = cli(tmp_path, "--alias", "smollm2", "--parallel", "2", "--log", str(log), "--",
               sys.executable, "-c", CHILD, str(out), "chat", "{base_url}", "FLYWHEEL_API_KEY",
               "url={base_url}/x")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    record = json.loads(out.read_text())
    base_url = record["argv"][2]
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    assert record["argv"][4] == f"url={base_url}/x"
    assert record["models"] == ["smollm2"] and record["answers"] == 2
    assert len(record["key"]) == 32  # secrets.token_urlsafe(24)
    assert record["key"] not in stdout + stderr
    assert f"serving at {base_url} (a random key for this run, in $FLYWHEEL_API_KEY)" in stderr
    assert "command exited with 3; stopping the server" in stderr
    assert len(record["servers"]) == 2
    assert not any(live(pid) for pid in record["servers"])
    for i in (1, 2):  # each server answered one of the two concurrent requests
        text = (tmp_path / f"llama.{i}.log").read_text()
        assert text.count('"POST /v1/chat/completions HTTP/1.1" 200') == 1, i
        assert record["key"] not in text
    port = int(base_url.split(":")[2].split("/")[0])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@linux_only
def test_cli_sigterm_stops_the_command_and_the_server(tmp_path, llama_server):
    out = tmp_path / "child.json"
    key = "given-key-not-secret-456"
    proc = cli(tmp_path, "--alias", "smollm2", "--api-key-env", "MY_KEY", "--log",
               str(tmp_path / "llama.log"), "--", sys.executable, "-c", CHILD, str(out),
               "sleep", "{base_url}", "MY_KEY", env={"MY_KEY": key})
    try:
        assert wait_until(out.exists, 120), proc.stderr.read() if proc.poll() else "no output"
        record = json.loads(out.read_text())
        assert record["key"] == key and record["models"] == ["smollm2"]
        assert len(record["servers"]) == 1 and live(record["servers"][0])
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM  # the command's own end: killed by SIGTERM
    assert "command exited with 143; stopping the server" in stderr
    assert "(the key in $MY_KEY)" in stderr and key not in stdout + stderr
    assert not live(record["pid"]) and not live(record["servers"][0])


@pytest.mark.parametrize("ci", ["true", ""])
def test_llama_server_fixture_skips_without_llama_cpp_except_on_ci(tmp_path, ci):
    """Without llama-cpp-python the endpoint tests are skipped, with the reason; on CI (where
    it is installed) they fail instead."""
    (tmp_path / "hide_llama_cpp.py").write_text("import sys\nsys.modules['llama_cpp'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CI": ci}
    test = "tests/test_servers.py::test_llama_server_refuses_requests_without_the_key"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "hide_llama_cpp",
                           "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    reason = "llama-cpp-python is not installed: run `make setup`"
    if ci:
        assert proc.returncode == 1, proc.stdout
        assert f"{reason} (CI=true: the endpoint tests must run on CI)" in proc.stdout
        assert "1 error" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout
        assert f"SKIPPED [1] {test.split('::')[0]}:" in proc.stdout and reason in proc.stdout
        assert "1 skipped" in proc.stdout
