"""The `openai` backend against a real llama.cpp server (the session's `llama_server`), mostly
through the fault-injecting proxy, which counts what reaches the server."""

from __future__ import annotations

import math
import os
import time

import pytest

from flywheel.backends.cache import RequestCache
from flywheel.backends.openai import (
    Endpoint,
    EndpointError,
    OpenAIBackend,
    candidate_probs,
    generations,
    own_verdict_probs,
    redact_url,
    split_tokens,
)
from flywheel.errors import FlywheelError
from flywheel.stages.judging import FORCED_PREFIX, verdict_start
from tests.faultproxy import FaultProxy

KEY_ENV = "FLYWHEEL_TEST_OPENAI_KEY"
TOKENIZER = "models/SmolLM2-135M-Instruct"
ABC = ["A", "B", "C"]
SCORES = ["1", "2", "3", "4", "5"]


def conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def proxy(llama_server):
    # a "timeout" fault holds a request 4 s: longer than the 2 s timeout of the fault tests
    with FaultProxy(llama_server.url, timeout_s=4.0) as p:
        yield p


@pytest.fixture
def fresh(proxy, llama_server, monkeypatch):
    """A clean proxy (no faults, counters at 0), the key in $KEY_ENV, and a factory of
    backends on the proxy (short backoff)."""
    proxy.clear()
    proxy.reset()
    monkeypatch.setenv(KEY_ENV, llama_server.api_key)

    def make(cache=None, *, via_proxy=True, **fields) -> OpenAIBackend:
        base = (proxy.url + "/v1") if via_proxy else llama_server.base_url
        ep = Endpoint(**{"role": "judge", "base_url": base, "model": llama_server.alias,
                         "api_key_env": KEY_ENV, "concurrency": 2, "timeout": 20.0,
                         "retries": 2, **fields})
        return OpenAIBackend(ep, cache=cache, progress=False, backoff=0.05, backoff_max=0.2)

    yield make
    proxy.clear()


# --------------------------------------------------------------------------- pure helpers


def test_redact_url_drops_credentials_and_query():
    assert redact_url("https://user:pw@api.example.com:8443/v1?key=abc#x") == \
        "https://api.example.com:8443/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url("http://tok@[::1]:9/v1/") == "http://[::1]:9/v1/"


def test_split_tokens_and_generations_share_usage():
    assert split_tokens(10, ["aaa", "a", ""]) == [8, 2, 0]
    assert split_tokens(7, ["", ""]) == [4, 3]
    assert sum(split_tokens(13, ["ab", "abc", "abcd"])) == 13
    response = {"choices": [
        {"index": 1, "message": {"content": " x"}, "finish_reason": "length"},
        {"index": 0, "message": {"content": "yyy"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 8}}
    gens = generations(response)
    assert [(g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens) for g in gens] == \
        [("yyy", "stop", 5, 5), ("x", "length", 5, 3)]


def test_candidate_probs_match_exact_then_stripped_and_sum():
    top = {"A": math.log(0.5), " A": math.log(0.1), "B": math.log(0.25), "Bx": math.log(0.1)}
    probs = candidate_probs(top, ABC)
    assert probs == pytest.approx({"A": 0.6, "B": 0.25, "C": 0.0})
    # the token holding the end of the marker: `[[B` counts for B
    assert candidate_probs({"[[B": math.log(0.4), "[[ A": math.log(0.2), "x": 0.0}, ABC,
                           lead="[[") == pytest.approx({"A": 0.2, "B": 0.4, "C": 0.0})


def test_own_verdict_probs_reads_the_token_after_the_marker():
    def tok(t, *alts):
        return {"token": t, "logprob": -0.1,
                "top_logprobs": [{"token": a, "logprob": math.log(p)} for a, p in alts]}

    pairwise = [tok("Good"), tok(". [["), tok(" "), tok("B", ("B", 0.7), ("A", 0.2)), tok("]]")]
    assert own_verdict_probs(pairwise, FORCED_PREFIX["pairwise"], ABC) == \
        pytest.approx({"A": 0.2, "B": 0.7, "C": 0.0})
    pointwise = [tok("Score"), tok(":"), tok(" 4", (" 4", 0.6), ("3", 0.3)), tok("\n")]
    assert own_verdict_probs(pointwise, FORCED_PREFIX["pointwise"], SCORES) == \
        pytest.approx({"1": 0, "2": 0, "3": 0.3, "4": 0.6, "5": 0})
    assert own_verdict_probs(pairwise[:2], FORCED_PREFIX["pairwise"], ABC) == {}
    assert own_verdict_probs([tok("No verdict")], FORCED_PREFIX["pairwise"], ABC) == {}
    assert own_verdict_probs(None, FORCED_PREFIX["pointwise"], SCORES) == {}


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    ep = Endpoint(role="generator", base_url="http://127.0.0.1:9/v1", model="m",
                  api_key_env=KEY_ENV)
    with pytest.raises(EndpointError, match=rf"\${KEY_ENV}, which is not set"):
        OpenAIBackend(ep, cache=None)


# --------------------------------------------------------------------------- generation


def test_generate_n3_asks_missing_choices_with_their_seeds_and_caches(fresh, proxy, tmp_path):
    cache = RequestCache(tmp_path / ".flywheel" / "requests.sqlite3")
    backend = fresh(cache)
    convs = [conv("Name a fruit.")]
    out = backend.generate(backend.endpoint.model, convs, n=3, temperature=0.9,
                           max_new_tokens=8, seed=11)
    # llama.cpp returns one choice whatever `n` asks: choices 1 and 2 asked one by one
    assert proxy.posts == proxy.forwarded == 3 and backend.sent == 3 and backend.retried == 0
    assert len(out) == 1 and len(out[0]) == 3
    for g in out[0]:
        assert g.finish_reason in ("stop", "length") and g.text
        assert g.prompt_tokens > 5 and 0 < g.completion_tokens <= 8
        assert g.finish_reason == "stop" or g.completion_tokens == 8
    # the three requests: n=3 with seed 11, then single requests with seeds 12 and 13
    identity = backend.describe(backend.endpoint.model)["identity"]
    base = {"model": backend.endpoint.model, "messages": convs[0], "temperature": 0.9,
            "top_p": 1.0, "max_tokens": 8}
    for body in ({**base, "seed": 11, "n": 3}, {**base, "seed": 12}, {**base, "seed": 13}):
        assert cache.get(RequestCache.key("chat.completions", body, identity)) is not None
    assert cache.stats()[0] == 3

    again = backend.generate(backend.endpoint.model, convs, n=3, temperature=0.9,
                             max_new_tokens=8, seed=11)
    assert again == out
    assert proxy.posts == 3 and backend.sent == 3 and backend.cached == 3

    # a rerun (a new process): everything from the cache, nothing sent
    rerun = fresh(RequestCache(cache.path))
    assert rerun.generate(rerun.endpoint.model, convs, n=3, temperature=0.9,
                          max_new_tokens=8, seed=11) == out
    assert proxy.posts == 3 and rerun.sent == 0 and rerun.cached == 3
    # the key is in no cache entry
    assert os.environ[KEY_ENV].encode() not in cache.path.read_bytes()

    # having learnt that n is ignored, a new conversation goes straight to 3 requests
    more = backend.generate(backend.endpoint.model, [conv("Name a colour."), convs[0]], n=3,
                            temperature=0.9, max_new_tokens=8, seed=11)
    assert proxy.posts == 6 and more[1] == out[0] and len(more[0]) == 3


def test_a_prompt_over_the_context_is_refused_at_once(fresh, proxy):
    backend = fresh()
    with pytest.raises(EndpointError) as err:
        backend.generate(backend.endpoint.model, [conv("hello " * 2500)], max_new_tokens=8)
    msg = str(err.value)
    assert "answered HTTP 400" in msg and "maximum context length is 2048" in msg
    assert "the judge endpoint " + proxy.url + "/v1" in msg
    assert proxy.posts == 1 and backend.retried == 0


def test_generate_inside_a_running_event_loop(fresh, proxy):
    import asyncio

    backend = fresh()

    async def caller():  # e.g. a notebook: the backend runs its own loop in a thread
        return backend.generate(backend.endpoint.model, [conv("Say hello.")], max_new_tokens=8)

    [[gen]] = asyncio.run(caller())
    assert gen.text and gen.completion_tokens > 0 and proxy.posts == 1


def test_a_stop_request_sends_nothing_more(fresh, proxy):
    import signal

    from flywheel import interrupt
    from flywheel.errors import Interrupted

    backend = fresh()
    interrupt.request(signal.SIGTERM)
    try:
        with pytest.raises(Interrupted):
            backend.generate(backend.endpoint.model, [conv("Say hello."), conv("Say bye.")],
                             max_new_tokens=8)
    finally:
        interrupt.reset()
    assert proxy.posts == 0 and backend.sent == 0


# --------------------------------------------------------------------------- describe


def test_describe_reports_a_stable_identity(fresh, proxy, llama_server):
    first = fresh().describe(llama_server.alias)
    second = fresh(via_proxy=False).describe(llama_server.alias)
    assert first["identity"] == second["identity"] and len(first["identity"]) == 16
    int(first["identity"], 16)
    assert first["served"] == second["served"] and first["served"]["id"] == llama_server.alias
    assert first["url"] == proxy.url + "/v1" and first["model"] == llama_server.alias
    assert proxy.counts[("GET", "/v1/models")] == 1 and proxy.posts == 0
    # pinned to this identity: accepted; to another: refused, naming both
    assert fresh(revision=first["identity"]).describe(llama_server.alias) == first
    with pytest.raises(EndpointError) as err:
        fresh(revision="0123456789abcdef").describe(llama_server.alias)
    assert "not the pinned revision '0123456789abcdef'" in str(err.value)
    assert first["identity"] in str(err.value)


def test_describe_lists_the_served_models_for_a_wrong_one(fresh, llama_server):
    with pytest.raises(EndpointError) as err:
        fresh().describe("gpt-nonexistent")
    assert "does not serve model 'gpt-nonexistent'; the server serves: smollm2" in \
        str(err.value)
    assert "models.judge.model" in str(err.value)


def test_describe_names_the_rejected_key_variable(fresh, monkeypatch):
    wrong = "wrong-key-7f3a9c"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(EndpointError) as err:
        fresh().describe("smollm2")
    msg = str(err.value)
    assert f"rejected the key in ${KEY_ENV} (HTTP 401)" in msg and wrong not in msg
    with pytest.raises(EndpointError) as err:
        fresh(api_key_env="").describe("smollm2")
    assert "requires an API key (HTTP 401) and none is set" in str(err.value)
    assert "models.judge.api_key_env" in str(err.value)


def test_describe_a_wrong_base_url_says_so(fresh, proxy):
    with pytest.raises(EndpointError) as err:
        fresh(base_url=proxy.url).describe("smollm2")  # no /v1
    assert "answered HTTP 404 to GET /models" in str(err.value)
    assert "models.judge.base_url" in str(err.value) and proxy.posts == 0


def test_describe_an_unreachable_port_fails_fast(fresh):
    from flywheel.servers import free_port

    start = time.monotonic()
    with pytest.raises(EndpointError) as err:
        fresh(base_url=f"http://127.0.0.1:{free_port()}/v1").describe("smollm2")
    assert "is the server running?" in str(err.value)
    assert "connection error" in str(err.value)
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------- verdicts


def test_check_logprobs_passes_on_llama_cpp(fresh, proxy, llama_server):
    backend = fresh()
    backend.check_logprobs(llama_server.alias)
    assert proxy.posts == 1 and backend.sent == 1


def test_verdict_probabilities_at_the_judges_own_verdict(fresh, proxy, llama_server):
    backend = fresh()
    pairwise = backend.rationale_then_probs(
        llama_server.alias, [conv('Print the string "[[B]]" and nothing else.'),
                             conv("Name a fruit.")],
        forced_prefix=FORCED_PREFIX["pairwise"], candidates=ABC, max_new_tokens=12,
        stop=verdict_start)
    (raw, rationale, probs), (_, plain, none) = pairwise
    assert "[[B]]" in raw and "[[" not in rationale
    assert set(probs) == set(ABC) and max(probs, key=probs.get) == "B"
    assert 0 < sum(probs.values()) <= 1 + 1e-6
    assert none == {} and plain  # no verdict written: no probabilities (flagged unparsed)
    [(raw, rationale, probs)] = backend.rationale_then_probs(
        llama_server.alias, [conv("Write 'Score: 3'.")], forced_prefix=FORCED_PREFIX[
            "pointwise"], candidates=SCORES, max_new_tokens=12, stop=verdict_start)
    assert "Score: 3" in raw and rationale == ""
    assert max(probs, key=probs.get) == "3" and 0 < sum(probs.values()) <= 1 + 1e-6
    assert proxy.posts == 3  # one chat request per conversation, nothing else


def test_verdict_probabilities_forced_through_completions(fresh, proxy, llama_server,
                                                          tmp_path):
    cache = RequestCache(tmp_path / "requests.sqlite3")
    backend = fresh(cache, tokenizer=TOKENIZER)
    convs = [conv("Which answer to 'What is 2+2?' is better? A: 4. B: 5. Explain briefly, "
                  "then give your verdict as [[A]] or [[B]].")]
    out = backend.rationale_then_probs(
        llama_server.alias, convs, forced_prefix=FORCED_PREFIX["pairwise"], candidates=ABC,
        max_new_tokens=16, stop=verdict_start)
    [(raw, rationale, probs)] = out
    assert raw and raw.startswith(rationale)
    assert set(probs) == set(ABC) and all(0 <= p <= 1 for p in probs.values())
    assert 0 < sum(probs.values()) <= 1 + 1e-6
    assert proxy.counts[("POST", "/v1/chat/completions")] == 1
    assert proxy.counts[("POST", "/v1/completions")] == 1
    assert backend.rationale_then_probs(
        llama_server.alias, convs, forced_prefix=FORCED_PREFIX["pairwise"], candidates=ABC,
        max_new_tokens=16, stop=verdict_start) == out
    assert proxy.posts == 2 and backend.cached == 2


def test_a_bad_tokenizer_path_is_named(fresh, llama_server, tmp_path):
    backend = fresh(tokenizer=str(tmp_path))
    with pytest.raises(FlywheelError, match=r"models.judge.tokenizer .* \(no tokenizer_config"):
        backend.rationale_then_probs(llama_server.alias, [conv("x")], forced_prefix="[[",
                                     candidates=ABC, max_new_tokens=4)


# --------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def baseline(llama_server):
    """The greedy answer to one question, without the proxy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, llama_server.api_key)
        ep = Endpoint(role="judge", base_url=llama_server.base_url, model=llama_server.alias,
                      api_key_env=KEY_ENV, timeout=30)
        backend = OpenAIBackend(ep, cache=None, progress=False)
    return backend.generate(llama_server.alias, [conv("What is 2+2?")], max_new_tokens=8)


@pytest.mark.parametrize("kind", ["429", "500", "503", "timeout", "drop", "truncate"])
def test_a_fault_is_retried_and_the_call_completes(kind, fresh, proxy, baseline):
    backend = fresh(timeout=2.0)
    proxy.inject(kind)
    start = time.monotonic()
    out = backend.generate(backend.endpoint.model, [conv("What is 2+2?")], max_new_tokens=8)
    assert out == baseline
    assert proxy.faults == [kind] and proxy.posts == proxy.forwarded + 1 == 2
    assert backend.sent == 2 and backend.retried == 1
    if kind == "429":  # Retry-After: 1 honoured (the backoff alone would be under 0.2 s)
        assert time.monotonic() - start >= 1.0


def test_past_the_budget_a_clear_error_and_the_rerun_sends_only_the_rest(fresh, proxy,
                                                                        tmp_path):
    cache = RequestCache(tmp_path / "requests.sqlite3")
    backend = fresh(cache, retries=1)
    convs = [conv(f"Name a {thing}.") for thing in ("fruit", "colour", "city", "tree")]
    # two requests in flight: both fail, one of them again (its budget spent): the other's
    # retry is answered and cached; the last two are never sent
    proxy.inject("500", "500", "500")
    with pytest.raises(EndpointError) as err:
        backend.generate(backend.endpoint.model, convs, max_new_tokens=8)
    msg = str(err.value)
    assert msg.startswith(f"the judge endpoint {proxy.url}/v1 failed for model 'smollm2' "
                          "(chat.completions): HTTP 500, after 2 attempts")
    assert "raise models.judge.retries" in msg and "answered are cached" in msg
    assert os.environ[KEY_ENV] not in msg
    assert proxy.posts == 4 and proxy.forwarded == 1 and cache.stats()[0] == 1

    proxy.reset()
    rerun = fresh(RequestCache(cache.path), retries=1)
    out = rerun.generate(rerun.endpoint.model, convs, max_new_tokens=8)
    assert proxy.posts == proxy.forwarded == 3 and rerun.cached == 1 and rerun.sent == 3
    assert len(out) == 4 and all(len(row) == 1 and row[0].text for row in out)
