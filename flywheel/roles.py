"""The model roles (policy, judge, generator) behind endpoints: the `Endpoint` each one's
settings describe, what its server says it serves (checked once per process, before anything
is written), and what of that enters a stage's fingerprint.

A role is local (a checkpoint run in-process) or an endpoint (`models.<role>.backend: openai`).
An endpoint's fingerprint holds the served model id and what the server reports about it (its
identity: a hash of the /v1/models record), never its URL: the same model served from another
replica or port is the same judge, as a moved checkpoint is the same model.
"""

from __future__ import annotations

from typing import Any

from flywheel.config import Config, RoleConfig
from flywheel.errors import FlywheelError

#: What each served role's /v1/models check found, per (role, base_url, model): filled by
#: `check_endpoints` (preflight) and read by the stages' fingerprints.
_IDENTITIES: dict[tuple[str, str, str], dict[str, Any]] = {}


def endpoint_roles(cfg: Config) -> list[str]:
    """The roles served behind an endpoint."""
    from flywheel.config import ROLES

    return [r for r in ROLES if getattr(cfg.models, r).endpoint]


def endpoint(cfg: Config, role: str):
    """The `flywheel.backends.openai.Endpoint` of a served role."""
    from flywheel.backends.openai import Endpoint

    r: RoleConfig = getattr(cfg.models, role)
    return Endpoint(role=role, base_url=r.base_url, model=r.model, api_key_env=r.api_key_env,
                    concurrency=r.concurrency, timeout=r.timeout, retries=r.retries,
                    extra=dict(r.extra), tokenizer=r.tokenizer, revision=r.revision)


def _key(cfg: Config, role: str) -> tuple[str, str, str]:
    r: RoleConfig = getattr(cfg.models, role)
    return role, r.base_url, r.model


def identity(cfg: Config, role: str, backend=None) -> dict[str, Any]:
    """What the server of `role` reports about its model ({url, model, served, identity}),
    asked once per process."""
    key = _key(cfg, role)
    if key not in _IDENTITIES:
        if backend is None:
            from flywheel.backends.openai import OpenAIBackend

            backend = OpenAIBackend(endpoint(cfg, role), cache=None, progress=False)
        _IDENTITIES[key] = backend.describe(getattr(cfg.models, role).model)
    return _IDENTITIES[key]


def fingerprint_params(cfg: Config, role: str) -> dict[str, Any]:
    """What of a served role shapes a stage's output: the served model and its identity, the
    extra request fields, and (for the judge) how verdict probabilities are read."""
    r: RoleConfig = getattr(cfg.models, role)
    out: dict[str, Any] = {"backend": r.backend, "model": r.model,
                           "identity": identity(cfg, role)["identity"]}
    if r.extra:
        out["extra"] = dict(sorted(r.extra.items()))
    if role == "judge" and cfg.judge.verdict == "logprobs":
        out["verdict_reading"] = "forced" if r.tokenizer else "own"
    return out


#: What a passed preflight still has to store: the answers of its log-probability probes, so
#: the next run reads them from the request cache instead of asking again.
_PENDING: list = []


def check_endpoints(cfg: Config) -> list[str]:
    """Preflight for every served role: the key variable is set, the server answers
    /v1/models with the key, serves the model (and the pinned revision), and returns
    log-probabilities where the judge reads verdicts from them (an answer a run stored in the
    request cache for the same served model counts). One message per problem, each naming the
    setting and the fix; nothing is written (`store_checks` does, once all has passed)."""
    from flywheel.backends.cache import RequestCache

    problems: list[str] = []
    _PENDING.clear()
    for role in endpoint_roles(cfg):
        from flywheel.backends.openai import OpenAIBackend

        r: RoleConfig = getattr(cfg.models, role)
        try:
            backend = OpenAIBackend(endpoint(cfg, role), cache=None, progress=False)
            _IDENTITIES.pop(_key(cfg, role), None)  # ask again: the server may have changed
            identity(cfg, role, backend)
            if role == "judge" and cfg.judge.verdict == "logprobs":
                _PENDING.append(backend.check_logprobs(
                    r.model, cache=RequestCache(cfg.request_cache_path())))
        except FlywheelError as exc:
            problems.append(f"models.{role}: {exc}".replace("\n  - ", " — "))
    return problems


def store_checks() -> None:
    """Store what the passed preflight learnt (its probes' answers) in the request cache."""
    while _PENDING:
        _PENDING.pop()()


def describe_served(cfg: Config) -> list[str]:
    """One line per served role: where it is served, the model and its identity."""
    out = []
    for role in endpoint_roles(cfg):
        who = identity(cfg, role)
        out.append(f"models.{role}: {who['model']} served at {who['url']} (identity "
                   f"{who['identity']})")
    return out


def forget() -> None:
    """Drop what was learnt about the servers (tests; a long-lived process between runs)."""
    _IDENTITIES.clear()
