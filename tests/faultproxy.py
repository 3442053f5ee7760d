"""A fault-injecting HTTP proxy for the endpoint tests (stdlib only).

    with FaultProxy(server.url) as proxy:          # upstream "http://127.0.0.1:PORT"
        proxy.inject("429", "drop")                 # the next two POSTs fail, in that order
        client = OpenAI(base_url=proxy.url + "/v1", ...)
        ...
        assert proxy.posts == proxy.forwarded + len(proxy.faults)

Every request (method, path, headers including Authorization, body) is forwarded to the
upstream and its status, headers and body relayed. Faults apply to POSTs (completions) only,
one per request: first the queued ones (`inject`), in order, then the standing one
(`fail_always`) until `clear()`. Kinds:

- "429": 429 with `Retry-After: 1` (`retry_after`) and an OpenAI-style JSON error; not forwarded
- "500", "503": that status with a JSON error; not forwarded
- "timeout": hold the request `timeout_s` seconds without answering, then close; not forwarded
- "drop": close the connection without any answer; not forwarded
- "truncate": forward, then answer 200 with only the first half of the upstream body

`strip_logprobs = True` makes it a server without log-probabilities: every relayed JSON
answer loses its choices' `logprobs`.
"""

from __future__ import annotations

import collections
import http.client
import json
import threading

from flywheel.servers import ProxyHandler, ProxyServer

KINDS = ("429", "500", "503", "timeout", "drop", "truncate")


class FaultProxy:
    """A proxy on 127.0.0.1 (a free port) in front of `upstream`. Thread-safe counters:

    - `posts`: POSTs received;
    - `forwarded`: POSTs whose complete upstream answer was relayed (a truncated one is not);
    - `faults`: the fault kinds applied, in order;
    - `counts`: requests by (method, path), every method.
    """

    def __init__(self, upstream: str, *, timeout_s: float = 5.0, retry_after: str = "1"):
        self.upstream = upstream.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._queue: collections.deque[str] = collections.deque()
        self._always: str | None = None
        self._always_after = 0
        self.strip_logprobs = False
        self._server: ProxyServer | None = None
        self.reset()

    # -- faults and counters ------------------------------------------------------------------

    def inject(self, *kinds: str) -> None:
        """Queue one fault per kind, for the next POSTs in order."""
        with self._lock:
            self._queue.extend(_checked(kinds))

    def fail_always(self, kind: str, *, after: int = 0) -> None:
        """Every POST gets fault `kind` (after any queued ones) until `clear()`; with `after`,
        the next `after` POSTs pass first."""
        (kind,) = _checked([kind])
        with self._lock:
            self._always, self._always_after = kind, after

    def clear(self) -> None:
        """Drop the queued faults and the standing one."""
        with self._lock:
            self._queue.clear()
            self._always, self._always_after = None, 0

    @property
    def pending(self) -> list[str]:
        """The queued faults not applied yet."""
        with self._lock:
            return list(self._queue)

    def reset(self) -> None:
        """Zero the counters (the faults stay)."""
        with self._lock:
            self.posts = 0
            self.forwarded = 0
            self.faults: list[str] = []
            self.counts: collections.Counter = collections.Counter()

    def _count(self, method: str, path: str) -> str | None:
        """Count a request; the fault it gets (POSTs only), if any."""
        with self._lock:
            self.counts[(method, path)] += 1
            if method != "POST":
                return None
            self.posts += 1
            if self._queue:
                kind = self._queue.popleft()
            elif self._always is not None and self._always_after > 0:
                self._always_after -= 1
                kind = None
            else:
                kind = self._always
            if kind is not None:
                self.faults.append(kind)
            return kind

    def _relayed(self) -> None:
        with self._lock:
            self.forwarded += 1

    # -- the server ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """"http://127.0.0.1:PORT" (append "/v1" for an OpenAI base URL)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._closing.clear()
        self._server = ProxyServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                         name="fault-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()  # release held ("timeout") requests
        self._server.shutdown()
        self._server.server_close()


def _checked(kinds) -> list[str]:
    kinds = [str(k) for k in kinds]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown fault kind(s) {bad}: use one of {', '.join(KINDS)}")
    return kinds


def _handler(proxy: FaultProxy) -> type[ProxyHandler]:
    class Handler(ProxyHandler):
        def handle_request(self, body: bytes) -> None:
            kind = proxy._count(self.command, self.path.partition("?")[0])
            if kind in ("429", "500", "503"):
                self.refuse(int(kind))
            elif kind == "timeout":
                proxy._closing.wait(proxy.timeout_s)
                self.close_connection = True
            elif kind == "drop":
                self.close_connection = True
            else:
                self.relay(body, truncate=kind == "truncate")

        def refuse(self, status: int) -> None:
            if status == 429:
                self.reply_error(429, "Rate limit reached (injected by the fault proxy)",
                                 "rate_limit_error", [("Retry-After", proxy.retry_after)])
            else:
                self.reply_error(status, f"injected {status} (fault proxy)", "server_error")

        def relay(self, body: bytes, *, truncate: bool) -> None:
            try:
                status, headers, data = self.forward(proxy.upstream, body)
            except (OSError, http.client.HTTPException) as exc:
                self.reply_error(502, f"upstream {proxy.upstream} failed: {exc!r}",
                                 "server_error")
                return
            if truncate:
                self.reply(200, headers, data[: len(data) // 2])
                return
            if proxy.strip_logprobs and status == 200:
                data = _without_logprobs(data)
                headers = [(k, str(len(data)) if k.lower() == "content-length" else v)
                           for k, v in headers]
            if self.command == "POST":
                proxy._relayed()  # before the answer: a client that has it sees the count
            self.reply(status, headers, data)

    return Handler


def _without_logprobs(data: bytes) -> bytes:
    """A JSON answer with its choices' log-probabilities removed (other bodies unchanged)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    for choice in doc.get("choices", []) if isinstance(doc, dict) else []:
        choice["logprobs"] = None
    return json.dumps(doc).encode()
