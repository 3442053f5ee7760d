"""The `openai` backend: a model served behind an OpenAI-compatible endpoint (vLLM, llama.cpp,
a hosted API), on the official SDK's `AsyncOpenAI`.

Requests run concurrently (at most `Endpoint.concurrency` in flight). Each request is looked up
in the workspace's request cache first and its response stored there as it arrives, so a stage
stopped halfway resumes without sending what was answered. This backend owns the retry loop
(the SDK is made with `max_retries=0`): 429, 408, 5xx, timeouts, dropped connections and a 200
whose body is not complete JSON are retried with exponential backoff and jitter, honouring
`Retry-After`, up to `Endpoint.retries` times; every attempt is counted and the last failure is
named in the error. Other 4xx answers are not retried: the server's message is the error.

The API key is read from the environment variable the endpoint names; it never appears in a
message, a log line or the cache (cache keys hash the request body and the endpoint's identity,
never its URL or key).

Importing this module is cheap: the SDK, tqdm and transformers are imported when first used.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flywheel import interrupt
from flywheel.backends import Conversation, Generation
from flywheel.backends.cache import RequestCache, canonical_json
from flywheel.errors import FlywheelError

#: Fields of a /v1/models record that change without the model changing (dropped, at any
#: depth, before the record is hashed into the endpoint's identity).
VOLATILE_FIELDS = frozenset({"created", "permission", "permissions"})
#: HTTP statuses worth another attempt (besides every 5xx).
RETRY_STATUSES = frozenset({408, 429})
#: The longest wait a Retry-After header can ask for (seconds) before it is capped.
RETRY_AFTER_CAP = 120.0
#: What a request asks when checking that the server returns log-probabilities.
_PROBE = [{"role": "user", "content": "Say OK."}]


class EndpointError(FlywheelError):
    """An endpoint refused or failed a request for good (after its retries, if any)."""


class _Retryable(Exception):
    """One failed attempt worth repeating: `what` names the failure; `wait` is the server's
    Retry-After in seconds, if it gave one."""

    def __init__(self, what: str, wait: float | None = None):
        super().__init__(what)
        self.what, self.wait = what, wait


class _Skipped(Exception):
    """A request not sent because another one of the same call failed for good."""


class _Call:
    """What the requests of one backend call share: the client (made for this call's event
    loop), the concurrency limit, and the failures so far."""

    def __init__(self, client, concurrency: int):
        self.client = client
        self.slots = asyncio.Semaphore(max(1, concurrency))
        self.failed: list[BaseException] = []


@dataclass(frozen=True)
class Endpoint:
    """One model role served behind an OpenAI-compatible endpoint."""

    role: str  # judge | generator | policy
    base_url: str  # up to /v1, e.g. http://127.0.0.1:8000/v1
    model: str  # the served model id
    api_key_env: str = ""  # the environment variable holding the key ("" = no key)
    concurrency: int = 8  # requests in flight at once
    timeout: float = 120.0  # seconds to wait for one response
    retries: int = 5  # further attempts per request after a retryable failure
    extra: dict = field(default_factory=dict)  # fields merged into every request body
    tokenizer: str = ""  # local checkpoint whose chat template the served model uses
    revision: str = ""  # pinned identity (or the served record's root/id)

    @property
    def url(self) -> str:
        """The base URL without credentials or query string."""
        return redact_url(self.base_url)


def redact_url(url: str) -> str:
    """`url` without user:password@ and without its query string or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_FIELDS}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def _identity(model: str, served: dict) -> str:
    payload = canonical_json({"model": model, "served": served})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- response parsing


def _json_body(route: str, content: bytes) -> dict:
    """The decoded body of a 200 answer; `_Retryable` when it is not complete JSON of the
    expected shape (a truncated or garbled answer is worth asking again)."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Retryable(f"malformed response body ({type(exc).__name__}: "
                         f"{len(content)} bytes)") from None
    if not isinstance(data, dict):
        raise _Retryable("malformed response body (not a JSON object)")
    wanted = "data" if route == "models" else "choices"
    if not isinstance(data.get(wanted), list) or (wanted == "choices" and not data[wanted]):
        raise _Retryable(f"malformed response body (no {wanted!r} list)")
    return data


def _retry_after(headers) -> float | None:
    """Seconds a Retry-After (or retry-after-ms) header asks to wait; None without one."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _server_message(exc) -> str:
    """The server's own words in an error answer (its `error.message`, `detail` or text)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or body.get("detail")
            if msg:
                return str(msg) if not isinstance(msg, list) else json.dumps(msg)
        elif isinstance(err, str):
            return err
    try:
        text = exc.response.text
    except Exception:  # noqa: BLE001 - a body that cannot be read: fall back to the SDK's text
        text = ""
    return (text or str(exc)).strip()[:500]


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def split_tokens(total: int, texts: list[str]) -> list[int]:
    """Share `total` completion tokens among choices in proportion to their text lengths
    (largest remainders get the rounding), so the parts sum to `total`; equal shares when
    every text is empty."""
    if not texts:
        return []
    weights = [len(t) for t in texts]
    if sum(weights) == 0:
        weights = [1] * len(texts)
    exact = [total * w / sum(weights) for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(texts)), key=lambda i: parts[i] - exact[i])
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def generations(response: dict) -> list[Generation]:
    """The choices of a chat completion as `Generation`s, in choice order.

    Servers report one `usage` for all choices together. A choice's completion tokens are
    counted from its own log-probabilities when it carries them; otherwise the usage's total
    is shared among the choices in proportion to their text lengths (exact for one choice).
    """
    choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
    usage = response.get("usage") or {}
    texts = [((c.get("message") or {}).get("content") or "") for c in choices]
    shares = split_tokens(int(usage.get("completion_tokens") or 0), texts)
    out = []
    for c, text, share in zip(choices, texts, shares):
        content = (c.get("logprobs") or {}).get("content")
        tokens = len(content) if content and len(choices) > 1 else share
        out.append(Generation(text=text.strip(), finish_reason=_finish(c.get("finish_reason")),
                              prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=tokens))
    return out


def candidate_probs(top: dict[str, float], candidates: list[str],
                    lead: str = "") -> dict[str, float]:
    """P(candidate) from one position's top log-probabilities {token: logprob}.

    A token matches a candidate exactly, or else once stripped of whitespace; the
    probabilities of every token matching a candidate are summed; a candidate no token
    matches gets 0.0. `lead`: text the position's token must start with before the candidate
    (the part of a marker such as `[[` that the same token holds).
    """
    probs = dict.fromkeys(candidates, 0.0)
    for token, logprob in top.items():
        if not token.startswith(lead) or logprob is None:
            continue
        rest = token[len(lead):]
        match = rest if rest in probs else rest.strip()
        if match in probs:
            probs[match] += math.exp(logprob)
    return probs


def verdict_marker(forced_prefix: str) -> re.Pattern:
    """Where the judge's own verdict token follows: `[[` (pairwise), `Score:` (pointwise),
    else the forced prefix itself."""
    if forced_prefix.rstrip().endswith("[["):
        return re.compile(r"\[\[")
    if re.search(r"score\s*:", forced_prefix, re.IGNORECASE):
        return re.compile(r"score\s*:", re.IGNORECASE)
    return re.compile(re.escape(forced_prefix.strip()))


def own_verdict_probs(content: list[dict] | None, forced_prefix: str,
                      candidates: list[str]) -> dict[str, float]:
    """P(candidate) at the verdict the judge wrote itself: the first token after the first
    verdict marker (`verdict_marker`) in the chat completion's `logprobs.content`, skipping
    tokens of whitespace only. {} when the judge wrote no marker, or nothing after it."""
    if not content:
        return {}
    tokens = [t.get("token") or "" for t in content]
    text = "".join(tokens)
    m = verdict_marker(forced_prefix).search(text)
    if m is None:
        return {}
    start = 0
    for tok, entry in zip(tokens, content):
        end = start + len(tok)
        if end > m.end() and (start < m.end() or tok.strip()):
            lead = text[start:m.end()] if start < m.end() else ""
            top = {t["token"]: t.get("logprob") for t in entry.get("top_logprobs") or []}
            if not top:
                top = {tok: entry.get("logprob")}
            return candidate_probs(top, candidates, lead)
        start = end
    return {}


def forced_verdict_probs(response: dict, candidates: list[str]) -> dict[str, float]:
    """P(candidate) at the first generated position of a /v1/completions answer asked with
    `logprobs`; {} when it carries none."""
    lp = response["choices"][0].get("logprobs") or {}
    top = (lp.get("top_logprobs") or [None])[0]
    if not top:
        return {}
    if isinstance(top, list):  # some servers send [{"token", "logprob"}] here as well
        top = {t["token"]: t["logprob"] for t in top}
    return candidate_probs(top, candidates)


# --------------------------------------------------------------------------- the backend


async def _all(*aws) -> list:
    """Await every one of `aws` (none is left running), then raise the first failure: a stop
    request before an error, an error before a request skipped because of another's."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        errors.sort(key=lambda e: (isinstance(e, Exception), isinstance(e, _Skipped)))
        raise errors[0]
    return results


class OpenAIBackend:
    """Generation and verdict probabilities from one endpoint (the `Backend` protocol, with the
    verdict-probability capability)."""

    def __init__(self, endpoint: Endpoint, *, cache: RequestCache | None = None,
                 progress: bool = True, backoff: float = 0.5, backoff_max: float = 30.0):
        self.endpoint = endpoint
        self.cache = cache
        self.progress = progress
        self.backoff, self.backoff_max = backoff, backoff_max
        self.sent = 0  # generation requests handed to the SDK (every attempt)
        self.cached = 0  # requests answered from the cache
        self.retried = 0  # attempts repeated after a retryable failure
        self._key = self._read_key()
        self._identities: dict[str, dict] = {}
        self._ignores_n = False  # learnt: the server returns one choice whatever `n` asks
        self._tokenizer = None

    # -- identity of the endpoint in messages ------------------------------------------------
    @property
    def _where(self) -> str:
        return f"the {self.endpoint.role} endpoint {self.endpoint.url}"

    def _read_key(self) -> str:
        var = self.endpoint.api_key_env
        if not var:
            return ""
        key = os.environ.get(var)
        if not key:
            raise EndpointError(
                f"{self._where} needs the API key in ${var}, which is not set",
                details=[f"export {var}=<key>, or set models.{self.endpoint.role}.api_key_env "
                         "to the variable that holds it"])
        return key

    def _scrub(self, text: str) -> str:
        """`text` without the key (a key under 4 characters is no secret to hide)."""
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def _error(self, message: str, details: list[str]) -> EndpointError:
        return EndpointError(self._scrub(message), details=[self._scrub(d) for d in details])

    # -- running ---------------------------------------------------------------------------
    def _client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=self._key or "no-key", base_url=self.endpoint.base_url,
                           timeout=self.endpoint.timeout, max_retries=0)

    def _run(self, work: Callable):
        """Run `await work(client)` on a fresh event loop (in a worker thread when this
        thread already runs one) with a client made for that loop."""
        async def main():
            async with self._client() as client:
                return await work(client)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(main())).result()

    async def _attempt(self, client, route: str, body: dict) -> dict:
        """One HTTP request; the decoded answer, or `_Retryable`, or `EndpointError`."""
        import openai

        rest = {k: v for k, v in body.items() if k not in ("model", "messages", "prompt")}
        if route != "models":
            self.sent += 1
        try:
            if route == "chat.completions":
                raw = await client.chat.completions.with_raw_response.create(
                    model=body["model"], messages=body["messages"], extra_body=rest)
            elif route == "completions":
                raw = await client.completions.with_raw_response.create(
                    model=body["model"], prompt=body["prompt"], extra_body=rest)
            else:
                raw = await client.models.with_raw_response.list()
            content = raw.http_response.content
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (401, 403):
                raise self._auth_error(status) from None
            if status in RETRY_STATUSES or status >= 500:
                raise _Retryable(f"HTTP {status}", _retry_after(exc.response.headers)) from None
            if route == "models":
                raise self._error(
                    f"{self._where} answered HTTP {status} to GET /models: "
                    f"{_server_message(exc)}",
                    [f"check models.{self.endpoint.role}.base_url: it ends where the API's "
                     "routes begin, usually with /v1"]) from None
            raise self._error(
                f"{self._where} answered HTTP {status} for model {body.get('model', '')!r} "
                f"({route}): {_server_message(exc)}",
                ["not retried: the request itself was refused (a prompt over the model's "
                 "context, an unknown model or field); fix it and rerun"]) from None
        except openai.APITimeoutError:
            raise _Retryable(f"timeout (no answer within {self.endpoint.timeout:g} s)") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            kind = type(cause).__name__ if cause else type(exc).__name__
            raise _Retryable(f"connection error ({kind})") from None
        return _json_body(route, content)

    def _auth_error(self, status: int) -> EndpointError:
        role, var = self.endpoint.role, self.endpoint.api_key_env
        if var:
            return self._error(f"{self._where} rejected the key in ${var} (HTTP {status})",
                               [f"set ${var} to a key this server accepts"])
        return self._error(f"{self._where} requires an API key (HTTP {status}) and none is set",
                           [f"set models.{role}.api_key_env to the name of the environment "
                            "variable that holds the key"])

    def _delay(self, attempt: int, wait: float | None) -> float:
        """Seconds before attempt `attempt + 1`: the server's Retry-After when given (capped),
        else exponential backoff with jitter (half to all of base * 2^(attempt-1), capped)."""
        if wait is not None:
            return min(wait, max(self.backoff_max, RETRY_AFTER_CAP))
        step = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return step * (0.5 + random.random() / 2)

    async def _send(self, client, route: str, body: dict, *, retry_unreachable=True) -> dict:
        """The answer to one request, retried up to `Endpoint.retries` times."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._attempt(client, route, body)
            except _Retryable as exc:
                failure = exc
            if not retry_unreachable and failure.what.startswith(("connection", "timeout")):
                raise self._error(
                    f"cannot reach {self._where}: {failure.what}; is the server running?",
                    [f"start the server, or fix models.{self.endpoint.role}.base_url"])
            if attempts > self.endpoint.retries:
                raise self._budget_error(route, body, failure.what, attempts)
            self.retried += 1
            await asyncio.sleep(self._delay(attempts, failure.wait))

    def _budget_error(self, route: str, body: dict, what: str, attempts: int) -> EndpointError:
        role = self.endpoint.role
        return self._error(
            f"{self._where} failed for model {body.get('model', '')!r} ({route}): {what}, "
            f"after {attempts} attempt{'s' * (attempts != 1)}",
            ["check that the server is up and not overloaded",
             f"raise models.{role}.retries or models.{role}.timeout if it is slow or busy",
             "rerun: the requests already answered are cached and not sent again"])

    async def _request(self, call: _Call, route: str, body: dict) -> dict:
        """The cached answer to `body`, or the server's (stored as it arrives). Not sent when
        another request of the call has already failed for good."""
        key = None
        if self.cache is not None:
            key = RequestCache.key(route, body, self._identities[body["model"]]["identity"])
            hit = self.cache.get(key)
            if hit is not None:
                self.cached += 1
                return hit
        async with call.slots:
            if call.failed:
                raise _Skipped()
            interrupt.check()
            response = await self._send(call.client, route, body)
        if key is not None:
            self.cache.put(key, response)
        return response

    async def _gather(self, client, model: str, jobs: list[Callable], desc: str) -> list:
        """Run `await job(call)` for every job, `concurrency` requests at a time,
        with a progress bar. When one fails for good, those in flight finish (and are cached),
        those not started are not sent, and the first failure is raised."""
        from tqdm.auto import tqdm

        call = _Call(client, self.endpoint.concurrency)
        if self.cache is not None:
            await self._describe(client, model)
        bar = tqdm(total=len(jobs), desc=desc, unit="req", disable=not self.progress,
                   leave=False)

        async def one(job):
            try:
                result = await job(call)
            except _Skipped:
                return None
            except BaseException as exc:
                call.failed.append(exc)
                raise
            bar.update(1)
            return result

        try:
            results = await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)
        finally:
            bar.close()
        if call.failed:
            stops = [e for e in call.failed if not isinstance(e, Exception)]
            raise (stops or call.failed)[0]
        return results

    # -- generation ------------------------------------------------------------------------
    def _body(self, model: str, **fields) -> dict:
        """A request body: the endpoint's extra fields, then this request's (which win)."""
        return {**self.endpoint.extra, "model": model, **fields}

    @staticmethod
    def _repeat_offsets(conversations: list[Conversation]) -> list[int]:
        """Per conversation, how many identical ones come before it: repeats get their own
        seeds (else they would be the same request, answered once from the cache)."""
        seen: dict[str, int] = {}
        out = []
        for c in conversations:
            k = canonical_json(c)
            out.append(seen.get(k, 0))
            seen[k] = out[-1] + 1
        return out

    def generate(self, model: str, conversations: list[Conversation], *, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 seed: int = 0, desc: str = "generate") -> list[list[Generation]]:
        """`n` completions per conversation. Choice i of a conversation is seeded seed + i
        (seed + n*j + i for its j-th identical repeat): one request asks for all n; where the
        server returns fewer choices, the missing ones are asked one by one with their seeds,
        and later calls ask that way at once."""
        if not conversations:
            return []
        offsets = self._repeat_offsets(conversations)

        def job(conv, s):
            base = self._body(model, messages=conv, temperature=temperature, top_p=top_p,
                              max_tokens=max_new_tokens, seed=s)
            return lambda call: self._n_choices(call, base, n)

        jobs = [job(c, seed + n * j) for c, j in zip(conversations, offsets)]
        return self._run(lambda client: self._gather(client, model, jobs, desc))

    async def _n_choices(self, call: _Call, base: dict, n: int) -> list[Generation]:
        first = {**base, "n": n} if n > 1 else base

        def singles(start: int) -> list:  # the requests for choices start..n-1, one each
            return [self._request(call, "chat.completions", {**base, "seed": base["seed"] + i})
                    for i in range(start, n)]

        if self._ignores_n and n > 1:
            answers = await _all(self._request(call, "chat.completions", first), *singles(1))
            return [generations(a)[0] for a in answers]
        gens = generations(await self._request(call, "chat.completions", first))[:n]
        if len(gens) < n:
            self._ignores_n = True
            gens += [generations(a)[0] for a in await _all(*singles(len(gens)))]
        return gens

    # -- verdict probabilities ---------------------------------------------------------------
    def _chat_template(self):
        """The tokenizer of `Endpoint.tokenizer` (loaded once), to write the served model's
        prompt for /v1/completions."""
        if self._tokenizer is None:
            from pathlib import Path

            path = Path(self.endpoint.tokenizer)
            if not (path / "tokenizer_config.json").is_file():
                raise FlywheelError(
                    f"models.{self.endpoint.role}.tokenizer {path} is not a checkpoint "
                    "directory with a tokenizer (no tokenizer_config.json)",
                    details=["point it at a local checkpoint whose chat template the served "
                             "model uses, or leave it empty to read the judge's own verdict"])
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        return self._tokenizer

    def rationale_then_probs(self, model: str, conversations: list[Conversation], *,
                             forced_prefix: str, candidates: list[str], max_new_tokens: int,
                             temperature: float = 0.0, seed: int = 0,
                             stop: Callable[[str], int | None] | None = None,
                             desc: str = "judge") -> list[tuple[str, str, dict[str, float]]]:
        """Per conversation (raw text, rationale, P(candidate)).

        The judge writes its rationale and verdict in one chat request with log-probabilities;
        the rationale is the text before `stop(text)`. With `Endpoint.tokenizer`, the verdict
        is forced as in-process: a /v1/completions request continues the templated
        conversation + rationale + `forced_prefix` by one token, whose top log-probabilities
        give the candidates'. Without it, they are read at the token after the judge's own
        verdict marker ({} when it wrote none). Identical conversations get seeds seed + j.
        """
        if not conversations:
            return []
        tok = self._chat_template() if self.endpoint.tokenizer else None
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in conversations] if tok is not None else [None] * len(conversations)
        offsets = self._repeat_offsets(conversations)

        def job(conv, prompt, s):
            async def run(call: _Call):
                body = self._body(model, messages=conv, max_tokens=max_new_tokens,
                                  temperature=temperature, seed=s, logprobs=True,
                                  top_logprobs=20)
                answer = await self._request(call, "chat.completions", body)
                choice = answer["choices"][0]
                text = (choice.get("message") or {}).get("content") or ""
                cut = stop(text) if stop else None
                kept = text if cut is None else text[:cut]
                if prompt is None:
                    content = (choice.get("logprobs") or {}).get("content")
                    probs = own_verdict_probs(content, forced_prefix, candidates)
                else:
                    forced = self._body(model, prompt=prompt + kept + forced_prefix,
                                        max_tokens=1, temperature=0.0, seed=s, logprobs=20)
                    probs = forced_verdict_probs(
                        await self._request(call, "completions", forced), candidates)
                return text.strip(), kept.strip(), probs
            return run

        jobs = [job(c, p, seed + j) for c, p, j in zip(conversations, prompts, offsets)]
        return self._run(lambda client: self._gather(client, model, jobs, desc))

    # -- what the server serves ----------------------------------------------------------------
    def describe(self, model: str) -> dict:
        """What the server reports about `model`: {"url", "model", "served" (its /v1/models
        record without volatile fields), "identity" (16 hex: hash of model + served)}.
        Raises EndpointError when the server is unreachable, rejects the key, does not serve
        `model`, or serves something other than the pinned `revision`."""
        return self._run(lambda client: self._describe(client, model))

    async def _describe(self, client, model: str) -> dict:
        if model in self._identities:
            return self._identities[model]
        listing = await self._send(client, "models", {}, retry_unreachable=False)
        records = [r for r in listing["data"] if isinstance(r, dict)]
        record = next((r for r in records if r.get("id") == model), None)
        if record is None:
            served = ", ".join(str(r.get("id")) for r in records) or "(nothing)"
            raise self._error(f"{self._where} does not serve model {model!r}; the server "
                              f"serves: {served}",
                              [f"set models.{self.endpoint.role}.model to one of them"])
        served = _strip_volatile(record)
        info = {"url": self.endpoint.url, "model": model, "served": served,
                "identity": _identity(model, served)}
        pin = self.endpoint.revision
        if pin and pin not in (info["identity"], served.get("root"), served.get("id")):
            raise self._error(
                f"{self._where} serves {model!r} as identity {info['identity']} (root "
                f"{served.get('root', model)!r}), not the pinned revision {pin!r}",
                [f"serve the pinned model, or set models.{self.endpoint.role}.revision: "
                 f"{info['identity']} to accept this one"])
        self._identities[model] = info
        return info

    def known(self, info: dict) -> None:
        """Take what `describe` found (asked once per process, at preflight) as known, so the
        first call does not ask the server again."""
        self._identities[info["model"]] = info

    def check_logprobs(self, model: str, cache: RequestCache | None = None
                       ) -> Callable[[], None]:
        """Ask one tiny question with log-probabilities; EndpointError when the answer
        carries none. With `cache`, an answer an earlier run stored for this endpoint's
        identity is read instead of asking again; nothing is written here: the returned
        function stores a new answer (call it once the whole preflight has passed)."""
        body = self._body(model, messages=_PROBE, max_tokens=1, temperature=0.0,
                          logprobs=True, top_logprobs=5)
        key = answer = None
        if cache is not None:
            key = RequestCache.key("chat.completions", body, self.describe(model)["identity"])
            answer = cache.get(key) if cache.path.exists() else None
        fresh = answer is None
        if fresh:
            answer = self._run(lambda client: self._send(client, "chat.completions", body))
        lp = answer["choices"][0].get("logprobs") or {}
        content = lp.get("content") or []
        if not content or not content[0].get("top_logprobs"):
            raise self._error(
                f"{self._where} returned no log-probabilities for model {model!r}",
                ["set judge.verdict: text, or serve the judge with log-probabilities enabled"])
        if fresh and key is not None:
            return lambda: cache.put(key, answer)
        return lambda: None

    def release(self) -> None:
        """Nothing is loaded in-process."""
