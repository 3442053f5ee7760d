"""tests/faultproxy.py: each fault kind, seen by a plain http.client call through the proxy to
the real llama.cpp server, and the proxy's counters."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from tests.faultproxy import KINDS, FaultProxy

CHAT = {"model": "smollm2", "max_tokens": 8, "seed": 7, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi"}]}


@pytest.fixture
def proxy(llama_server):
    with FaultProxy(llama_server.url, timeout_s=1.5) as proxy:
        yield proxy


def call(proxy, method="POST", path="/v1/chat/completions", *, key="test-key-not-secret-123",
         body=CHAT, timeout=30.0):
    """(status, headers, body bytes) of one request through the proxy."""
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=json.dumps(body) if method == "POST" else None,
                     headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()  # names: any case
    finally:
        conn.close()


def test_requests_are_relayed_with_the_key(proxy, llama_server):
    status, _, body = call(proxy, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["smollm2"]
    assert call(proxy, "GET", "/v1/models", key=None)[0] == 401  # the header is what counts
    status, headers, body = call(proxy)
    answer = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert answer["model"] == "smollm2" and answer["usage"]["completion_tokens"] > 0
    assert (proxy.posts, proxy.forwarded, proxy.faults) == (1, 1, [])
    assert proxy.counts == {("GET", "/v1/models"): 2, ("POST", "/v1/chat/completions"): 1}


def test_429_has_retry_after_and_an_openai_error(proxy):
    proxy.inject("429")
    status, headers, body = call(proxy)
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert (proxy.posts, proxy.forwarded, proxy.faults, proxy.pending) == (1, 0, ["429"], [])


@pytest.mark.parametrize("kind", ["500", "503"])
def test_server_errors(proxy, kind):
    proxy.inject(kind)
    status, headers, body = call(proxy)
    assert status == int(kind) and "Retry-After" not in headers
    assert json.loads(body)["error"]["message"] == f"injected {kind} (fault proxy)"
    assert (proxy.posts, proxy.forwarded) == (1, 0)


def test_timeout_holds_the_request_then_closes(proxy):
    proxy.inject("timeout", "timeout")
    with pytest.raises(TimeoutError):  # a client that gives up first
        call(proxy, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(http.client.RemoteDisconnected):  # one that waits: no answer at all
        call(proxy, timeout=10)
    assert 1.4 <= time.monotonic() - start < 5
    assert (proxy.posts, proxy.forwarded, proxy.faults) == (2, 0, ["timeout", "timeout"])


def test_drop_closes_without_an_answer(proxy):
    proxy.inject("drop")
    start = time.monotonic()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        call(proxy)
    assert time.monotonic() - start < 1
    assert (proxy.posts, proxy.forwarded) == (1, 0)


def test_truncate_forwards_then_sends_half_the_json(proxy, llama_server):
    served = llama_server.log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    proxy.inject("truncate")
    status, headers, body = call(proxy)
    assert status == 200 and int(headers["Content-Length"]) == len(body) > 0
    assert body.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    assert (proxy.posts, proxy.forwarded, proxy.faults) == (1, 0, ["truncate"])
    log = llama_server.log_path.read_text()  # the server did answer it
    assert log.count('"POST /v1/chat/completions HTTP/1.1" 200') == served + 1


def test_faults_apply_to_posts_only_in_order_then_the_standing_one(proxy):
    proxy.inject("500", "429")
    assert call(proxy, "GET", "/v1/models")[0] == 200  # GETs never get a fault
    assert [call(proxy)[0] for _ in range(3)] == [500, 429, 200]
    assert (proxy.posts, proxy.forwarded, proxy.faults) == (3, 1, ["500", "429"])
    proxy.fail_always("503")
    proxy.inject("429")
    assert [call(proxy)[0] for _ in range(3)] == [429, 503, 503]
    proxy.clear()
    proxy.reset()
    assert (proxy.posts, proxy.forwarded, proxy.faults, dict(proxy.counts)) == (0, 0, [], {})
    assert call(proxy)[0] == 200
    assert (proxy.posts, proxy.forwarded) == (1, 1)


def test_concurrent_requests_each_take_one_fault(proxy):
    proxy.inject("500", "503", "429")
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(call(proxy)[0]))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 429, 500, 503]
    assert (proxy.posts, proxy.forwarded, sorted(proxy.faults)) == (4, 1, ["429", "500", "503"])


def test_unknown_kinds_are_refused():
    proxy = FaultProxy("http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"unknown fault kind\(s\) \['404'\]: use one of 429"):
        proxy.inject("500", "404")
    with pytest.raises(ValueError, match="unknown fault kind"):
        proxy.fail_always("slow")
    assert proxy.pending == [] and KINDS == ("429", "500", "503", "timeout", "drop",
                                             "truncate")
